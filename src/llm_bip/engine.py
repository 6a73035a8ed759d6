"""The passes of a pruning run over a stack of decoder blocks, with one per-block record between them.

- ``score``: the calibration data runs down the dense stack once; returns a :class:`ScoreRecord` (every
  prunable block's unit scores, output norm and, for bias compensation, calibration means: what
  ``llm_bip_scores.safetensors`` holds). Refit-aware selection (``--selection refit``, selection.py)
  reorders each block's scores in the same pass, from the Grams of o_proj's and down_proj's inputs.
- ``cut``: allocates the budget by a record's scores and cuts the blocks.
- ``cut_and_refit`` (``--reconstruct``): the cut, then o_proj and down_proj of every cut block refit to
  the dense block's projection outputs (surgery.refit_projection) in one more pass on dense inputs.
- ``score_and_cut`` (``--sequential``): scoring and cutting fused, each block scored on the outputs of
  the blocks cut before it (and refit from the Grams of the same forward).

A pass reads a frozen :class:`PrunePlan`. Given a ProgressStore (offloaded runs) it continues after its
last completed block; in memory nothing is kept. One block's Grams (or input rows) are in memory at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, Widths, adapter_for
from .allocation import allocate
from .calibration import (
    BlockGrams,
    BlockInputs,
    BlockStats,
    accumulate_lm_gradients,
    capture_block_inputs,
    collect_block_grams,
    collect_block_stats,
    forward_block,
)
from .config import PrunePlan
from .metrics import Metric, UnitScores, make_metric
from .offload import BlockStore
from .options import AllocationOptions
from .profiling import PhaseLog
from .progress import Progress, ProgressStore
from .ranking import ranking_scores
from .scores import ScoreRecord
from .selection import refit_aware_scores
from .surgery import Projection, compensate_bias, prune_block, reconstruct
from .units import BlockCosts, BlockUnits, LayerPlan, block_units, select_units

STAGE_REFIT = "reconstruction"  # the one-shot reconstruction pass's progress (offloaded runs)


class Stack:
    """A model's decoder blocks as the engine sees them: their views, which ones may be cut (all but
    ``dense``), and where their weights live (``blocks``; by default all in memory)."""

    def __init__(self, model, dense: tuple[int, ...] = (), blocks: BlockStore | None = None):
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model.config)
        self.views = self.adapter.blocks(model)
        self.prunable = [i for i in range(len(self.views)) if i not in dense]
        self.blocks = blocks or BlockStore()

    def parameters(self) -> int:
        """Prunable parameters of all blocks, dense ones included: what the ratio is of."""
        return sum(v.prunable_parameters() for v in self.views)

    def widths(self) -> list[Widths]:
        return [v.widths for v in self.views]

    def weights(self) -> list[nn.Parameter]:
        return [m.weight for v in self.views for m in v.linears()]

    def units(self, scores: dict[int, UnitScores], norms: dict[int, float],
              alloc: AllocationOptions) -> dict[int, BlockUnits]:
        """The prunable blocks' removable units in removal order."""
        return {i: self.block_units(i, scores[i], alloc, norms.get(i, 1.0)) for i in self.prunable}

    def block_units(self, i: int, scores: UnitScores, alloc: AllocationOptions, output_norm: float = 1.0) -> BlockUnits:
        """Block ``i``'s removable units in removal order (by standardised scores where ``alloc`` ranks so)."""
        view = self.views[i]
        scores = ranking_scores(scores, view.head_dim, alloc.normalize)
        return block_units(view.widths, BlockCosts.of(view), scores, alloc.gqa, output_norm, view.heads_removable)


def size_counts(stack: Stack, alloc: AllocationOptions) -> dict[int, tuple[int, int]]:
    """Per-block removal counts from sizes alone: checks that the budget can be met, and is the
    uniform allocation (which depends on sizes only)."""
    equal = {i: UnitScores(torch.zeros(v.widths.num_heads), torch.zeros(v.widths.intermediate_size),
                           attn_channels=torch.zeros(v.widths.num_heads * v.head_dim))
             for i, v in enumerate(stack.views)}
    return allocate(stack.units(equal, {}, alloc), stack.parameters(), alloc)


