"""Block-wise calibration: capture the first block's inputs once, then one block at a time.

Peak activation memory is one block's inputs and outputs over the calibration batch. Statistics
are accumulated in float64 whatever the model dtype, and are metric-agnostic: every scoring
metric reads what it needs from :class:`BlockStats`. Reconstruction reads o_proj's and down_proj's
inputs (:class:`BlockGrams`: the rows themselves while there are fewer than columns, else their Grams),
from the same forward when both are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.nn import functional as F

from .adapters import BlockView, Norm
from .devices import execution_device, input_device
from .errors import PruneError

# Per calibration batch: the hidden states entering a block, and every block's keyword arguments for
# that batch (by block index: sliding-window and global layers get different masks and rotary tables).
BlockInputs = list[tuple[torch.Tensor, list[dict]]]


class _StopForward(Exception):
    """Raised once the last block's keyword arguments are in hand."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model once per batch with every block passing its input through unchanged: block 0's
    hidden states, and the keyword arguments each block is called with; it stops after the last block."""
    captured: BlockInputs = []
    device = input_device(model)
    with _passing_through(layers) as calls:
        for batch in ids.split(batch_size):
            calls.clear()
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
            captured.append((calls[0][0], [kwargs for _, kwargs in calls]))
    return captured


@contextmanager
def _passing_through(layers: nn.ModuleList):
    """Meanwhile every layer returns its input and records (input, keyword arguments) in the yielded list;
    the last one raises _StopForward."""
    calls: list[tuple[torch.Tensor, dict]] = []

    def recorder(last: bool):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls.append((hidden, dict(kwargs)))
            if last:
                raise _StopForward
            return hidden
        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # accelerate's hooks put one on dispatched blocks
    for i, layer in enumerate(layers):
        layer.forward = recorder(i == len(layers) - 1)
    try:
        yield calls
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def block_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_block(view: BlockView, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs, ready to be the next block's inputs. It computes where its weights are: the hidden
    states go there (and its outputs stay there), and its keyword arguments too (they are kept there)."""
    device = execution_device(view.layer)
    outputs = []
    for h, kw in inputs:
        kw[view.index] = send_to_device(kw[view.index], device)
        outputs.append((block_output(view.layer, h.to(device), kw[view.index]), kw))
    return outputs


def output_norm_scales(norm: Norm, out: torch.Tensor) -> torch.Tensor:
    """Per token t, 2 max|g| / sqrt(mean(a_t^2) + eps) for a branch output a that passes the RMSNorm
    ``norm`` (gain g) before the residual add: ||N(a) - N(a')|| <= that * ||a - a'|| for every a'.

    (N(x) = g * sqrt(d) x / rho(x), rho(x) = sqrt(||x||^2 + d eps), and rho is 1-Lipschitz, so
    ||x / rho(x) - y / rho(y)|| <= ||x - y|| / rho(x) + ||y|| |rho(x) - rho(y)| / (rho(x) rho(y))
    <= 2 ||x - y|| / rho(x).)"""
    a = out.detach().double().reshape(-1, out.shape[-1])
    gain = float(norm.gain().abs().max())
    return 2 * gain / (a.pow(2).mean(-1) + norm.eps).sqrt()


