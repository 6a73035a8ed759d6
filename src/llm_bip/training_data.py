"""What recovery trains on (``--data`` of ``finetune`` and ``distill``), as tokenised examples.

- a named corpus (``ptb``, ``warpeace``, ...): windows of ``seqlen`` tokens of its train split;
- ``mix``: windows of the train splits of the calibration mix's corpora, in equal shares;
- a local ``.txt`` file: its windows; ``.json`` / ``.jsonl``: Alpaca-style instruction records, each the
  standard Alpaca prompt followed by the response, the loss on the response only;
- ``self``: windows a model samples itself (the teacher, or the dense model a pruned one came from), with
  ``--calibration self``'s sampler and cache: recovery without any data.

Examples come in a seeded order (``mix``: the corpora take turns), and a run that reads fewer examples
than there are keeps the first ones it reads: a training budget is the same text for every run that
shares the data, seed and budget (and a teacher cache made for one serves all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import (
    MIX,
    MIX_SOURCES,
    SELF,
    corpus_names,
    is_corpus,
    load_text,
    needs_bos,
    read_json_records,
    read_text_file,
    tokenize,
)
from .errors import PruneError
from .evaluation import eval_windows
from .losses import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
FILE_FORMATS = {".json": "alpaca-json", ".jsonl": "alpaca-jsonl", ".txt": "text"}
Example = dict[str, list[int]]  # {"input_ids", "labels"}


@dataclass
class DataFile:
    """Training data as read, before tokenising: a file's Alpaca records or text, a corpus's train split,
    the mix's train splits ({corpus: text}), or nothing yet (``self``: sampled once a model is loaded)."""

    path: str
    format: str
    content: list[dict] | str | dict[str, str] | None = field(repr=False)

    def records(self) -> list[dict]:
        """The instruction records of an Alpaca file."""
        if not isinstance(self.content, list):
            raise TypeError(f"{self.path}: {self.format} data holds no instruction records")
        return self.content

    def text(self) -> str:
        """The text of a text file or a corpus's train split."""
        if not isinstance(self.content, str):
            raise TypeError(f"{self.path}: {self.format} data holds no single text")
        return self.content

    def texts(self) -> dict[str, str]:
        """The mix's train splits, by corpus."""
        if not isinstance(self.content, dict):
            raise TypeError(f"{self.path}: {self.format} data holds no texts by corpus")
        return self.content


@dataclass
class TrainingData:
    """Tokenised training examples ({input_ids, labels}) in the order a run reads them, and their source."""

    source: DataFile
    examples: list[Example] = field(repr=False)

    def describe(self) -> dict:
        return {
            "source": self.source.path, "format": self.source.format, "examples": len(self.examples),
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
            "loss_tokens": sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in self.examples),
        }


# --------------------------------------------------------------------------- reading


def read_data(source: str) -> DataFile:
    """Read ``--data`` with every check that needs no tokenizer (missing or unreadable files, bad records,
    an offline hub corpus)."""
    if source == SELF:
        return DataFile(SELF, "self", None)
    if source == MIX:
        return DataFile(MIX, "mix", {name: load_text(name, "train") for name in MIX_SOURCES})
    if is_corpus(source):
        return DataFile(source, "corpus", load_text(source, "train"))
    path = Path(source)
    fmt = file_format(path)
    if fmt != "text":
        return DataFile(str(path), fmt, read_records(path))
    return DataFile(str(path), fmt, read_text_file(path))


def file_format(path: Path) -> str:
    """The data format a file's suffix names, or a PruneError (missing file, unknown suffix)."""
    if not path.is_file():
        raise PruneError(f"{path}: no such data file, nor a corpus ({', '.join(corpus_names())}), {MIX} or {SELF}")
    if path.suffix not in FILE_FORMATS:
        raise PruneError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use .json or .jsonl "
                         "(Alpaca-style instruction/input/output records) or .txt (plain text)")
    return FILE_FORMATS[path.suffix]


def read_records(path: Path) -> list[dict]:
    """Alpaca-style records of a .json (one list) or .jsonl (one object a line) file, checked."""
    records = read_json_records(path)
    if not isinstance(records, list) or not records:
        raise PruneError(f"{path}: holds no examples (expected a list of instruction/input/output records)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise PruneError(f"{path}: record {i} lacks the 'instruction' and 'output' fields of Alpaca-style "
                             "data (use a .txt file for plain text)")
    return records


# --------------------------------------------------------------------------- examples


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def instruction_example(tokenizer, record: dict, seqlen: int) -> Example:
    """Prompt + response + EOS, cut to ``seqlen``; only the response and EOS carry labels."""
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = bos + tokenizer(alpaca_prompt(record), add_special_tokens=False).input_ids
    response = tokenizer(str(record["output"]), add_special_tokens=False).input_ids + eos
    return {"input_ids": (prompt + response)[:seqlen], "labels": ([IGNORE_INDEX] * len(prompt) + response)[:seqlen]}


def text_examples(tokenizer, text: str, seqlen: int, source: str) -> list[Example]:
    """Consecutive windows of ``seqlen`` tokens (BOS first where the model uses one), loss on all."""
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen - int(needs_bos(tokenizer)):
        raise PruneError(f"{source}: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                         "use more text or a smaller --seqlen")
    return windows_as_examples(eval_windows(tokenizer, ids, seqlen))


def windows_as_examples(windows: torch.Tensor) -> list[Example]:
    return [{"input_ids": w, "labels": w} for w in windows.tolist()]


def instruction_examples(tokenizer, data: DataFile, seqlen: int) -> list[Example]:
    examples = [instruction_example(tokenizer, r, seqlen) for r in data.records()]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:])]
    if not examples:
        raise PruneError(f"{data.path}: every prompt fills --seqlen {seqlen}, leaving no response tokens to train "
                         "on; raise --seqlen")
    return examples


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return [examples[i] for i in order.tolist()]


def taking_turns(parts: list[list[Example]], limit: int | None, source: str) -> list[Example]:
    """Equal shares of each part (the first parts take any remainder); all of every part without a limit."""
    if limit is None:
        return [e for part in parts for e in part]
    shares = [len(share) for share in torch.arange(limit).tensor_split(len(parts))]
    short = [(len(part), share) for part, share in zip(parts, shares) if len(part) < share]
    if short:
        raise PruneError(f"{source}: a run of this many steps reads {limit} windows, {shares[0]} from each corpus, "
                         f"but one holds only {short[0][0]}; lower --max-steps or --seqlen")
    return [part[i] for i in range(max(shares)) for part, share in zip(parts, shares) if i < share]


def build_training_data(tokenizer, data: DataFile, seqlen: int, seed: int, limit: int | None = None,
                        sample=None) -> TrainingData:
    """The examples a run reads, in order: at most ``limit`` (the run's steps × examples per step).
    ``sample(n)``: for ``self``, ``n`` windows [n, seqlen] that a model writes."""
    if data.format == "self":
        if limit is None:
            raise PruneError("--data self samples exactly the windows the run reads: give --max-steps")
        return TrainingData(data, windows_as_examples(sample(limit)))
    if data.format == "mix":
        parts = [shuffled(text_examples(tokenizer, text, seqlen, f"{name} (train)"), seed)
                 for name, text in data.texts().items()]
        return TrainingData(data, taking_turns(parts, limit, data.path))
    if data.format in ("text", "corpus"):
        examples = text_examples(tokenizer, data.text(), seqlen, data.path)
    else:
        examples = instruction_examples(tokenizer, data, seqlen)
    return TrainingData(data, shuffled(examples, seed)[:limit])
