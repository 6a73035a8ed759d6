"""Turn unit scores into a pruning plan: how many units each block loses, and which.

Removable units: FFN channels, and attention units that keep every layer loadable by stock
attention code. ``gqa="groups"`` removes whole KV groups (a K/V head and its query heads);
``gqa="heads"`` removes the same number of query heads from every group, lowest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .adapters import BlockView, Widths
from .errors import PruneError
from .metrics import UnitScores


@dataclass(frozen=True)
class AllocationOptions:
    ratio: float
    allocation: str = "uniform"  # uniform | block | global
    gqa: str = "groups"  # groups | heads
    normalize: str = "none"  # none | output | zscore | channels | log-channels: see ranking_keys
    min_channels: float = 0.05  # fraction of FFN channels every block keeps
    round_to: int = 1  # kept FFN widths a multiple of this (or the block's full width)


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


def attention_units(widths: Widths, gqa: str, heads_removable: bool = True) -> list[list[int]]:
    """The query heads of each attention unit as far as scores do not decide them: all heads where none is
    removable, whole KV groups (``gqa="groups"``, or multi-head attention), else single heads, of which
    ``block_units`` forms the per-group slots by score."""
    if gqa not in ("heads", "groups"):
        raise PruneError(f"unknown --gqa {gqa!r}; use groups or heads")
    n_rep = widths.group_size
    if not heads_removable:
        return [list(range(widths.num_heads))]
    if _whole_groups(widths, gqa):
        return [list(range(g * n_rep, (g + 1) * n_rep)) for g in range(widths.num_kv_heads)]
    return [[h] for h in range(widths.num_heads)]


def _whole_groups(widths: Widths, gqa: str) -> bool:
    """Whether an attention unit is a whole KV group (with its K/V head)."""
    return widths.num_kv_heads > 1 and (gqa == "groups" or widths.group_size == 1)


def block_units(widths: Widths, costs: BlockCosts, scores: UnitScores, gqa: str,
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


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise PruneError(f"--ratio must be in (0, 1), got {ratio}")


def uniform_counts(units: dict[int, BlockUnits], opts: AllocationOptions, total: int) -> dict[int, tuple[int, int]]:
    """Same attention-unit and channel counts removed in every pruned block.

    The attention share follows the ratio (the nearest whole number of units whose remainder the
    FFN channels can make up); channels make up the rest of each block's budget, so the ratio
    obtained is the ratio asked for within half a channel per pruned block. With ``round_to`` N
    every block keeps the multiple of N nearest its exact width, the same in every block: within
    half a step (N / 2 channels) per pruned block, the nearest a uniform width can come.
    """
    prunable = sum(u.costs.total for u in units.values())
    block_ratio = opts.ratio * total / prunable
    return {i: _uniform_block_counts(i, u, block_ratio, opts) for i, u in units.items()}


def block_counts(units: dict[int, BlockUnits], opts: AllocationOptions, total: int) -> dict[int, tuple[int, int]]:
    """Every pruned block loses the same share of its parameters (as in uniform), but which heads
    and channels go is decided by ranking them jointly inside the block (as in global)."""
    prunable = sum(u.costs.total for u in units.values())
    block_opts = replace(opts, ratio=opts.ratio * total / prunable)
    return {i: global_counts({i: u}, block_opts, u.costs.total)[i] for i, u in units.items()}


def _uniform_block_counts(i: int, u: BlockUnits, block_ratio: float, opts: AllocationOptions) -> tuple[int, int]:
    budget = block_ratio * u.costs.total
    max_channels = u.max_channels_removed(opts)

    def channels_for(n_attn: int) -> float:
        """FFN channels (fractional) that complete the block's budget after ``n_attn`` attention units."""
        return max(0.0, (budget - n_attn * u.attn_cost) / u.costs.channel)

    feasible = [n for n in range(u.max_attn_removed + 1) if round(channels_for(n)) <= max_channels]
    if not feasible:
        raise PruneError(
            f"ratio {opts.ratio} would empty layer {i}: it would need {round(channels_for(u.max_attn_removed))} "
            f"of {u.widths.intermediate_size} FFN channels removed (at most {max_channels})"
        )
    n_attn = min(feasible, key=lambda n: abs(n - block_ratio * len(u.attn_heads)))
    inter = u.widths.intermediate_size
    return n_attn, inter - _nearest_width(u, inter - channels_for(n_attn), opts)


# --normalize values that rank by channel-standardised scores: whether they standardise logarithms
CHANNEL_RANKINGS = {"channels": False, "log-channels": True}


def ranking_scores(scores: UnitScores, head_dim: int, normalize: str) -> UnitScores:
    """The scores a block's units are ordered and ranked by: ``scores`` themselves, or their channel
    standardisation where ``normalize`` ranks so."""
    return standardised(scores, head_dim, CHANNEL_RANKINGS[normalize]) if normalize in CHANNEL_RANKINGS else scores