@dataclass
class BlockStats:
    """Calibration statistics of one block (sums over all calibration tokens).

    attn_*: input channels of o_proj (the heads' outputs X_H); ffn_*: input channels of
    down_proj (a_j = act(gate) * up). head_token_norms[t, h] bounds the change of the residual at
    token t when head h goes: ||X_H^h[t] W_O^h^T||, times the attention output norm's scale s_t where
    the family has one (``output_norm_scales``); residual_norms[t] = ||h_t||, the post-attention
    residual that feeds the FFN. Where a branch's output passes a norm, *_scaled_sumsq hold the sums of
    (s_t x_t)^2 per channel, and ffn_out_scales the FFN output norm's s_t per token.
    """

    tokens: int = 0
    attn_sum: torch.Tensor | None = None
    attn_sumsq: torch.Tensor | None = None
    ffn_sum: torch.Tensor | None = None
    ffn_sumsq: torch.Tensor | None = None
    attn_scaled_sumsq: torch.Tensor | None = None
    ffn_scaled_sumsq: torch.Tensor | None = None
    output_sumsq: float = 0.0
    head_token_norms: list[torch.Tensor] = field(default_factory=list)
    residual_norms: list[torch.Tensor] = field(default_factory=list)
    ffn_out_scales: list[torch.Tensor] = field(default_factory=list)

    def attn_norms(self, centred: bool = False) -> torch.Tensor:
        """||X_H[:, c]|| over tokens (centred: ||X_H[:, c] - mean||)."""
        return _column_norms(self.attn_sum, self.attn_sumsq, self.tokens, centred)

    def ffn_norms(self, centred: bool = False) -> torch.Tensor:
        """||a_j|| over tokens (centred: ||a_j - mean||)."""
        return _column_norms(self.ffn_sum, self.ffn_sumsq, self.tokens, centred)

    def attn_change_norms(self, centred: bool = False) -> torch.Tensor:
        """Per o_proj input channel c, ||s X_H[:, c]||: times ||W_O[:, c]||, it bounds the change of the
        residual when c is zeroed (s = 1, exact, without an attention output norm)."""
        return _scaled(self.attn_norms, self.attn_scaled_sumsq, centred)

    def ffn_change_norms(self, centred: bool = False) -> torch.Tensor:
        """Per down_proj input channel j, ||s a_j||: times ||W_D[:, j]||, it bounds the change of the block
        output when j is zeroed (s = 1, exact, without an FFN output norm)."""
        return _scaled(self.ffn_norms, self.ffn_scaled_sumsq, centred)

    def attn_mean(self) -> torch.Tensor:
        return _collected(self.attn_sum, "o_proj") / self.tokens

    def ffn_mean(self) -> torch.Tensor:
        return _collected(self.ffn_sum, "down_proj") / self.tokens

    def per_token_head_norms(self) -> torch.Tensor:
        return torch.cat(self.head_token_norms)

    def per_token_residual_norms(self) -> torch.Tensor:
        return torch.cat(self.residual_norms)

    def per_token_ffn_out_scales(self) -> torch.Tensor:
        return torch.cat(self.ffn_out_scales)

    @property
    def output_norm(self) -> float:
        """||y||_F of the block output over all calibration tokens."""
        return self.output_sumsq ** 0.5


def _collected(total: torch.Tensor | None, projection: str) -> torch.Tensor:
    """A channel sum, which exists once a calibration forward has passed the projection's inputs."""
    if total is None:
        raise ValueError(f"no calibration statistics of {projection}'s inputs: run a calibration forward first")
    return total


def _scaled(plain: Callable[[bool], torch.Tensor], scaled_sumsq: torch.Tensor | None, centred: bool) -> torch.Tensor:
    """The plain channel norms where no output norm scales them, else the scaled ones (which are never
    centred: only families that hold output biases compensate, and none of them has an output norm)."""
    if scaled_sumsq is None:
        return plain(centred)
    if centred:
        raise ValueError("centred scores need bias compensation, which blocks with output norms cannot hold")
    return scaled_sumsq.sqrt()


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


class ProjectionInputs:
    """A projection's calibration inputs x~ (x~ = [x, 1] where it has a bias, else x) as the refit reads them:
    the rows themselves, float32, while there are fewer than columns; past that their Gram sum x~^T x~,
    float64, which takes columns^2 numbers however many tokens come (so the rows never take more than half
    of it). Few tokens are the small calibrations of large models, where the rows make the refit's solve
    tokens^2 x columns instead of columns^3 (surgery.refit_projection)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.gram_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Take one batch of rows x~ [tokens, columns] (float32)."""
        if self.gram_sum is None:
            x = x if self.rows is None else torch.cat([self.rows, x])
            if len(x) < x.shape[1]:
                self.rows = x
                return
            self.rows = None
        batch = x.T @ x  # float32, added into the float64 sum (see _gram_hooks)
        if self.gram_sum is None:
            self.gram_sum = batch.double()
        else:
            self.gram_sum.add_(batch)

    def gram(self) -> torch.Tensor:
        """x~^T x~ in float64 (formed from the rows where those are kept)."""
        if self.gram_sum is not None:
            return self.gram_sum
        rows = self.held().double()
        return rows.T @ rows

    def held(self) -> torch.Tensor:
        """What is kept: the rows or the Gram."""
        held = self.gram_sum if self.gram_sum is not None else self.rows
        if held is None:
            raise ValueError("no calibration inputs were taken")
        return held


@dataclass
class BlockGrams:
    """The calibration inputs of o_proj (``attn``) and of down_proj (``ffn``), as :class:`ProjectionInputs`;
    with the ones column for a projection that has a bias (so the last column of its Gram holds the input
    sums and the token count)."""

    attn: ProjectionInputs = field(default_factory=ProjectionInputs)
    ffn: ProjectionInputs = field(default_factory=ProjectionInputs)