def add_compensation_biases(stack: Stack, alloc: AllocationOptions) -> AllocationOptions:
    """Zero biases on every projection (Llama's flags declare all of them at once); returns ``alloc``
    with the ratio raised by their size, so that the ratio obtained is still of the original blocks."""
    keep = (1 - alloc.ratio) * stack.parameters()
    for view in stack.views:
        stack.adapter.add_output_biases(view)
    return replace(alloc, ratio=1 - keep / stack.parameters())


def needs_block_inputs(plan: PrunePlan, metric: Metric) -> bool:
    """Whether scoring passes calibration data through the blocks (for statistics, compensation means, the
    Grams of refit-aware selection or of sequential reconstruction; one-shot reconstruction makes its own pass)."""
    return (metric.needs_block_stats or plan.compensate or plan.selection == "refit"
            or (plan.sequential and plan.reconstruct))


def score(stack: Stack, plan: PrunePlan, calib: torch.Tensor | None, progress: ProgressStore | None = None,
          log: PhaseLog | None = None) -> ScoreRecord:
    """The scoring pass: every prunable block's scores on the calibration token ids ``calib``; no block changes."""
    log = log or PhaseLog()
    with _calibrated(stack, plan, calib, log) as (metric, inputs), log.phase("scoring"):
        return _scoring_pass(stack, plan, metric, inputs, progress)


def cut(stack: Stack, record: ScoreRecord, alloc: AllocationOptions, compensate: bool) -> dict[int, LayerPlan]:
    """The cutting pass: allocate the budget by ``record``'s scores and cut the prunable blocks in place
    (``compensate``: with FLAP's bias compensation from the record's means). Returns the plans."""
    plans = _plans(stack, record, alloc)
    _cut_blocks(stack, plans, range(len(stack.views)), record.means if compensate else None)
    return plans


def cut_and_refit(stack: Stack, record: ScoreRecord, alloc: AllocationOptions, plan: PrunePlan,
                  calib: torch.Tensor, progress: ProgressStore | None = None,
                  log: PhaseLog | None = None) -> dict[int, LayerPlan]:
    """The refitting pass: plan as ``cut`` does, then one pass down the stack on dense inputs.
    Each block runs dense once over the calibration data: that gives the Grams of its o_proj and
    down_proj inputs, and its outputs, the next block's inputs. Then it is cut to its plan (with bias
    compensation as planned) and its o_proj and down_proj are refit. Returns the plans.

    Costs one forward pass over the calibration data, the Grams' matmuls and two solves per block (columns^3,
    or tokens^2 x columns where there are fewer tokens than columns); holds one block, its inputs and outputs
    and its two projections' inputs (the rows, float32, with fewer tokens than columns, else Grams, float64,
    (width + 1)^2 each) at a time.
    Offloaded, it keeps its progress like the scoring pass and resumes after the last block it wrote."""
    plans = _plans(stack, record, alloc)
    means = record.means if plan.compensate else None
    with (log or PhaseLog()).phase("reconstruction"):
        start, inputs, _ = _progress(progress, STAGE_REFIT, _block_inputs(stack, calib, plan.batch_size), record)
        _recut(stack, plans, start, means)
        for i in tqdm(range(start, len(stack.views)), desc="reconstructing blocks"):
            view = stack.views[i]
            with stack.blocks.resident(i, write=True):
                if i in plans:
                    grams, outputs = collect_block_grams(view, inputs)
                    _cut(stack, i, plans[i], means, grams)
                else:
                    outputs = forward_block(view, inputs)
            if progress is not None:
                progress.save(STAGE_REFIT, Progress(i + 1, outputs, record))
            inputs = outputs
    return plans


def score_and_cut(stack: Stack, plan: PrunePlan, alloc: AllocationOptions, calib: torch.Tensor,
                  progress: ProgressStore | None = None,
                  log: PhaseLog | None = None) -> tuple[ScoreRecord, dict[int, LayerPlan]]:
    """The sequential pass, scoring and cutting fused: each block is scored on inputs that went through the
    blocks already cut, and cut right away. The counts per block come first: from sizes for the uniform
    allocation, otherwise from a dense scoring pass (a global ranking needs every block's scores)."""
    log = log or PhaseLog()
    with _calibrated(stack, plan, calib, log) as (metric, inputs), log.phase("scoring_and_surgery"):
        if alloc.allocation == "uniform":
            counts = size_counts(stack, alloc)
        else:
            dense = _scoring_pass(stack, plan, metric, inputs, progress)
            counts = allocate(stack.units(dense.scores, dense.norms, alloc), stack.parameters(), alloc)
        return _sequential_pass(stack, plan, metric, inputs, progress, counts)


