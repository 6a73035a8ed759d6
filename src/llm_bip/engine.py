"""The two phases of pruning, with one per-block record between them.

``score`` runs the calibration data down the stack once and returns a :class:`ScoreRecord`: every
prunable block's unit scores, output norm and (for bias compensation) calibration means, which is
what ``llm_bip_scores.safetensors`` holds. ``cut`` allocates the budget by a record's scores and
cuts the blocks. ``score_and_cut`` is sequential mode, the two fused: each block is scored on the
outputs of the blocks cut before it. Given a ProgressStore (offloaded runs), a pass continues
after its last completed block; in memory nothing is kept.

Refit-aware selection (``--selection refit``, selection.py) reorders each block's scores in the same pass: the
method's values, handed out again in the greedy order of removal by the error the refit leaves (from the Grams
of o_proj's and down_proj's inputs, collected in that forward).

Reconstruction (``--reconstruct``) refits o_proj and down_proj of every cut block to the dense
block's projection outputs (surgery.refit_projection), from the Grams of their calibration inputs.
One-shot, ``cut_and_refit`` is a second pass down the stack on dense inputs; sequential, each block's
Grams come from the forward that collects its statistics. Either way one block's Grams are in memory
at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, Widths, adapter_for
from .allocation import (
    AllocationOptions,
    BlockCosts,
    BlockUnits,
    LayerPlan,
    allocate,
    block_units,
    ranking_scores,
    select_units,
)
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
from .config import PruneConfig
from .metrics import Metric, UnitScores, make_metric
from .offload import BlockStore
from .profiling import PhaseLog
from .progress import Progress, ProgressStore
from .scores import ScoreRecord
from .selection import refit_aware_scores
from .surgery import Projection, compensate_bias, prune_block, reconstruct

STAGE_REFIT = "reconstruction"  # the one-shot reconstruction pass's progress (offloaded runs)


class Stack:
    """A model's decoder blocks as the engine sees them: their views, which ones ``config`` lets be
    cut, and where their weights live (``blocks``; by default all in memory)."""

    def __init__(self, model, config: PruneConfig, blocks: BlockStore | None = None):
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model.config)
        self.views = self.adapter.blocks(model)
        dense = config.dense_layers(len(self.views))
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


def needs_block_inputs(config: PruneConfig, metric: Metric) -> bool:
    """Whether scoring passes calibration data through the blocks (for statistics, compensation means, the
    Grams of refit-aware selection or of sequential reconstruction; one-shot reconstruction makes its own pass)."""
    return (metric.needs_block_stats or bool(config.compensate) or config.selection == "refit"
            or bool(config.sequential and config.reconstruct))


def score(stack: Stack, config: PruneConfig, calib: torch.Tensor | None, progress: ProgressStore | None = None,
          log: PhaseLog | None = None) -> ScoreRecord:
    """Phase one: every prunable block's scores on the calibration token ids ``calib``; no block changes."""
    log = log or PhaseLog()
    with _calibrated(stack, config, calib, log) as (metric, inputs), log.phase("scoring"):
        return _pass(stack, config, metric, inputs, progress, "scoring")[0]


def cut(stack: Stack, record: ScoreRecord, alloc: AllocationOptions, compensate: bool) -> dict[int, LayerPlan]:
    """Phase two: allocate the budget by ``record``'s scores and cut the prunable blocks in place
    (``compensate``: with FLAP's bias compensation from the record's means). Returns the plans."""
    plans = _plans(stack, record, alloc)
    _cut_blocks(stack, plans, range(len(stack.views)), record.means if compensate else None)
    return plans


def cut_and_refit(stack: Stack, record: ScoreRecord, alloc: AllocationOptions, config: PruneConfig,
                  calib: torch.Tensor, progress: ProgressStore | None = None,
                  log: PhaseLog | None = None) -> dict[int, LayerPlan]:
    """Phase two with reconstruction: plan as ``cut`` does, then one pass down the stack on dense inputs.
    Each block runs dense once over the calibration data: that gives the Grams of its o_proj and
    down_proj inputs, and its outputs, the next block's inputs. Then it is cut to its plan (with bias
    compensation as configured) and its o_proj and down_proj are refit. Returns the plans.

    Costs one forward pass over the calibration data, the Grams' matmuls and two small solves per block;
    holds one block, its inputs and outputs and its two Grams (float64, (width + 1)^2 each) at a time.
    Offloaded, it keeps its progress like the scoring pass and resumes after the last block it wrote."""
    plans = _plans(stack, record, alloc)
    means = record.means if config.compensate else None
    with (log or PhaseLog()).phase("reconstruction"):
        start, inputs, _ = _progress(progress, STAGE_REFIT, _block_inputs(stack, calib, config.batch_size), record)
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