@contextmanager
def _hooks(pre: Sequence[tuple[nn.Module, Callable]], post: Sequence[tuple[nn.Module, Callable]] = ()):
    """Forward pre-hooks hook(module, args) and forward hooks hook(module, args, output) meanwhile."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre]
    handles += [module.register_forward_hook(hook) for module, hook in post]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _stats_hooks(view: BlockView, stats: BlockStats):
    gram = _head_gram(view)

    def on_attn(_m, args, out):
        x = args[0].detach().float()
        flat = x.reshape(-1, x.shape[-1])
        stats.attn_sum = _accumulate(stats.attn_sum, flat.sum(0))
        stats.attn_sumsq = _accumulate(stats.attn_sumsq, flat.pow(2).sum(0))
        heads = flat.view(flat.shape[0], -1, view.head_dim)
        sq = torch.einsum("thi,hij,thj->th", heads, gram.to(heads.device), heads)
        norms = sq.clamp_min(0).sqrt().cpu()
        if view.attn_out_norm is not None:
            scales = output_norm_scales(view.attn_out_norm, out)
            stats.attn_scaled_sumsq = _accumulate(stats.attn_scaled_sumsq, _scaled_sumsq(flat, scales))
            norms = norms * scales.cpu()[:, None]
        stats.head_token_norms.append(norms)

    def on_residual(_m, args):
        h = args[0].detach().float()
        stats.residual_norms.append(h.reshape(-1, h.shape[-1]).norm(dim=-1).cpu())

    def on_ffn(_m, args, out):
        a = args[0].detach().float().reshape(-1, args[0].shape[-1])
        stats.tokens += a.shape[0]
        stats.ffn_sum = _accumulate(stats.ffn_sum, a.sum(0))
        stats.ffn_sumsq = _accumulate(stats.ffn_sumsq, a.pow(2).sum(0))
        if view.ffn_out_norm is not None:
            scales = output_norm_scales(view.ffn_out_norm, out)
            stats.ffn_scaled_sumsq = _accumulate(stats.ffn_scaled_sumsq, _scaled_sumsq(a, scales))
            stats.ffn_out_scales.append(scales.cpu())

    ffn_input = view.mlp_norm.module if view.mlp_norm is not None else view.mlp
    return _hooks(pre=[(ffn_input, on_residual)], post=[(view.o, on_attn), (view.down, on_ffn)])


def _scaled_sumsq(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_t (s_t x_t)^2 per channel, in float64, where the activations are (only the sum is moved)."""
    return (x.double() * scales[:, None]).pow(2).sum(0)


def _gram_hooks(view: BlockView, grams: BlockGrams | None):
    """Hooks that add each batch's inputs of o_proj and down_proj into ``grams`` (none when None).

    A batch's Gram is a float32 matmul, added into the float64 sum: a float64 matmul per batch is
    many times slower on CPUs, and float32 rounding within one batch is far below what the refit's
    damping changes."""

    def on(inputs: ProjectionInputs):
        def hook(linear: nn.Linear, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            inputs.add(F.pad(x, (0, 1), value=1.0) if linear.bias is not None else x)
        return hook

    return _hooks(pre=[] if grams is None else [(view.o, on(grams.attn)), (view.down, on(grams.ffn))])


@torch.no_grad()
def collect_block_stats(view: BlockView, inputs: BlockInputs,
                        grams: BlockGrams | None = None) -> tuple[BlockStats, BlockInputs]:
    """One forward pass of the block over the calibration inputs: its statistics and its outputs
    (and, given ``grams``, its projections' input Grams added into them)."""
    stats = BlockStats()
    with _stats_hooks(view, stats), _gram_hooks(view, grams):
        outputs = forward_block(view, inputs)
    stats.output_sumsq = sum(float(out.float().pow(2).sum()) for out, _ in outputs)
    _check_finite(view, stats.attn_sumsq, stats.ffn_sumsq)
    return stats, outputs


@torch.no_grad()
def collect_block_grams(view: BlockView, inputs: BlockInputs) -> tuple[BlockGrams, BlockInputs]:
    """One forward pass of the block over the calibration inputs: its projections' input Grams and its outputs."""
    grams = BlockGrams()
    with _gram_hooks(view, grams):
        outputs = forward_block(view, inputs)
    _check_finite(view, grams.attn.held(), grams.ffn.held())
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
    device = input_device(model)
    try:
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / ids.shape[0]).backward()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
