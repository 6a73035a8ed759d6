"""Perplexity with the protocol of LLM-Pruner/FLAP tables: non-overlapping windows of L tokens."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import corpus_names, is_corpus, load_text, needs_bos, tokenize, with_bos
from .devices import input_device
from .errors import PruneError
from .limits import check_window
from .outputs import cache_dir, library_versions, write_cache_entry


@dataclass
class Perplexity:
    dataset: str
    split: str | None  # None for a file, which is evaluated whole
    seqlen: int
    windows: int
    tokens: int
    ppl: float
    cached: bool = False

    def __str__(self) -> str:
        return (f"{text_label(self.dataset, self.split)} perplexity {self.ppl:.3f} (L={self.seqlen}, "
                f"{self.windows} windows, {self.tokens} tokens scored{', cached' if self.cached else ''})")

    def as_dict(self) -> dict:
        """The measurement (how it was obtained, ``cached``, left out)."""
        return {k: v for k, v in asdict(self).items() if k != "cached"}


def text_label(dataset: str, split: str | None) -> str:
    """'ptb/test' for a corpus split, the path alone for a file."""
    return dataset if split is None else f"{dataset}/{split}"


def eval_split(split: str | None, datasets: Sequence[str]) -> str:
    """The split to evaluate: ``split`` (default test) of the named corpora among ``datasets``; a text file is
    evaluated whole, so a split given beside one is refused."""
    files = [d for d in datasets if not is_corpus(d)]
    if split is not None and files:
        raise PruneError(f"--split selects a split of {', '.join(corpus_names())}; {files[0]} is a file, "
                         "evaluated whole")
    return split or "test"


def split_label(dataset: str, split: str) -> str | None:
    """The split a measurement names: a corpus's; None for a file, which is evaluated whole."""
    return split if is_corpus(dataset) else None


def eval_windows(tokenizer, ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (BOS first where the model uses it)."""
    text_len = seqlen - int(needs_bos(tokenizer))
    n = ids.numel() // text_len
    if n == 0:
        raise PruneError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return with_bos(ids[: n * text_len].view(n, text_len), tokenizer)


def text_windows(tokenizer, dataset: str, split: str, seqlen: int, max_tokens: int | None) -> torch.Tensor:
    """The evaluation windows of ``dataset``'s ``split`` (a file: the whole file), optionally of its first
    ``max_tokens`` tokens."""
    if seqlen < 2:
        raise PruneError("--seqlen must be at least 2")
    ids = tokenize(tokenizer, load_text(dataset, split))
    return eval_windows(tokenizer, ids[:max_tokens] if max_tokens else ids, seqlen)


@torch.no_grad()
def torch_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """A transformers model's logits for a batch of token ids."""
    return model(batch.to(input_device(model)), use_cache=False).logits


@torch.no_grad()
def window_nll(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int,
               progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL over all windows (``logits_of``: token ids to logits), and the number of tokens scored."""
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        logits = logits_of(batch).float()
        targets = batch[:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total, count


def perplexity(model, tokenizer, dataset: str = "ptb", split: str = "test", seqlen: int = 128,
               max_tokens: int | None = None, batch_size: int | None = None, progress: bool = True,
               cache: bool = False) -> Perplexity:
    """exp(mean NLL) over the joined ``split`` text of ``dataset`` (a file: the whole file), optionally its
    first ``max_tokens``. ``cache``: reuse the result of an earlier identical measurement (same weights,
    tokenizer, text, settings and library versions), kept in the llm-bip cache folder."""
    check_window(model.config, seqlen, "the evaluation window")
    windows = text_windows(tokenizer, dataset, split, seqlen, max_tokens)
    batch_size = batch_size or max(1, 2048 // seqlen)
    label = split_label(dataset, split)
    entry = cache_dir() / "perplexity" / f"{measurement_key(model, windows, batch_size)}.json" if cache else None
    if entry is not None and entry.is_file():
        return Perplexity(**{**json.loads(entry.read_text()), "dataset": dataset, "split": label, "cached": True})
    nll, count = window_nll(partial(torch_logits, model), windows, batch_size, progress)
    result = Perplexity(dataset, label, seqlen, windows.shape[0], count, math.exp(nll / count))
    if entry is not None:
        write_cache_entry(entry, lambda path: Path(path).write_text(json.dumps(result.as_dict())))
    return result


@dataclass
class Agreement:
    """How closely a model follows a teacher on a text: the mean KL(teacher ‖ model) of the next-token
    distributions (nats per token) and the share of positions where both rank the same token first."""

    dataset: str
    split: str | None
    seqlen: int
    windows: int
    tokens: int
    kl: float
    top1: float

    def __str__(self) -> str:
        return (f"{text_label(self.dataset, self.split)} against the teacher: KL {self.kl:.4f} nats/token, top-1 "
                f"agreement {100 * self.top1:.2f}% (L={self.seqlen}, {self.windows} windows, {self.tokens} tokens)")

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def agreement(model, teacher, tokenizer, dataset: str = "ptb", split: str = "test", seqlen: int = 128,
              max_tokens: int | None = None, batch_size: int | None = None, progress: bool = True) -> Agreement:
    """``model`` against ``teacher`` (same vocabulary) on the perplexity windows of ``dataset``'s ``split``."""
    windows = text_windows(tokenizer, dataset, split, seqlen, max_tokens)
    kl, agree, count = 0.0, 0, 0
    for batch in tqdm(windows.split(batch_size or max(1, 2048 // seqlen)), desc="agreement", disable=not progress,
                      leave=False):
        student = torch_logits(model, batch)[:, :-1].float().log_softmax(-1)
        target = torch_logits(teacher, batch)[:, :-1].to(student.device).float().log_softmax(-1)
        kl += float(F.kl_div(student, target, log_target=True, reduction="sum"))
        agree += int((student.argmax(-1) == target.argmax(-1)).sum())
        count += student.shape[0] * student.shape[1]
    return Agreement(dataset, split_label(dataset, split), seqlen, windows.shape[0], count, kl / count, agree / count)


def measurement_key(model, windows: torch.Tensor, batch_size: int) -> str:
    """A digest of everything a perplexity depends on: the weights and config, the token windows
    (so the tokenizer and text), the batching and the library versions."""
    digest = model_digest(model, {"batch_size": batch_size})
    digest.update(windows.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def model_digest(model, settings: dict):
    """A sha256 over the weights and config of ``model``, its device type, the library versions and
    ``settings``: the key of a result computed from the model (callers may add more to it)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    settings = {**settings, "config": config, "device": input_device(model).type, "versions": library_versions()}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:  # offloaded by a device map: its hook reads it from disk or CPU memory
            from transformers.integrations.accelerate import load_offloaded_parameter

            tensor = load_offloaded_parameter(model, name)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest
