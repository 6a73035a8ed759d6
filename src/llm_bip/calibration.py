"""Block-wise calibration: capture the first block's inputs once, then one block at a time.

Peak activation memory is one block's inputs and outputs over the calibration batch. Statistics
are accumulated in float64 whatever the model dtype, and are metric-agnostic: every scoring
metric reads what it needs from :class:`BlockStats`. Reconstruction reads the Grams of o_proj's
and down_proj's inputs (:class:`BlockGrams`), from the same forward when both are needed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

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


@dataclass
class BlockGrams:
    """Sums over the calibration tokens of x~ x~^T, float64, for the inputs x of o_proj (``attn``) and of
    down_proj (``ffn``); x~ = [x, 1] for a projection that has a bias, else x (so the last row and column
    of a Gram with the ones column hold the input sums and the token count)."""

    attn: torch.Tensor | None = None
    ffn: torch.Tensor | None = None


@contextmanager
def _pre_hooks(hooks: list[tuple[nn.Module, Callable]]):
    """Forward pre-hooks on modules meanwhile: (module, hook(module, args)) pairs."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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

    return _pre_hooks([(view.o, on_attn), (view.mlp_norm, on_residual), (view.down, on_ffn)])


def _gram_hooks(view: BlockView, grams: BlockGrams | None):
    """Hooks that add each batch's input Grams of o_proj and down_proj into ``grams`` (none when None).

    A batch's Gram is a float32 matmul, added into the float64 sum: a float64 matmul per batch is
    many times slower on CPUs, and float32 rounding within one batch is far below what the refit's
    damping changes."""

    def on(name: str):
        def hook(linear: nn.Linear, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if linear.bias is not None:
                x = F.pad(x, (0, 1), value=1.0)
            batch = x.T @ x
            total = getattr(grams, name)
            if total is None:
                setattr(grams, name, batch.double())
            else:
                total.add_(batch)
        return hook

    return _pre_hooks([] if grams is None else [(view.o, on("attn")), (view.down, on("ffn"))])


@torch.no_grad()
def collect_block_stats(view: BlockView, inputs: BlockInputs,
                        grams: BlockGrams | None = None) -> tuple[BlockStats, BlockInputs]:
    """One forward pass of the block over the calibration inputs: its statistics and its outputs
    (and, given ``grams``, its projections' input Grams added into them)."""
    stats = BlockStats()
    with _stats_hooks(view, stats), _gram_hooks(view, grams):
        outputs = forward_block(view.layer, inputs)
    stats.output_sumsq = sum(float(out.float().pow(2).sum()) for out, _ in outputs)
    _check_finite(view, stats.attn_sumsq, stats.ffn_sumsq)
    return stats, outputs


@torch.no_grad()
def collect_block_grams(view: BlockView, inputs: BlockInputs) -> tuple[BlockGrams, BlockInputs]:
    """One forward pass of the block over the calibration inputs: its projections' input Grams and its outputs."""
    grams = BlockGrams()
    with _gram_hooks(view, grams):
        outputs = forward_block(view.layer, inputs)
    _check_finite(view, grams.attn, grams.ffn)
    return grams, outputs


def _check_finite(view: BlockView, *sums: torch.Tensor) -> None:
    """A PruneError when calibration sums over the block's activations hold NaN or Inf."""
    if not all(torch.isfinite(s).all() for s in sums):
        in_float32 = view.o.weight.dtype == torch.float32
        hint = "check the model's weights for NaN or Inf" if in_float32 else "try --dtype float32"
        raise PruneError(f"calibration activations contain NaN or Inf; {hint}")


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
