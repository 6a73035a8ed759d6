"""Physical removal of heads and FFN channels, what keeps the cut block's output close (bias compensation,
least-squares reconstruction), and the config that describes the result."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import nn

from .adapters import BlockView, ModelAdapter, Rows, Widths
from .calibration import BlockGrams, ProjectionInputs
from .units import LayerPlan

# damping of the reconstruction's least squares: lambda = RIDGE * mean diagonal of G[K, K]
RIDGE = 0.01


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, rows.to(linear.weight.device)).contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows.to(linear.bias.device)).contiguous())
    linear.out_features = rows.numel()


def _keep_projection_rows(kept: list[tuple[Rows, torch.Tensor]]) -> None:
    """Keep the given rows (relative to each projection) of every projection; the projections that share a
    fused map are cut together, each keeping its place in it."""
    by_linear: dict[nn.Linear, list[torch.Tensor]] = {}
    for rows, idx in kept:
        by_linear.setdefault(rows.linear, []).append(idx + rows.start)
    for linear, parts in by_linear.items():
        _keep_rows(linear, torch.cat(parts))


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, cols.to(linear.weight.device)).contiguous())
    linear.in_features = cols.numel()


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a head-major projection."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def prune_block(adapter: ModelAdapter, view: BlockView, plan: LayerPlan) -> None:
    """Keep only the planned query heads, K/V heads and FFN channels of one block, in place."""
    if plan.widths == view.widths:
        return
    q_idx, ch_idx = kept_columns(view, plan)
    kv_idx = head_channels(plan.keep_kv_heads, view.head_dim)
    _keep_projection_rows([(view.q, q_idx), (view.k, kv_idx), (view.v, kv_idx), (view.gate, ch_idx), (view.up, ch_idx)])
    _keep_columns(view.o, q_idx)
    _keep_columns(view.down, ch_idx)
    adapter.set_widths(view, plan.widths)


@torch.no_grad()
def compensate_bias(view: BlockView, plan: LayerPlan, attn_mean: torch.Tensor, ffn_mean: torch.Tensor) -> None:
    """FLAP's bias compensation: keep the mean contribution of the units about to be removed,
    bias += W[:, removed] @ mean(x_removed), for o_proj and down_proj."""
    removed_heads = sorted(set(range(view.widths.num_heads)) - set(plan.keep_heads))
    removed_channels = sorted(set(range(view.widths.intermediate_size)) - set(plan.keep_channels))
    for linear, cols, mean in ((view.o, head_channels(removed_heads, view.head_dim), attn_mean),
                               (view.down, torch.tensor(removed_channels, dtype=torch.long), ffn_mean)):
        if cols.numel():
            w = linear.weight.detach().double()[:, cols.to(linear.weight.device)]
            shift = w @ mean[cols].to(w.device)
            linear.bias.add_(shift.to(linear.bias.dtype))


def kept_columns(view: BlockView, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The input columns of o_proj and of down_proj that ``plan`` keeps."""
    return head_channels(plan.keep_heads, view.head_dim), torch.tensor(plan.keep_channels, dtype=torch.long)


