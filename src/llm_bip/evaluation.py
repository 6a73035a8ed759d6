"""Perplexity with the protocol of LLM-Pruner/FLAP tables: non-overlapping windows of L tokens."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_text, needs_bos, tokenize, with_bos
from .errors import PruneError


@dataclass
class Perplexity:
    dataset: str
    split: str
    seqlen: int
    windows: int
    tokens: int
    ppl: float

    def __str__(self) -> str:
        return (f"{self.dataset}/{self.split} perplexity {self.ppl:.3f} "
                f"(L={self.seqlen}, {self.windows} windows, {self.tokens} tokens scored)")

    def as_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer, ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (BOS first where the model uses it)."""
    text_len = seqlen - int(needs_bos(tokenizer))
    n = ids.numel() // text_len
    if n == 0:
        raise PruneError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return with_bos(ids[: n * text_len].view(n, text_len), tokenizer)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL over all windows, and the number of tokens scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, tokenizer, dataset: str = "ptb", split: str = "test", seqlen: int = 128,
               max_tokens: int | None = None, batch_size: int | None = None, progress: bool = True) -> Perplexity:
    """exp(mean NLL) over the joined ``split`` text of ``dataset`` (optionally its first ``max_tokens``)."""
    if seqlen < 2:
        raise PruneError("--seqlen must be at least 2")
    ids = tokenize(tokenizer, load_text(dataset, split))
    if max_tokens:
        ids = ids[:max_tokens]
    windows = eval_windows(tokenizer, ids, seqlen)
    nll, count = window_nll(model, windows, batch_size or max(1, 2048 // seqlen), progress)
    return Perplexity(dataset, split, seqlen, windows.shape[0], count, math.exp(nll / count))
