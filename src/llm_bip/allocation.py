"""How many units each prunable block loses: the allocations (``--allocation``) of a budget
(``--ratio``) over blocks, and the rounding of kept FFN widths (``--round-to``)."""

from __future__ import annotations

import math
from dataclasses import replace

from .errors import PruneError
from .options import AllocationOptions, Unit
from .ranking import ranking_keys
from .units import BlockUnits, removed_parameters


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


# a removable unit in the global ranking: (rank key, block, kind, parameters)
Candidate = tuple[float, int, Unit, int]


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
            candidates.append((float(attn_keys[k]), i, Unit.ATTENTION, u.attn_cost))
        for k in range(u.max_channels_removed(opts)):
            candidates.append((float(channel_keys[k]), i, Unit.CHANNEL, u.costs.channel))
    candidates.sort(key=lambda c: c[0])
    return candidates


def _take_in_rank_order(candidates: list[Candidate], counts: dict[int, list[int]], target: float,
                        slack: int) -> tuple[int, list[Candidate], list[tuple[int, int]]]:
    """Count ``candidates`` into ``counts`` in rank order until ``target`` parameters are removed; a unit that
    would overshoot by more than ``slack`` is deferred, with every later one of its block and kind. Returns
    (the parameters removed, the deferred units, the (block, cost) of every channel taken, in order)."""
    removed, deferred, channels_taken = 0, [], []
    blocked: set[tuple[int, Unit]] = set()
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
        if kind == Unit.CHANNEL:
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
        counts[i][Unit.CHANNEL] -= 1
        removed -= cost


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


# the allocations: how many units each block loses
COUNTS = {"uniform": uniform_counts, "block": block_counts, "global": global_counts}


def allocate(units: dict[int, BlockUnits], total: int, opts: AllocationOptions) -> dict[int, tuple[int, int]]:
    """How many attention units and FFN channels each pruned block loses.

    ``units`` holds the blocks that may be pruned; ``total`` is the prunable parameter count of
    all blocks, dense ones included, so the ratio is always of the whole stack.
    """
    counts = COUNTS[opts.allocation](units, opts, total)
    if opts.allocation == "uniform" or opts.round_to == 1:  # uniform rounds its widths itself, alike
        return counts
    return _rounded_counts(units, counts, opts.ratio * total, opts)
