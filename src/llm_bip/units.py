"""A block's removable units and what a block keeps.

Removable units: FFN channels, and attention units that keep every layer loadable by stock
attention code. ``gqa="groups"`` removes whole KV groups (a K/V head and its query heads);
``gqa="heads"`` removes the same number of query heads from every group, lowest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import BlockView, Widths
from .metrics import UnitScores
from .options import AllocationOptions, Gqa


@dataclass(frozen=True)
class BlockCosts:
    """Parameters owned by one query head, one K/V head and one FFN channel of a block."""

    head: int
    kv_head: int
    channel: int
    total: int

    @classmethod
    def of(cls, view: BlockView) -> "BlockCosts":
        def row(m):  # one output row of a linear map, with its bias entry
            return m.in_features + int(m.bias is not None)

        hd = view.head_dim
        return cls(
            head=hd * (row(view.q) + view.o.out_features),
            kv_head=hd * (row(view.k) + row(view.v)),
            channel=row(view.gate) + row(view.up) + view.down.out_features,
            total=view.prunable_parameters(),
        )


@dataclass
class BlockUnits:
    """One block's attention units and channels in removal order (least important first)."""

    widths: Widths
    costs: BlockCosts
    attn_scores: torch.Tensor
    attn_heads: list[list[int]]
    attn_kv_heads: list[list[int]]
    channel_scores: torch.Tensor
    channel_order: list[int]
    output_norm: float = 1.0

    @property
    def attn_cost(self) -> int:
        return len(self.attn_heads[0]) * self.costs.head + len(self.attn_kv_heads[0]) * self.costs.kv_head

    @property
    def max_attn_removed(self) -> int:
        """Every block keeps one attention unit."""
        return len(self.attn_heads) - 1

    def min_kept(self, opts: AllocationOptions) -> int:
        """The narrowest FFN width allowed: the least multiple of ``round_to`` that keeps ``min_channels``."""
        inter = self.widths.intermediate_size
        least = max(1, math.ceil(opts.min_channels * inter))
        return min(inter, opts.round_to * math.ceil(least / opts.round_to))

    def max_channels_removed(self, opts: AllocationOptions) -> int:
        return self.widths.intermediate_size - self.min_kept(opts)


@dataclass
class LayerPlan:
    """What one block keeps: query heads, K/V heads, FFN channels (sorted indices)."""

    keep_heads: list[int]
    keep_kv_heads: list[int]
    keep_channels: list[int]

    @property
    def widths(self) -> Widths:
        return Widths(len(self.keep_heads), len(self.keep_kv_heads), len(self.keep_channels))

    @classmethod
    def dense(cls, widths: Widths) -> "LayerPlan":
        w = widths
        return cls(list(range(w.num_heads)), list(range(w.num_kv_heads)), list(range(w.intermediate_size)))


def attention_units(widths: Widths, gqa: Gqa, heads_removable: bool = True) -> list[list[int]]:
    """The query heads of each attention unit as far as scores do not decide them: all heads where none is
    removable, whole KV groups (``gqa="groups"``, or multi-head attention), else single heads, of which
    ``block_units`` forms the per-group slots by score."""
    n_rep = widths.group_size
    if not heads_removable:
        return [list(range(widths.num_heads))]
    if _whole_groups(widths, gqa):
        return [list(range(g * n_rep, (g + 1) * n_rep)) for g in range(widths.num_kv_heads)]
    return [[h] for h in range(widths.num_heads)]


def _whole_groups(widths: Widths, gqa: Gqa) -> bool:
    """Whether an attention unit is a whole KV group (with its K/V head)."""
    return widths.num_kv_heads > 1 and (gqa == "groups" or widths.group_size == 1)


def block_units(widths: Widths, costs: BlockCosts, scores: UnitScores, gqa: Gqa,
                output_norm: float = 1.0, heads_removable: bool = True) -> BlockUnits:
    """Group head scores into removable attention units and order everything by score. Where heads are not
    removable, all of them form one unit, which every block keeps."""
    heads = scores.heads.double()
    kv = scores.kv_heads.double() if scores.kv_heads is not None else torch.zeros(widths.num_kv_heads)
    members = attention_units(widths, gqa, heads_removable)
    if not heads_removable:
        kv_members = [list(range(widths.num_kv_heads))]
    elif _whole_groups(widths, gqa):
        kv_members = [[g] for g in range(widths.num_kv_heads)]
    else:  # a single KV head, or per-group head slots: only query heads go
        n_rep = widths.group_size
        groups = [list(range(g * n_rep, (g + 1) * n_rep)) for g in range(widths.num_kv_heads)]
        by_score = [sorted(g, key=lambda h: float(heads[h])) for g in groups]
        members = [[order[s] for order in by_score] for s in range(n_rep)]
        kv_members = [[] for _ in range(n_rep)]
    unit_scores = torch.stack([heads[m].sum() + kv[k].sum() for m, k in zip(members, kv_members)])
    order = torch.argsort(unit_scores, stable=True).tolist()
    channel_order = torch.argsort(scores.channels.double(), stable=True).tolist()
    return BlockUnits(
        widths=widths, costs=costs,
        attn_scores=unit_scores[order], attn_heads=[members[i] for i in order],
        attn_kv_heads=[kv_members[i] for i in order],
        channel_scores=scores.channels.double()[channel_order], channel_order=channel_order,
        output_norm=output_norm,
    )


def removed_parameters(units: dict[int, BlockUnits], counts: dict[int, tuple[int, int]]) -> int:
    """Parameters removed by taking ``counts`` (attention units, FFN channels) from each block."""
    return sum(n_attn * units[i].attn_cost + n_ch * units[i].costs.channel for i, (n_attn, n_ch) in counts.items())


def select_units(u: BlockUnits, n_attn: int, n_channels: int) -> LayerPlan:
    """Remove the ``n_attn`` lowest attention units and ``n_channels`` lowest channels of a block."""
    drop_heads = {h for m in u.attn_heads[:n_attn] for h in m}
    drop_kv = {k for m in u.attn_kv_heads[:n_attn] for k in m}
    drop_ch = set(u.channel_order[:n_channels])
    w = u.widths
    return LayerPlan(
        keep_heads=[h for h in range(w.num_heads) if h not in drop_heads],
        keep_kv_heads=[k for k in range(w.num_kv_heads) if k not in drop_kv],
        keep_channels=[c for c in range(w.intermediate_size) if c not in drop_ch],
    )