@contextmanager
def _calibrated(stack: Stack, plan: PrunePlan, calib: torch.Tensor | None, log: PhaseLog):
    """(the run's metric, block 0's calibration inputs); for a metric that reads them, the LM-loss
    gradients are in the block weights' ``.grad`` meanwhile."""
    metric = make_metric(plan.metric, plan.score_options())
    try:
        if metric.needs_gradients:
            with log.phase("gradients"):
                accumulate_lm_gradients(stack.model, stack.weights(), calib, plan.batch_size)
        yield metric, _calibration_inputs(stack, plan, metric, calib, log)
    finally:
        for weight in stack.weights():
            weight.grad = None


def _calibration_inputs(stack: Stack, plan: PrunePlan, metric: Metric, calib: torch.Tensor | None,
                        log: PhaseLog) -> BlockInputs | None:
    """Block 0's inputs over the calibration data, or None when no block statistics are needed."""
    with log.phase("calibration_data"):
        return _block_inputs(stack, calib, plan.batch_size) if needs_block_inputs(plan, metric) else None


def _block_inputs(stack: Stack, calib: torch.Tensor, batch_size: int) -> BlockInputs:
    with stack.blocks.embedding_resident():
        return capture_block_inputs(stack.model, stack.adapter.layers(stack.model), calib, batch_size)


def _scoring_pass(stack: Stack, plan: PrunePlan, metric: Metric, inputs: BlockInputs | None,
                  progress: ProgressStore | None) -> ScoreRecord:
    """One pass down the dense stack: score every prunable block on its calibration inputs."""
    start, inputs, record = _resume(progress, "scoring", inputs, stack, plan)
    for i in tqdm(range(start, len(stack.views)), desc="scoring blocks"):
        with stack.blocks.resident(i, write=False):
            grams = BlockGrams() if plan.selection == "refit" and i in stack.prunable else None
            stats, outputs = _block_stats(stack.views[i], inputs, grams)
            if i in stack.prunable:
                _score_block(stack, plan, metric, record, i, stats, grams)
        if progress is not None:
            progress.save("scoring", Progress(i + 1, outputs, record))
        inputs = outputs
    return record


def _sequential_pass(stack: Stack, plan: PrunePlan, metric: Metric, inputs: BlockInputs | None,
                     progress: ProgressStore | None,
                     counts: dict[int, tuple[int, int]]) -> tuple[ScoreRecord, dict[int, LayerPlan]]:
    """One pass down the stack that cuts each prunable block right after scoring it, by ``counts`` (attention
    units and channels it loses), refit with ``plan.reconstruct`` from Grams of the same forward; the next block
    sees the cut block's outputs. Returns the record and the plans of the cut blocks."""
    start, inputs, record = _resume(progress, "sequential", inputs, stack, plan)
    means = record.means if plan.compensate else None
    alloc = plan.allocation_options()  # how units are grouped and ordered (its ratio is not read here)
    plans = {i: select_units(stack.block_units(i, s, alloc), *counts[i]) for i, s in record.scores.items()}
    _recut(stack, plans, start, means)
    for i in tqdm(range(start, len(stack.views)), desc="pruning blocks"):
        view = stack.views[i]
        with stack.blocks.resident(i, write=True):
            grams = BlockGrams() if plan.reconstruct and i in stack.prunable else None  # refit selection refits
            stats, outputs = _block_stats(view, inputs, grams)
            if i in stack.prunable:
                _score_block(stack, plan, metric, record, i, stats, grams)
                plans[i] = select_units(stack.block_units(i, record.scores[i], alloc), *counts[i])
                _cut(stack, i, plans[i], means, grams)
                outputs = forward_block(view, inputs)
        if progress is not None:
            progress.save("sequential", Progress(i + 1, outputs, record))
        inputs = outputs
    return record, plans