def score_and_cut(stack: Stack, config: PruneConfig, alloc: AllocationOptions, calib: torch.Tensor,
                  progress: ProgressStore | None = None,
                  log: PhaseLog | None = None) -> tuple[ScoreRecord, dict[int, LayerPlan]]:
    """Sequential mode: each block is scored on inputs that went through the blocks already cut,
    and cut right away. The counts per block come first: from sizes for the uniform allocation,
    otherwise from a dense scoring pass (a global ranking needs every block's scores)."""
    log = log or PhaseLog()
    with _calibrated(stack, config, calib, log) as (metric, inputs), log.phase("scoring_and_surgery"):
        if alloc.allocation == "uniform":
            counts = size_counts(stack, alloc)
        else:
            dense, _ = _pass(stack, config, metric, inputs, progress, "scoring")
            counts = allocate(stack.units(dense.scores, dense.norms, alloc), stack.parameters(), alloc)
        return _pass(stack, config, metric, inputs, progress, "sequential", counts)


@contextmanager
def _calibrated(stack: Stack, config: PruneConfig, calib: torch.Tensor | None, log: PhaseLog):
    """(the run's metric, block 0's calibration inputs); for a metric that reads them, the LM-loss
    gradients are in the block weights' ``.grad`` meanwhile."""
    metric = make_metric(config.metric, config.score_options())
    try:
        if metric.needs_gradients:
            with log.phase("gradients"):
                accumulate_lm_gradients(stack.model, stack.weights(), calib, config.batch_size)
        yield metric, _calibration_inputs(stack, config, metric, calib, log)
    finally:
        for weight in stack.weights():
            weight.grad = None


def _calibration_inputs(stack: Stack, config: PruneConfig, metric: Metric, calib: torch.Tensor | None,
                        log: PhaseLog) -> BlockInputs | None:
    """Block 0's inputs over the calibration data, or None when no block statistics are needed."""
    with log.phase("calibration_data"):
        return _block_inputs(stack, calib, config.batch_size) if needs_block_inputs(config, metric) else None


def _block_inputs(stack: Stack, calib: torch.Tensor, batch_size: int) -> BlockInputs:
    with stack.blocks.embedding_resident():
        return capture_block_inputs(stack.model, stack.adapter.layers(stack.model), calib, batch_size)


def _pass(stack: Stack, config: PruneConfig, metric: Metric, inputs: BlockInputs | None,
          progress: ProgressStore | None, stage: str,
          counts: dict[int, tuple[int, int]] | None = None) -> tuple[ScoreRecord, dict[int, LayerPlan]]:
    """One pass down the stack: score every prunable block on its calibration inputs.

    With ``counts`` (attention units and channels each block loses) each block is cut right after
    it is scored (and refit, with ``config.reconstruct``, from Grams of the same forward), and the next
    block sees the cut block's outputs. Returns the record and the plans of the cut blocks.
    """
    record = ScoreRecord({}, {}, {}, config.scoring_settings(), [w.as_dict() for w in stack.widths()])
    start, inputs, saved = _progress(progress, stage, inputs, record)
    record = replace(record, scores=saved.scores, norms=saved.norms, means=saved.means)
    means = record.means if config.compensate else None
    cutting = counts is not None
    alloc = config.allocation_options()  # how units are grouped and ordered (its ratio is not read here)
    plans = {}
    if counts is not None:
        plans = {i: select_units(stack.block_units(i, s, alloc), *counts[i]) for i, s in record.scores.items()}
        _recut(stack, plans, start, means)
    for i in tqdm(range(start, len(stack.views)), desc="pruning blocks" if cutting else "scoring blocks"):
        view = stack.views[i]
        with stack.blocks.resident(i, write=cutting):
            wants_grams = (cutting and config.reconstruct) or config.selection == "refit"
            grams = BlockGrams() if wants_grams and i in stack.prunable else None
            stats, outputs = collect_block_stats(view, inputs, grams) if inputs is not None else (None, None)
            if i in stack.prunable:
                record.scores[i] = metric.score(view, stats, i)
                if config.selection == "refit":
                    record.scores[i] = refit_aware_scores(view, grams, record.scores[i], config.gqa)
                record.norms[i] = stats.output_norm if stats is not None else 1.0
                if means is not None:
                    means[i] = _calibration_means(stats)
                if counts is not None:
                    plans[i] = select_units(stack.block_units(i, record.scores[i], alloc), *counts[i])
                    _cut(stack, i, plans[i], means, grams)
                    outputs = forward_block(view, inputs)
        if progress is not None:
            progress.save(stage, Progress(i + 1, outputs, record))
        inputs = outputs
    return record, plans


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
