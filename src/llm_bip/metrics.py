"""Importance metrics: each maps one block's weights and calibration statistics to unit scores.

A metric scores every query head and every FFN channel of a block; grouping heads into the
units that are actually removed (KV groups or per-group head slots) is the allocator's job.
New metrics subclass :class:`Metric` and register with :func:`register_metric`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import BlockView, Norm, Rows
from .calibration import BlockStats
from .errors import PruneError
from .options import ScoreOptions

# Upper bound of |act'(u)| for SiLU (1.0998), GELU (1.1289) and GELU-tanh (1.1290); all satisfy |act(u)| <= |u|.
ACTIVATION_SLOPE_BOUND = 1.13


@dataclass
class UnitScores:
    """Importance of every query head and every FFN channel of one block (higher = keep).

    ``kv_heads``: the score of each K/V head's own weights, added to an attention unit's score only
    when the unit removes that K/V head (a whole KV group, or any head of multi-head attention).
    ``attn_channels``: the per-channel values a head score is made of (one per input channel of
    o_proj), for rankings that standardise over channels (``--normalize channels``).
    """

    heads: torch.Tensor
    channels: torch.Tensor
    kv_heads: torch.Tensor | None = None
    attn_channels: torch.Tensor | None = None

    @classmethod
    def of_channels(cls, attn_channels: torch.Tensor, channels: torch.Tensor, head_dim: int,
                    kv_channels: torch.Tensor | None = None) -> "UnitScores":
        """Scores whose heads (and K/V heads) are the sums of their channels' values."""
        kv_heads = None if kv_channels is None else _per_head(kv_channels, head_dim)
        return cls(_per_head(attn_channels, head_dim), channels, kv_heads, attn_channels)


class Metric:
    """Base class: override :meth:`score`. ``needs_block_stats`` = False skips the forward pass;
    ``needs_gradients`` = True makes the engine accumulate LM-loss gradients in ``.grad`` first."""

    name: str = ""
    needs_block_stats: bool = True
    needs_gradients: bool = False

    def __init__(self, options: ScoreOptions):
        self.options = options

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        raise NotImplementedError

    def check(self, view: BlockView) -> None:
        """A PruneError, before any data is read, where this metric cannot score the block."""

    def block_stats(self, stats: BlockStats | None) -> BlockStats:
        """``stats``, which a metric that ``needs_block_stats`` is always given."""
        if stats is None:
            raise ValueError(f"the {self.name} metric scores from calibration statistics; none were collected")
        return stats


METRICS: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    METRICS[cls.name] = cls
    return cls


