"""Block-wise calibration: capture the first block's inputs once, then one block at a time.

Peak activation memory is one block's inputs and outputs over the calibration batch. Statistics
are accumulated in float64 whatever the model dtype, and are metric-agnostic: every scoring
metric reads what it needs from :class:`BlockStats`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import BlockView
from .errors import PruneError

BlockInputs = list[tuple[torch.Tensor, dict]]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are in hand."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run embeddings (and whatever precedes block 0) once; return block 0's (hidden, kwargs) per batch."""
    captured: BlockInputs = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _StopForward

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_block(layer: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs, ready to be the next block's inputs."""
    return [(block_output(layer, h, kw), kw) for h, kw in inputs]


@dataclass
class BlockStats:
    """Calibration statistics of one block (sums over all calibration tokens).

    attn_*: input channels of o_proj (the heads' outputs X_H); ffn_*: input channels of
    down_proj (a_j = silu(gate) * up). head_token_norms[t, h] = ||X_H^h[t] W_O^h^T||, the
    head's contribution to the residual at token t; residual_norms[t] = ||h_t||, the
    post-attention residual that feeds the FFN's norm.
    """

    tokens: int = 0
    attn_sum: torch.Tensor | None = None
    attn_sumsq: torch.Tensor | None = None
    ffn_sum: torch.Tensor | None = None
    ffn_sumsq: torch.Tensor | None = None
    output_sumsq: float = 0.0
    head_token_norms: list[torch.Tensor] = field(default_factory=list)
    residual_norms: list[torch.Tensor] = field(default_factory=list)

    def attn_norms(self, centred: bool = False) -> torch.Tensor:
        """||X_H[:, c]|| over tokens (centred: ||X_H[:, c] - mean||)."""
        return _column_norms(self.attn_sum, self.attn_sumsq, self.tokens, centred)

    def ffn_norms(self, centred: bool = False) -> torch.Tensor:
        """||a_j|| over tokens (centred: ||a_j - mean||)."""
        return _column_norms(self.ffn_sum, self.ffn_sumsq, self.tokens, centred)

    def attn_mean(self) -> torch.Tensor:
        return self.attn_sum / self.tokens

    def ffn_mean(self) -> torch.Tensor:
        return self.ffn_sum / self.tokens

    def per_token_head_norms(self) -> torch.Tensor:
        return torch.cat(self.head_token_norms)

    def per_token_residual_norms(self) -> torch.Tensor:
        return torch.cat(self.residual_norms)

    @property
    def output_norm(self) -> float:
        """||y||_F of the block output over all calibration tokens."""
        return self.output_sumsq ** 0.5


def _column_norms(total, sumsq, n, centred) -> torch.Tensor:
    if centred:
        sumsq = sumsq - total.pow(2) / n
    return sumsq.clamp_min(0).sqrt()


def _accumulate(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().to("cpu", torch.float64)
    return value if acc is None else acc + value


def _head_gram(view: BlockView) -> torch.Tensor:
    """W_O^h^T W_O^h per head, [H, hd, hd], so that ||x W_O^h^T||^2 = x G_h x^T."""
    w = view.o.weight.detach().float()
    heads = w.view(w.shape[0], -1, view.head_dim).transpose(0, 1)
    return heads.transpose(1, 2) @ heads


@contextmanager
def _stats_hooks(view: BlockView, stats: BlockStats):
    gram = _head_gram(view)

    def on_attn(_m, args):
        x = args[0].detach().float()
        flat = x.reshape(-1, x.shape[-1])
        stats.attn_sum = _accumulate(stats.attn_sum, flat.sum(0))
        stats.attn_sumsq = _accumulate(stats.attn_sumsq, flat.pow(2).sum(0))
        heads = flat.view(flat.shape[0], -1, view.head_dim)
        sq = torch.einsum("thi,hij,thj->th", heads, gram.to(heads.device), heads)
        stats.head_token_norms.append(sq.clamp_min(0).sqrt().cpu())

    def on_residual(_m, args):
        h = args[0].detach().float()
        stats.residual_norms.append(h.reshape(-1, h.shape[-1]).norm(dim=-1).cpu())

    def on_ffn(_m, args):
        a = args[0].detach().float().reshape(-1, args[0].shape[-1])
        stats.tokens += a.shape[0]
        stats.ffn_sum = _accumulate(stats.ffn_sum, a.sum(0))
        stats.ffn_sumsq = _accumulate(stats.ffn_sumsq, a.pow(2).sum(0))

    handles = [
        view.o.register_forward_pre_hook(on_attn),
        view.mlp_norm.register_forward_pre_hook(on_residual),
        view.down.register_forward_pre_hook(on_ffn),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_block_stats(view: BlockView, inputs: BlockInputs) -> tuple[BlockStats, BlockInputs]:
    """One forward pass of the block over the calibration inputs: its statistics and its outputs."""
    stats = BlockStats()
    outputs: BlockInputs = []
    with _stats_hooks(view, stats):
        for hidden, kwargs in inputs:
            out = block_output(view.layer, hidden, kwargs)
            stats.output_sumsq += float(out.detach().float().pow(2).sum())
            outputs.append((out, kwargs))
    if not (torch.isfinite(stats.attn_sumsq).all() and torch.isfinite(stats.ffn_sumsq).all()):
        in_float32 = view.o.weight.dtype == torch.float32
        hint = "check the model's weights for NaN or Inf" if in_float32 else "try --dtype float32"
        raise PruneError(f"calibration activations contain NaN or Inf; {hint}")
    return stats, outputs


def accumulate_lm_gradients(model: nn.Module, weights: list[nn.Parameter], ids: torch.Tensor, batch_size: int) -> None:
    """Sum of the language-model loss gradients over the calibration data, left in ``w.grad``
    for the given weights only (every other parameter is frozen meanwhile)."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    device = next(model.parameters()).device
    try:
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / ids.shape[0]).backward()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