def standardised(scores: UnitScores, head_dim: int, log: bool = False) -> UnitScores:
    """FLAP's standardisation: every attention channel's and every FFN channel's value standardised
    over the block's channels of its module; a head scores the mean of its channels' values.
    ``log``: standardise the logarithms, so that any power of the scores ranks alike."""
    if scores.attn_channels is None:
        raise PruneError("--normalize channels needs per-channel attention scores, which this metric does not give")
    values = _log_scores if log else torch.Tensor.double
    attn = _zscore(values(scores.attn_channels))
    return UnitScores(heads=attn.view(-1, head_dim).mean(-1), channels=_zscore(values(scores.channels)))


def _log_scores(x: torch.Tensor) -> torch.Tensor:
    """log of non-negative scores; zeros sit a factor 1e6 below the smallest positive score."""
    x = x.double()
    floor = x[x > 0].min() * 1e-6 if (x > 0).any() else x.new_tensor(1.0)
    return x.clamp_min(floor).log()


def ranking_keys(u: BlockUnits, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ranking keys of a block's attention units and channels (in removal order).

    none: score per parameter; output: the same relative to the block's ||y||; channels (FLAP):
    scores standardised per block and module over channels (``standardised``), an attention unit
    keyed by the mean over its heads; log-channels: the same over the scores' logarithms; zscore:
    scores standardised per block and module over removable units (degenerate with few units:
    kept for the earlier ``bip`` default).
    """
    if normalize in CHANNEL_RANKINGS:
        return u.attn_scores / len(u.attn_heads[0]), u.channel_scores
    if normalize == "zscore":
        return _zscore(u.attn_scores), _zscore(u.channel_scores)
    if normalize not in ("none", "output"):
        raise PruneError(f"unknown --normalize {normalize!r}; use none, output, zscore, channels or log-channels")
    scale = u.output_norm if normalize == "output" else 1.0
    return u.attn_scores / scale / u.attn_cost, u.channel_scores / scale / u.costs.channel


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)


# a removable unit in the global ranking: (rank key, block, kind: 0 attention unit / 1 FFN channel, parameters)
Candidate = tuple[float, int, int, int]


def global_counts(units: dict[int, BlockUnits], opts: AllocationOptions, total: int) -> dict[int, tuple[int, int]]:
    """Remove the units of least rank key across all blocks until the budget is met.

    Heads and channels compete in one ranking; within a block units go in score order, so the
    greedy knapsack never removes a unit before a lower-keyed one of the same kind. A head unit
    that would overshoot the budget by more than one channel is skipped; one that must still go
    (finer units ran out) takes back the highest-keyed channels it makes unnecessary. So the ratio
    obtained is the ratio asked within one channel (``allocate`` then rounds the widths).
    """
    candidates = _ranked_candidates(units, opts)
    target = opts.ratio * total
    slack = max(u.costs.channel for u in units.values())
    counts = {i: [0, 0] for i in units}
    removed, deferred, channels_taken = _take_in_rank_order(candidates, counts, target, slack)
    removed = _take_deferred(deferred, counts, removed, target)
    if removed < target:
        raise PruneError(f"ratio {opts.ratio:.4g} would empty layers: at most {removed / total:.3f} of the block "
                         "parameters can be removed with the per-layer minimums")
    _return_spare_channels(counts, channels_taken, removed, target)
    return {i: (a, c) for i, (a, c) in counts.items()}


def _ranked_candidates(units: dict[int, BlockUnits], opts: AllocationOptions) -> list[Candidate]:
    """Every removable unit of every block, by rank key (lowest first; a block's own units in removal order)."""
    candidates = []
    for i, u in units.items():
        attn_keys, channel_keys = ranking_keys(u, opts.normalize)
        for k in range(u.max_attn_removed):
            candidates.append((float(attn_keys[k]), i, 0, u.attn_cost))
        for k in range(u.max_channels_removed(opts)):
            candidates.append((float(channel_keys[k]), i, 1, u.costs.channel))
    candidates.sort(key=lambda c: c[0])
    return candidates


def _take_in_rank_order(candidates: list[Candidate], counts: dict[int, list[int]], target: float,
                        slack: int) -> tuple[int, list[Candidate], list[tuple[int, int]]]:
    """Count ``candidates`` into ``counts`` in rank order until ``target`` parameters are removed; a unit that
    would overshoot by more than ``slack`` is deferred, with every later one of its block and kind. Returns
    (the parameters removed, the deferred units, the (block, cost) of every channel taken, in order)."""
    removed, deferred, channels_taken = 0, [], []
    blocked: set[tuple[int, int]] = set()
    for candidate in candidates:
        _key, i, kind, cost = candidate
        if removed >= target:
            break
        if (i, kind) in blocked or removed + cost > target + slack:
            blocked.add((i, kind))  # a coarse unit would overshoot: finer ones fill the rest first,
            deferred.append(candidate)  # and later units of this block and kind wait behind it
            continue
        counts[i][kind] += 1
        removed += cost
        if kind == 1:
            channels_taken.append((i, cost))
    return removed, deferred, channels_taken


def _take_deferred(deferred: list[Candidate], counts: dict[int, list[int]], removed: int, target: float) -> int:
    """Count the deferred units into ``counts`` until ``target`` is met (only when finer units could not meet
    it); returns the parameters removed then."""
    for _key, i, kind, cost in deferred:
        if removed >= target:
            break
        counts[i][kind] += 1
        removed += cost
    return removed


def _return_spare_channels(counts: dict[int, list[int]], channels_taken: list[tuple[int, int]], removed: int,
                           target: float) -> None:
    """Give back the last channels taken for as long as ``target`` stays met without them (a deferred
    attention unit can make them unnecessary)."""
    while channels_taken and removed - channels_taken[-1][1] >= target:
        i, cost = channels_taken.pop()
        counts[i][1] -= 1
        removed -= cost


def removed_parameters(units: dict[int, BlockUnits], counts: dict[int, tuple[int, int]]) -> int:
    """Parameters removed by taking ``counts`` (attention units, FFN channels) from each block."""
    return sum(n_attn * units[i].attn_cost + n_ch * units[i].costs.channel for i, (n_attn, n_ch) in counts.items())


def _nearest_width(u: BlockUnits, kept: float, opts: AllocationOptions) -> int:
    """The allowed FFN width nearest ``kept`` (ties: the wider): a multiple of ``round_to`` from the
    block's minimum up, or the block's full width."""
    n, inter = opts.round_to, u.widths.intermediate_size
    below, above = (min(inter, max(u.min_kept(opts), n * step(kept / n))) for step in (math.floor, math.ceil))
    return below if kept - below < above - kept else above


def _next_width(u: BlockUnits, width: int, opts: AllocationOptions, wider: bool) -> int | None:
    """The allowed FFN width one step of ``round_to`` wider or narrower than ``width``; None past the block's limits."""
    n, inter = opts.round_to, u.widths.intermediate_size
    if wider:
        return min(inter, n * (width // n + 1)) if width < inter else None
    return n * (math.ceil(width / n) - 1) if width > u.min_kept(opts) else None


def _rounded_counts(units: dict[int, BlockUnits], counts: dict[int, tuple[int, int]], target: float,
                    opts: AllocationOptions) -> dict[int, tuple[int, int]]:
    """``counts`` with every kept FFN width on the ``round_to`` grid and the total still at ``target``.

    Each width is rounded to the nearest allowed one; then, while the removed parameters miss the
    target by more than half a step, the block whose rounding came closest to going the other way
    moves one step (largest-remainder rounding). So the ratio obtained is the ratio asked within
    half a step (``round_to`` channels of one block), and the blocks stay next to their allocation.
    """
    exact = {i: units[i].widths.intermediate_size - n_ch for i, (_, n_ch) in counts.items()}
    kept = {i: _nearest_width(units[i], width, opts) for i, width in exact.items()}

    def rounded() -> dict[int, tuple[int, int]]:
        return {i: (n_attn, units[i].widths.intermediate_size - kept[i]) for i, (n_attn, _) in counts.items()}

    excess = removed_parameters(units, rounded()) - target
    while move := _repair_move(units, exact, kept, excess, opts):
        i, width = move
        excess += (kept[i] - width) * units[i].costs.channel
        kept[i] = width
    return rounded()


def _repair_move(units: dict[int, BlockUnits], exact: dict[int, int], kept: dict[int, int], excess: float,
                 opts: AllocationOptions) -> tuple[int, int] | None:
    """(block, new width) of the step that brings the removed parameters nearer the target and whose
    block was rounded furthest the other way; None when no step gets nearer."""
    wider = excess > 0  # too much removed: some block keeps a step more
    moves = []
    for i, width in kept.items():
        step = _next_width(units[i], width, opts, wider)
        if step is not None and abs(step - width) * units[i].costs.channel < 2 * abs(excess):
            moves.append((exact[i] - width if wider else width - exact[i], i, step))
    return max(moves, key=lambda m: m[0])[1:] if moves else None


def allocate(units: dict[int, BlockUnits], total: int, opts: AllocationOptions) -> dict[int, tuple[int, int]]:
    """How many attention units and FFN channels each pruned block loses.

    ``units`` holds the blocks that may be pruned; ``total`` is the prunable parameter count of
    all blocks, dense ones included, so the ratio is always of the whole stack.
    """
    _check_ratio(opts.ratio)
    if not units:
        raise PruneError("every layer is kept dense: nothing to prune")
    count_fns = {"uniform": uniform_counts, "block": block_counts, "global": global_counts}
    if opts.allocation not in count_fns:
        raise PruneError(f"unknown --allocation {opts.allocation!r}; use {', '.join(count_fns)}")
    counts = count_fns[opts.allocation](units, opts, total)
    if opts.allocation == "uniform" or opts.round_to == 1:  # uniform rounds its widths itself, alike
        return counts
    return _rounded_counts(units, counts, opts.ratio * total, opts)


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
