"""Physical removal of heads and FFN channels, and the config that describes the result."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
from torch import nn

from .adapters import BlockView, ModelAdapter, Widths
from .allocation import LayerPlan


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, rows.to(linear.weight.device)).contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows.to(linear.bias.device)).contiguous())
    linear.out_features = rows.numel()


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
    q_idx = head_channels(plan.keep_heads, view.head_dim)
    kv_idx = head_channels(plan.keep_kv_heads, view.head_dim)
    ch_idx = torch.tensor(plan.keep_channels, dtype=torch.long)
    _keep_rows(view.q, q_idx)
    _keep_rows(view.k, kv_idx)
    _keep_rows(view.v, kv_idx)
    _keep_columns(view.o, q_idx)
    _keep_rows(view.gate, ch_idx)
    _keep_rows(view.up, ch_idx)
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
    stock = len(set(widths)) == 1 and adapter.allows_heads(config, widths[0].num_heads)
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
    heads = next(n for n in itertools.count(widest.num_heads) if adapter.allows_heads(config, n))
    return replace(widest, num_heads=heads)