def _resume(progress: ProgressStore | None, stage: str, inputs: BlockInputs | None, stack: Stack,
            plan: PrunePlan) -> tuple[int, BlockInputs | None, ScoreRecord]:
    """Where the scoring pass ``stage`` starts: its next block, that block's inputs, and the record so far (the
    plan's settings, with the scores an interrupted run kept)."""
    record = ScoreRecord({}, {}, {}, plan.scoring_settings(), [w.as_dict() for w in stack.widths()])
    start, inputs, saved = _progress(progress, stage, inputs, record)
    return start, inputs, replace(record, scores=saved.scores, norms=saved.norms, means=saved.means)


def _block_stats(view, inputs: BlockInputs | None, grams: BlockGrams | None):
    """(the block's calibration statistics, its outputs), or (None, None) for a run without block inputs."""
    return collect_block_stats(view, inputs, grams) if inputs is not None else (None, None)


def _score_block(stack: Stack, plan: PrunePlan, metric: Metric, record: ScoreRecord, i: int,
                 stats: BlockStats | None, grams: BlockGrams | None) -> None:
    """Block ``i``'s scores (refit-aware: reordered by the error the refit leaves), output norm and, for
    bias compensation, calibration means, into ``record``."""
    view = stack.views[i]
    record.scores[i] = metric.score(view, stats, i)
    if plan.selection == "refit":
        record.scores[i] = refit_aware_scores(view, grams, record.scores[i], plan.gqa)
    record.norms[i] = stats.output_norm if stats is not None else 1.0
    if plan.compensate:
        record.means[i] = _calibration_means(stats)


def _calibration_means(stats: BlockStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's mean o_proj and down_proj inputs, for bias compensation (which always collects statistics)."""
    if stats is None:
        raise ValueError("bias compensation needs the block's calibration statistics")
    return stats.attn_mean(), stats.ffn_mean()


def _plans(stack: Stack, record: ScoreRecord, alloc: AllocationOptions) -> dict[int, LayerPlan]:
    """What every prunable block keeps, with the budget allocated by ``record``'s scores."""
    units = stack.units(record.scores, record.norms, alloc)
    counts = allocate(units, stack.parameters(), alloc)
    return {i: select_units(units[i], *counts[i]) for i in stack.prunable}


def _progress(progress: ProgressStore | None, stage: str, inputs: BlockInputs | None,
              record: ScoreRecord) -> tuple[int, BlockInputs | None, ScoreRecord]:
    """Where the pass ``stage`` stands (its next block, that block's inputs, the record so far): as an
    interrupted run left it, else at block 0 with ``inputs`` and ``record``."""
    done = progress.load(stage, inputs) if progress is not None else None
    return (done.next_block, done.inputs, done.record) if done is not None else (0, inputs, record)


def _recut(stack: Stack, plans: dict[int, LayerPlan], start: int, means: dict | None) -> None:
    """Before a pass that cuts blocks continues at block ``start``: the blocks before it, cut (offloaded:
    written) by the interrupted run, are cut again (their shapes); what it wrote of block ``start``, if
    anything, is forgotten, since every block is worked on from its dense weights."""
    _cut_blocks(stack, plans, range(start), means)
    if start < len(stack.views):
        stack.blocks.forget(start)


def _cut_blocks(stack: Stack, plans: dict[int, LayerPlan], blocks: range, means: dict | None) -> None:
    """Cut the planned ones of ``blocks``; every block is kept (offloaded: written out), dense or cut."""
    for i in tqdm(blocks, desc="cutting blocks", disable=stack.blocks.whole_model):
        with stack.blocks.resident(i, write=True):
            if i in plans:
                _cut(stack, i, plans[i], means)


def _cut(stack: Stack, i: int, plan: LayerPlan, means: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
         grams: BlockGrams | None = None) -> None:
    """Cut block ``i`` to ``plan``; with ``means``, first move the removed units' mean contribution into biases;
    with ``grams`` (of the dense block's projection inputs), then refit o_proj and down_proj (reconstruction)."""
    view = stack.views[i]
    dense = (Projection.of(view.o), Projection.of(view.down)) if grams is not None else None
    if means is not None:
        compensate_bias(view, plan, *means[i])
    prune_block(stack.adapter, view, plan)
    stack.views[i] = stack.adapter.block(stack.model, i)  # a fused projection's rows moved
    if grams is not None:
        reconstruct(stack.views[i], plan, dense, grams)
