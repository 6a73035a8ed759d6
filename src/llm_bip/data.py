"""Text sources (PTB offline, local files, hub datasets) and tokenised windows."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import torch

from .env import offline
from .errors import PruneError

HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"train": "train", "valid": "validation", "test": "test"}),
    "c4": ("allenai/c4", None, {"train": "train", "valid": "validation", "test": "validation"}),
}
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
TEXT_FIELDS = ("text", "content", "output")
# byte-order marks and the codec each declares; UTF-32's are tested first (UTF-16 LE's is a prefix of one)
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# control characters that text does not hold (tab, newlines, form feed and vertical tab are text)
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
MAX_CONTROL_SHARE = 0.001


def is_corpus(source: str) -> bool:
    """True for a named corpus with splits; anything else is a file, read whole."""
    return source == "ptb" or source in HUB_DATASETS


def check_text_source(source: str) -> None:
    """Refuse, before any model work, a text source that cannot be read: a hub corpus while the hub is
    offline, a file that is missing or not text."""
    if source in HUB_DATASETS:
        _check_hub_reachable(source)
    elif source != "ptb":
        load_text(source)


def load_text(source: str, split: str = "train") -> str:
    """Raw text of a named corpus split ('ptb', 'wikitext2', 'c4') or of a local .txt/.json/.jsonl file
    (read whole: ``split`` applies to named corpora only)."""
    if split not in ("train", "valid", "test"):
        raise PruneError(f"unknown split {split!r}; use train, valid or test")
    if source == "ptb":
        import treebank

        return treebank.penn[split]
    if source in HUB_DATASETS:
        return _load_hub_text(source, split)
    path = Path(source)
    if not path.is_file():
        raise PruneError(
            f"text source {source!r} is neither a file nor one of: ptb, {', '.join(HUB_DATASETS)}"
        )
    return _read_local_text(path)


def _read_local_text(path: Path) -> str:
    """Plain text as is; JSON/JSONL records joined through their text (or instruction) fields."""
    if path.suffix not in (".json", ".jsonl"):
        return read_text_file(path)
    return "\n\n".join(_record_text(r) for r in read_json_records(path))


def read_text_file(path: Path) -> str:
    """A text file decoded strictly: UTF-8, or the encoding its byte-order mark declares. Binary data,
    undecodable bytes and UTF-16/32 without a byte-order mark are refused, naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PruneError(f"{path}: cannot read ({err.strerror})") from None
    encoding = next((codec for mark, codec in BYTE_ORDER_MARKS if raw.startswith(mark)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise PruneError(f"{path}: not {encoding.upper().removesuffix('-SIG')} text (undecodable byte at offset "
                         f"{err.start}); save it as UTF-8 or with a byte-order mark") from None
    controls = len(CONTROL.findall(text))
    if "\x00" in text or controls > MAX_CONTROL_SHARE * len(text):
        raise PruneError(f"{path}: not text ({controls} of {len(text)} characters are NULs or control characters: "
                         "a binary file, or UTF-16/32 without a byte-order mark)")
    if not text.strip():
        raise PruneError(f"{path}: the file is empty")
    return text


def read_json_records(path: Path):
    """The value of a .json file, or the list of one value per non-blank line of a .jsonl file;
    a PruneError names the line that is not valid JSON."""
    raw = read_text_file(path)
    if path.suffix != ".jsonl":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise PruneError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    values = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PruneError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    return values


def _record_text(record) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise PruneError(f"JSON records must be strings or objects, got {type(record).__name__}")
    if "instruction" in record:
        parts = (record.get("instruction", ""), record.get("input", ""), record.get("output", ""))
        return "\n".join(p for p in parts if p)
    for field in TEXT_FIELDS:
        if field in record:
            return str(record[field])
    raise PruneError(f"JSON record has none of the fields {', '.join(TEXT_FIELDS)} or 'instruction'")


def _check_hub_reachable(name: str) -> None:
    if offline("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        raise PruneError(f"dataset {name!r} comes from the hub, which is offline here; use 'ptb' or a local file")


def _load_hub_text(name: str, split: str) -> str:
    _check_hub_reachable(name)
    import datasets

    path, config, splits = HUB_DATASETS[name]
    hub_split = splits[split]
    try:
        if name == "c4":
            ds = datasets.load_dataset(path, data_files={hub_split: C4_FILES[hub_split]}, split=hub_split)
            return "\n\n".join(ds.select(range(min(len(ds), 20000)))["text"])
        ds = datasets.load_dataset(path, config, split=hub_split)
    except Exception as err:  # network and hub errors come in many types
        raise PruneError(f"could not load dataset {name!r} from the hub: {type(err).__name__}: {err}") from None
    return "\n\n".join(ds["text"])


def needs_bos(tokenizer) -> bool:
    """True where the tokenizer itself starts sequences with BOS (Llama, Mistral), so windows get one too."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of a whole text, without special tokens."""
    if not text.strip():
        raise PruneError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def with_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """Prepend BOS to every row where the model expects it."""
    if not needs_bos(tokenizer):
        return windows
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)


def random_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at random offsets (the SparseGPT/Wanda/FLAP recipe)."""
    if n_samples < 1 or seqlen < 2:
        raise PruneError("need at least one calibration sample of at least 2 tokens")
    if ids.numel() <= seqlen:
        raise PruneError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_ids(tokenizer, source: str, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration batch [n_samples, seqlen] from the train split of ``source`` (BOS included where used)."""
    text_len = seqlen - int(needs_bos(tokenizer))
    windows = random_windows(tokenize(tokenizer, load_text(source, "train")), n_samples, text_len, seed)
    return with_bos(windows, tokenizer)