@dataclass(frozen=True)
class Projection:
    """A projection's weight and bias (None: it has none) as they were before the cut."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, linear: nn.Linear) -> "Projection":
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach(), bias)  # the cut replaces the weight, and leaves this one as it is


@torch.no_grad()
def reconstruct(view: BlockView, plan: LayerPlan, dense: tuple[Projection, Projection], grams: BlockGrams) -> None:
    """Refit o_proj and down_proj of a block just cut to ``plan`` to their ``dense`` outputs on the
    calibration inputs (``grams``: of the dense block's inputs to them); see ``refit_projection``."""
    sums = (grams.attn, grams.ffn)
    for linear, before, keep, gram in zip((view.o, view.down), dense, kept_columns(view, plan), sums):
        refit_projection(linear, before, keep, gram)


@torch.no_grad()
def refit_projection(linear: nn.Linear, dense: Projection, keep: torch.Tensor, inputs: ProjectionInputs) -> None:
    """Refit a cut projection's weight (its kept input columns ``keep`` of the dense one) and bias, where it
    has one, by damped least squares, so that its output matches the ``dense`` projection's on the
    calibration ``inputs`` x~ (= [x, 1] with a bias, else x), whose Gram is G = sum x~ x~^T.

    With W~ = [W, b0] (the dense weight and bias; llama's added zero biases where there were none) and K
    the kept columns plus the ones column: [W_K, b] = W~ G[:, K] (G[K, K] + lambda I)^-1, with
    lambda = RIDGE * mean(diag G[K, K]), in float64; from the rows themselves where there are fewer tokens
    than kept columns (``_refit_from_rows``). The refit replaces the cut as it stands (plain, or
    bias-compensated) only where its calibration squared error is not larger, so reconstruction never
    increases it; the cut also stays where the damped matrix is not positive definite (all kept inputs
    zero, no bias), and a projection that lost no column is left as it is."""
    if keep.numel() == dense.weight.shape[1]:
        return  # nothing cut: the projection is exact
    held = inputs.held()
    ones = linear.bias is not None
    cols = keep.to(held.device)
    if ones:
        cols = torch.cat([cols, cols.new_tensor([held.shape[-1] - 1])])
    target = augmented(dense.weight, dense.bias).to(held.device)
    cut = augmented(linear.weight, linear.bias).to(held.device)
    if inputs.rows is not None and len(inputs.rows) < len(cols):
        refit = _refit_from_rows(inputs.rows, cols, target, cut)
    else:
        refit = _refit_from_gram(inputs.gram(), cols, target, cut)
    if refit is None:
        return
    linear.weight.copy_(refit[:, :keep.numel()])
    if ones:
        linear.bias.copy_(refit[:, -1])


def _refit_from_gram(gram: torch.Tensor, cols: torch.Tensor, target: torch.Tensor,
                     cut: torch.Tensor) -> torch.Tensor | None:
    """The refit [W_K, b] from the Gram (a columns^3 solve), or None where it is not better than ``cut``."""
    rows = gram[cols]  # G[K, :]
    cross = rows @ target.T  # G[K, :] W~^T
    damped = rows[:, cols]
    del rows
    ridge = add_ridge(damped)
    factor, info = torch.linalg.cholesky_ex(damped)
    if info:
        return None
    refit = torch.cholesky_solve(cross, factor).T
    better = _error_change(refit, damped, ridge, cross) <= _error_change(cut, damped, ridge, cross)
    return refit if better else None


def _refit_from_rows(rows: torch.Tensor, cols: torch.Tensor, target: torch.Tensor,
                     cut: torch.Tensor) -> torch.Tensor | None:
    """The same refit from the inputs' rows X = x~ themselves (a tokens^2 x columns solve), or None where it is
    not better than ``cut``. With Y = X W~^T, the push-through identity gives the same weights as
    [W_K, b] = Y^T (X_K X_K^T + lambda I)^-1 X_K, and the refit's residual X_K [W_K, b]^T - Y is -lambda Z with
    Z = (X_K X_K^T + lambda I)^-1 Y, so its squared error is lambda^2 ||Z||^2."""
    x = rows.double()
    y = x @ target.T
    xk = x[:, cols]
    del x
    kernel = xk @ xk.T
    ridge = add_ridge(kernel, len(cols))
    factor, info = torch.linalg.cholesky_ex(kernel)
    if info:
        return None
    z = torch.cholesky_solve(y, factor)
    better = ridge ** 2 * z.pow(2).sum() <= (xk @ cut.T - y).pow(2).sum()
    return z.T @ xk if better else None


def augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W, b] in float64, or W alone where there is no bias."""
    weight = weight.double()
    return weight if bias is None else torch.cat([weight, bias.to(weight)[:, None]], dim=1)


def add_ridge(matrix: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Damp the square ``matrix`` in place, + lambda I with lambda = RIDGE * its trace / ``columns`` (by default
    its size: RIDGE * mean diag of the Gram G[K, K]; the rows' X_K X_K^T has the same trace over another size).
    No identity matrix is made: at 28,672 columns one is 6.6 GB in float64. Returns lambda."""
    diagonal = matrix.diagonal()
    ridge = RIDGE * (diagonal.mean() if columns is None else diagonal.sum() / columns)
    matrix.diagonal().add_(ridge)
    return ridge


def _error_change(b: torch.Tensor, damped: torch.Tensor, ridge: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The calibration squared error sum ||x~_K B^T - x~ W~^T||^2 of the weights B over the kept inputs, less
    its term tr(W~ G W~^T), which is the same for every B: tr(B G[K, K] B^T) - 2 tr(B G[K, :] W~^T), with
    G[K, K] = ``damped`` - ``ridge`` I."""
    return ((b @ damped) * b).sum() - ridge * (b * b).sum() - 2 * (b * cross.T).sum()


def describe_widths(adapter: ModelAdapter, config, widths: list[Widths]) -> None:
    """Write the block sizes into a model config.

    All blocks alike, with a head count the config class accepts: the stock fields, loadable by any
    transformers. Otherwise transformers' ``per_layer_config`` holds each block's sizes and the global
    fields stay at the widest block, its head count raised to the least one the class accepts
    (LlamaConfig: a divisor of hidden_size); no block is built from them.
    """
    config.per_layer_config = None
    config.allow_global_per_layer_attribute_access = False
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    stock = len(set(widths)) == 1 and adapter.allows(config, widths[0])
    for key, value in (widths[0] if stock else _global_widths(adapter, config, widths)).as_config().items():
        setattr(config, key, value)
    if stock:
        return
    config.per_layer_config = {i: w.as_config() for i, w in enumerate(widths)}
    # transformers 5.x LlamaConfig.validate_architecture reads num_attention_heads globally, so a
    # per-layer config can neither be saved nor loaded without this flag.
    config.allow_global_per_layer_attribute_access = True


def _global_widths(adapter: ModelAdapter, config, widths: list[Widths]) -> Widths:
    """A per-layer config's global fields: the widest block's sizes, with a head count ``config``'s class accepts."""
    widest = Widths(*(max(getattr(w, f) for w in widths) for f in ("num_heads", "num_kv_heads", "intermediate_size")))
    candidates = (replace(widest, num_heads=n) for n in itertools.count(widest.num_heads))
    return next(w for w in candidates if adapter.allows(config, w))