def make_metric(name: str, options: ScoreOptions) -> Metric:
    """The registered metric ``name`` (a method's ``metric``) with ``options``."""
    return METRICS[name](options)


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Column L2 norms in float64 on the CPU, where calibration statistics live."""
    return weight.detach().double().norm(dim=0).cpu()


def _row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().pow(2).sum(1).cpu()


def _per_head(values: torch.Tensor, head_dim: int) -> torch.Tensor:
    return values.view(-1, head_dim).sum(-1)


def spectral_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().float(), ord=2))


def ffn_lipschitz_spectral(view: BlockView) -> float:
    """The paper's L_FFN = ||W_U||_2 * ||W_D||_2 (ignores the gate and the norm's gain)."""
    return spectral_norm(view.up.weight) * spectral_norm(view.down.weight)


def ffn_lipschitz_on_ball(view: BlockView) -> float:
    """A true Lipschitz constant of z -> W_D(act(W_G z) * W_U z) on ||z|| <= max|g| sqrt(d).

    RMSNorm's output always lies in that ball. The Jacobian is
    W_D [diag(act'(W_G z) * W_U z) W_G + diag(act(W_G z)) W_U], bounded with |act'| <= c,
    |act(u)| <= |u| and |(W z)_i| <= ||W_i|| ||z||.
    """
    gain = float(_ffn_input_norm(view).gain().abs().max())
    radius = gain * view.hidden_size ** 0.5
    wg, wu = view.gate.weight.detach().float(), view.up.weight.detach().float()
    row_g, row_u = float(wg.norm(dim=1).max()), float(wu.norm(dim=1).max())
    inner = ACTIVATION_SLOPE_BOUND * spectral_norm(wg) * row_u + spectral_norm(wu) * row_g
    return spectral_norm(view.down.weight) * radius * inner


def _ffn_input_norm(view: BlockView) -> Norm:
    """The norm before the FFN, which the certified bounds go through (``BipMetric.check`` refuses blocks
    without one)."""
    if view.mlp_norm is None:
        raise PruneError("certified bounds go through the norm before the FFN, which this block does not have")
    return view.mlp_norm


def certified_head_bounds(view: BlockView, stats: BlockStats) -> torch.Tensor:
    """Upper bound on ||Δy||_F when one query head is removed, token by token.

    Δy_t = -Δ_t + F(N(h_t - Δ_t)) - F(N(h_t)), with Δ_t the head's change of the residual h_t (bounded
    through the attention output norm where there is one: ``output_norm_scales``). Without an FFN output
    norm: along the segment ||x|| >= ||h_t|| - ||Δ_t||, so the FFN norm's Jacobian norm is at most
    max|g| / sqrt((||h_t|| - ||Δ_t||)_+^2 / d + eps). With one (P, Gemma's sandwich): F's input moves
    by at most 2 max|g| ||Δ_t|| / r(h_t) (r: the RMS with eps, the same argument as for P), and P's
    output by at most s_t times F's output change (s_t: P's scale at the dense output).
    """
    deltas = stats.per_token_head_norms().double()
    residual = stats.per_token_residual_norms().double().unsqueeze(1)
    norm = _ffn_input_norm(view)
    gain, eps, lipschitz = float(norm.gain().abs().max()), norm.eps, ffn_lipschitz_on_ball(view)
    if view.ffn_out_norm is None:
        floor = (residual - deltas).clamp_min(0).pow(2) / view.hidden_size + eps
        factor = 1 + lipschitz * gain / floor.sqrt()
    else:
        rms = (residual.pow(2) / view.hidden_size + eps).sqrt()
        factor = 1 + lipschitz * 2 * gain / rms * stats.per_token_ffn_out_scales().double().unsqueeze(1)
    return (factor * deltas).pow(2).sum(0).sqrt()


def exact_head_norms(view: BlockView, stats: BlockStats, centred: bool) -> torch.Tensor:
    """||X_h W_O^h^T||_F per head; centred: ||(X_h - mean X_h) W_O^h^T||_F, the change left after
    bias compensation (sum of squares minus tokens * ||mean contribution||^2)."""
    sq = stats.per_token_head_norms().double().pow(2).sum(0)
    if centred:
        hd = view.head_dim
        w = view.o.weight.detach().double().cpu().view(view.hidden_size, -1, hd)
        mean_delta = torch.einsum("dhi,hi->hd", w, stats.attn_mean().view(-1, hd))
        sq = sq - stats.tokens * mean_delta.pow(2).sum(1)
    return sq.clamp_min(0).sqrt()


@register_metric
class BipMetric(Metric):
    """LLM-BIP: block-output change bounded through the residual and the FFN's Lipschitz constant."""

    name = "bip"

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        stats = self.block_stats(stats)
        centred = self.options.centred
        channels = stats.ffn_change_norms(centred) * _column_norms(view.down.weight)
        return UnitScores(heads=self.head_scores(view, stats), channels=channels,
                          attn_channels=self.channel_bounds(view, stats))

    def channel_bounds(self, view: BlockView, stats: BlockStats) -> torch.Tensor:
        """||X_H[:, c]|| * ||W_O[:, c]|| per attention channel c (centred when compensating)."""
        return stats.attn_change_norms(self.options.centred) * _column_norms(view.o.weight)

    def check(self, view: BlockView) -> None:
        if self.options.lipschitz == "certified" and view.mlp_norm is None:
            raise PruneError("--lipschitz certified bounds the FFN through the norm before it, which this "
                             "family's blocks do not have (OLMo 2); use --lipschitz spectral or none")

    def head_scores(self, view: BlockView, stats: BlockStats) -> torch.Tensor:
        lipschitz, head_score = self.options.lipschitz, self.options.head_score
        if lipschitz == "certified":
            return certified_head_bounds(view, stats)
        factor = {"spectral": lambda: 1 + ffn_lipschitz_spectral(view), "none": lambda: 1.0}
        if head_score == "exact":
            return exact_head_norms(view, stats, self.options.centred) * factor[lipschitz]()
        return _per_head(self.channel_bounds(view, stats), view.head_dim) * factor[lipschitz]()


@register_metric
class MagnitudeMetric(Metric):
    """Squared L2 norm of all weights a unit owns (same order as the norm): a query head's rows of
    W_Q and columns of W_O, plus its K/V head's rows where the unit removes it; an FFN channel's
    rows of W_G and W_U and column of W_D."""

    name = "magnitude"
    needs_block_stats = False

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        hd = view.head_dim
        per_channel = _row_sq_norms(view.q.weight) + _column_norms(view.o.weight).pow(2)
        kv = _row_sq_norms(view.k.weight) + _row_sq_norms(view.v.weight)
        ffn = _row_sq_norms(view.gate.weight) + _row_sq_norms(view.up.weight) + _column_norms(view.down.weight).pow(2)
        return UnitScores.of_channels(per_channel, ffn, hd, kv)


@register_metric
class RandomMetric(Metric):
    """Uniform random scores, seeded per block: the floor every method must beat."""

    name = "random"
    needs_block_stats = False

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        gen = torch.Generator().manual_seed(self.options.seed * 100_003 + index)
        widths = view.widths
        attn_channels = torch.rand(widths.num_heads * view.head_dim, generator=gen, dtype=torch.float64)
        channels = torch.rand(widths.intermediate_size, generator=gen, dtype=torch.float64)
        return UnitScores.of_channels(attn_channels, channels, view.head_dim)


def _abs_column_sums(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().abs().sum(0).cpu()


@register_metric
class WandaSpMetric(Metric):
    """Wanda-sp (FLAP's lib/prune.py, prune_wanda_sp): per input channel j of o_proj / down_proj,
    the sum over rows of |W[i, j]| * ||x_j|| (the reference's mean over rows and root-mean-square
    input: the same up to a factor per layer); a head is the sum of its channels."""

    name = "wanda-sp"

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        stats = self.block_stats(stats)
        attn_channels = _abs_column_sums(view.o.weight) * stats.attn_norms()
        channels = _abs_column_sums(view.down.weight) * stats.ffn_norms()
        return UnitScores.of_channels(attn_channels, channels, view.head_dim)


def fluctuation(norms_centred: torch.Tensor, weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """FLAP's WIFV per input channel j: Var_tokens(x_j) * ||W[:, j]||^2."""
    return norms_centred.pow(2) / tokens * _column_norms(weight).pow(2)


@register_metric
class FlapMetric(Metric):
    """FLAP (lib/prune.py, metric WIFV): WIFV per input channel of down_proj, and WIFV squared once
    more per input channel of o_proj, as the reference computes them; a head's own score is the
    sum of its channels, but FLAP ranks by channels (``--normalize channels``)."""

    name = "flap"

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        stats = self.block_stats(stats)
        attn_channels = fluctuation(stats.attn_norms(centred=True), view.o.weight, stats.tokens).pow(2)
        channels = fluctuation(stats.ffn_norms(centred=True), view.down.weight, stats.tokens)
        return UnitScores.of_channels(attn_channels, channels, view.head_dim)


def _taylor(projection: Rows | nn.Linear, dim: int) -> torch.Tensor:
    """sum |w * dL/dw| over a projection's weights along ``dim`` (1: per output row, 0: per input column)."""
    grad = projection.grad if isinstance(projection, Rows) else projection.weight.grad
    if grad is None:
        raise PruneError("llm-pruner scores need gradients; none were accumulated")
    return (projection.weight.detach().double() * grad.double()).abs().sum(dim).cpu()


@register_metric
class TaylorMetric(Metric):
    """LLM-Pruner: first-order Taylor importance sum |w * dL/dw| over the unit's weights."""

    name = "llm-pruner"
    needs_gradients = True

    def score(self, view: BlockView, stats: BlockStats | None, index: int) -> UnitScores:
        hd = view.head_dim
        per_channel = _taylor(view.q, 1) + _taylor(view.o, 0)
        kv = _taylor(view.k, 1) + _taylor(view.v, 1)
        ffn = _taylor(view.gate, 1) + _taylor(view.up, 1) + _taylor(view.down, 0)
        return UnitScores.of_channels(per_channel, ffn, hd, kv)
