"""The pruning engine: calibrate block by block, score, allocate, cut, describe the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from tqdm.auto import tqdm

from .adapters import BlockView, ModelAdapter, Widths, adapter_for
from .allocation import AllocationOptions, BlockCosts, BlockUnits, LayerPlan, allocate, block_units, select_units
from .calibration import BlockInputs, accumulate_lm_gradients, capture_block_inputs, collect_block_stats, forward_block
from .data import calibration_ids
from .errors import PruneError
from .methods import METHODS, method_defaults
from .metrics import Metric, ScoreOptions, UnitScores, make_metric
from .offload import BlockStore, Progress
from .outputs import __version__, library_versions
from .profiling import PhaseLog
from .scores import SCORING_FIELDS, ScoreRecord
from .surgery import compensate_bias, describe_widths, prune_block


@dataclass
class PruneConfig:
    """Every choice of a pruning run; the CLI's options map onto these fields one to one."""

    ratio: float = 0.2
    method: str = "bip"
    # None: the method's own choice (methods.py)
    allocation: str | None = None
    normalize: str | None = None
    compensate: bool | str | None = None  # "auto": where the architecture can hold output biases
    keep_dense: list[int] | None = None
    lipschitz: str | None = None
    head_score: str | None = None
    gqa: str = "groups"
    sequential: bool = False
    calibration: str = "ptb"
    n_samples: int = 64
    seqlen: int = 512
    batch_size: int = 8
    min_channels: float = 0.05
    round_to: int = 1
    seed: int = 0

    def resolved(self) -> "PruneConfig":
        """A copy with every option left to the method filled in from the method's definition."""
        defaults = method_defaults(self.method)
        chosen = {k: defaults[k] for k, v in asdict(self).items() if v is None}
        return replace(self, **chosen)

    @property
    def metric(self) -> str:
        return METHODS[self.method]["metric"]

    def allocation_options(self) -> AllocationOptions:
        return AllocationOptions(
            ratio=self.ratio, allocation=self.allocation, gqa=self.gqa, normalize=self.normalize,
            min_channels=self.min_channels, round_to=self.round_to,
        )

    def score_options(self) -> ScoreOptions:
        return ScoreOptions(lipschitz=self.lipschitz, head_score=self.head_score, centred=self.compensate,
                            seed=self.seed)

    def validate(self, num_layers: int) -> list[int]:
        """Check the options that need no model pass; return the indices of layers kept dense."""
        if not 0 < self.ratio < 1:
            raise PruneError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.n_samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise PruneError("--samples, --seqlen and --batch-size must be positive (seqlen at least 2)")
        if self.round_to < 1 or not 0 <= self.min_channels < 1:
            raise PruneError("--round-to must be >= 1 and --min-channels in [0, 1)")
        dense = set()
        for i in self.keep_dense or []:
            if not -num_layers <= i < num_layers:
                raise PruneError(f"--keep-dense layer {i} out of range for {num_layers} layers")
            dense.add(i % num_layers)
        return sorted(dense)


@dataclass
class PruneResult:
    """What a pruning run did: sizes before/after, the per-layer plan, scores and costs."""

    config: PruneConfig
    widths_before: list[Widths]
    widths_after: list[Widths]
    params: dict[str, int]
    record: ScoreRecord
    plans: dict[int, LayerPlan]
    phases: dict[str, dict[str, float]]
    calibration_tokens: int

    @property
    def block_ratio(self) -> float:
        return 1 - self.params["blocks_after"] / self.params["blocks_before"]

    def summary(self) -> dict:
        """JSON-ready record of the run."""
        return {
            "llm_bip_version": __version__,
            "config": asdict(self.config),
            "parameters": {**self.params, "block_ratio_removed": round(self.block_ratio, 6)},
            "layers": [
                {"layer": i, "before": b.as_dict(), "after": a.as_dict()}
                for i, (b, a) in enumerate(zip(self.widths_before, self.widths_after))
            ],
            "calibration": {
                "source": self.config.calibration, "samples": self.config.n_samples,
                "seqlen": self.config.seqlen, "tokens": self.calibration_tokens, "seed": self.config.seed,
            },
            "phases": self.phases,
            "versions": library_versions(),
        }



def count_block_params(views: list[BlockView]) -> int:
    return sum(v.prunable_parameters() for v in views)


class Pruner:
    """One pruning run over a loaded model. Construction checks every option (and reads the
    calibration text); ``run()`` prunes in place and returns the result. Given the ``record`` of an
    earlier run's scores, it prunes from them with no data and no forward pass. ``blocks`` says
    where the blocks' weights live (offload.py); by default all in memory."""

    def __init__(self, model, tokenizer, config: PruneConfig, calib: torch.Tensor | None = None,
                 record: ScoreRecord | None = None, blocks: BlockStore | None = None):
        config = config.resolved()
        self.adapter: ModelAdapter = adapter_for(model.config)
        if config.compensate == "auto":
            config = replace(config, compensate=self.adapter.supports_compensation(model.config))
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.views = [self.adapter.block(model, i) for i in range(len(self.adapter.layers(model)))]
        self.dense = config.validate(len(self.views))
        self.prunable = [i for i in range(len(self.views)) if i not in self.dense]
        self.metric: Metric = make_metric(config.metric, config.score_options())
        self.blocks = blocks or BlockStore()
        if self.metric.needs_gradients and record is None and not self.blocks.whole_model:
            raise PruneError(f"--method {config.method} needs gradients through the whole model, which --offload "
                             "never holds in memory; choose another method or prune without --offload")
        if config.compensate:
            self.adapter.check_compensation(model.config)
        self.alloc = config.allocation_options()
        self.record = record
        if record is not None:
            record.check_matches(self.scoring_settings(), [v.widths.as_dict() for v in self.views], self.prunable)
        self.collect_stats = self.metric.needs_block_stats or config.compensate
        needs_data = (self.collect_stats or self.metric.needs_gradients) and record is None
        if calib is None and needs_data:
            calib = calibration_ids(tokenizer, config.calibration, config.n_samples, config.seqlen, config.seed)
        self.calib = calib if needs_data else None
        self.means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.log = PhaseLog()
        self.size_counts = self._size_counts()

    def scoring_settings(self) -> dict:
        return {k: getattr(self.config, k) for k in SCORING_FIELDS}

    def _size_counts(self) -> dict[int, tuple[int, int]]:
        """Per-block counts from sizes alone: checks the budget, and is the uniform allocation."""
        return allocate(self._all_units(self._placeholder_scores(), {}), self._total(), self.alloc)

    def _total(self) -> int:
        return count_block_params(self.views)

    def _placeholder_scores(self) -> dict[int, UnitScores]:
        """All-equal scores: enough to check budgets and to count uniform allocations, which
        depend on sizes only."""
        return {i: UnitScores(torch.zeros(v.widths.num_heads), torch.zeros(v.widths.intermediate_size))
                for i, v in enumerate(self.views)}

    def run(self) -> PruneResult:
        model_before = sum(p.numel() for p in self.model.parameters())
        widths_before = [v.widths for v in self.views]
        blocks_before = self._total()
        if self.config.compensate:
            self._add_compensation_biases(blocks_before)
        if self.metric.needs_gradients and self.record is None:
            with self.log.phase("gradients"):
                accumulate_lm_gradients(self.model, self._block_weights(), self.calib, self.config.batch_size)
        try:
            plans, scores, norms = self._prune()
        finally:
            for weight in self._block_weights():
                weight.grad = None
        describe_widths(self.model.config, [v.widths for v in self.views])
        params = {
            "blocks_before": blocks_before, "blocks_after": self._total(),
            "model_before": model_before, "model_after": sum(p.numel() for p in self.model.parameters()),
        }
        tokens = 0 if self.calib is None else self.calib.numel()
        record = ScoreRecord(scores, norms, self.means, self.scoring_settings(), [w.as_dict() for w in widths_before])
        return PruneResult(self.config, widths_before, [v.widths for v in self.views], params, record, plans,
                           self.log.phases, tokens)

    def _add_compensation_biases(self, blocks_before: int) -> None:
        """Zero biases on every projection (Llama's flags declare all of them at once), with the
        budget raised by their size so the ratio obtained is still of the original blocks."""
        for view in self.views:
            self.adapter.add_output_biases(view)
        keep = (1 - self.config.ratio) * blocks_before
        self.alloc = replace(self.alloc, ratio=1 - keep / self._total())
        self.size_counts = self._size_counts()

    def _prune(self) -> tuple[dict[int, LayerPlan], dict[int, UnitScores], dict[int, float]]:
        """(plans, scores, output norms) of the prunable blocks, which are cut in place."""
        if self.record is not None:
            scores = {i: self.record.scores[i] for i in self.prunable}
            norms = {i: self.record.norms[i] for i in self.prunable}
            self.means = {i: m for i, m in self.record.means.items() if i in scores}
        else:
            with self.log.phase("calibration_data"):
                inputs = self._calibration_inputs()
            if self.config.sequential and inputs is not None:
                with self.log.phase("scoring_and_surgery"):
                    return self._prune_sequentially(inputs)
            with self.log.phase("scoring"):
                scores, norms, _ = self._score_blocks(inputs)
        with self.log.phase("surgery"):
            units = self._all_units(scores, norms)
            counts = allocate(units, self._total(), self.alloc)
            plans = {i: select_units(units[i], *counts[i]) for i in self.prunable}
            self._cut_blocks(plans, range(len(self.views)))
        return plans, scores, norms

    def _block_weights(self) -> list[torch.nn.Parameter]:
        return [m.weight for v in self.views for m in v.linears()]

    def _calibration_inputs(self) -> BlockInputs | None:
        if not self.collect_stats:
            return None
        with self.blocks.embedding_resident():
            return capture_block_inputs(self.model, self.views[0].layer, self.calib, self.config.batch_size)

    def _all_units(self, scores: dict[int, UnitScores], norms: dict[int, float]) -> dict[int, BlockUnits]:
        return {i: self._units(i, scores[i], norms.get(i, 1.0)) for i in self.prunable}

    def _units(self, i: int, scores: UnitScores, output_norm: float = 1.0) -> BlockUnits:
        view = self.views[i]
        allowed = partial(self.adapter.allows_heads, view.hidden_size)
        return block_units(view.widths, BlockCosts.of(view), scores, self.alloc.gqa, allowed, output_norm)

    def _cut(self, i: int, plan: LayerPlan) -> None:
        if self.config.compensate:
            compensate_bias(self.views[i], plan, *self.means[i])
        prune_block(self.adapter, self.views[i], plan)

    def _cut_blocks(self, plans: dict[int, LayerPlan], blocks: range) -> None:
        """Cut the planned ones of ``blocks``; every block is kept (offloaded: written out), dense or cut."""
        for i in tqdm(blocks, desc="cutting blocks", disable=self.blocks.whole_model):
            with self.blocks.resident(i, write=True):
                if i in plans:
                    self._cut(i, plans[i])

    def _score_blocks(self, inputs: BlockInputs | None, counts: dict[int, tuple[int, int]] | None = None):
        """Score every prunable block on its calibration inputs, in one pass down the stack.

        With ``counts`` each block is cut right after it is scored, and the next block sees the
        pruned block's outputs (sequential mode). A pass interrupted in an offloaded run continues
        after its last completed block. Returns (scores, output norms, plans).
        """
        stage = "scoring" if counts is None else "sequential"
        done = self.blocks.load_progress(stage, inputs)
        scores, norms, inputs = done.scores, done.norms, done.inputs
        self.means.update(done.means)
        plans = {}
        if counts is not None:  # blocks cut before the interruption are cut again (their shapes, offloaded)
            plans = {i: select_units(self._units(i, s), *counts[i]) for i, s in scores.items()}
            self._cut_blocks(plans, range(done.next_block))
        desc = "scoring blocks" if counts is None else "pruning blocks"
        for i in tqdm(range(done.next_block, len(self.views)), desc=desc):
            view = self.views[i]
            with self.blocks.resident(i, write=counts is not None):
                stats, outputs = collect_block_stats(view, inputs) if inputs is not None else (None, None)
                if i in self.prunable:
                    scores[i] = self.metric.score(view, stats, i)
                    norms[i] = stats.output_norm if stats is not None else 1.0
                    if self.config.compensate:
                        self.means[i] = (stats.attn_mean(), stats.ffn_mean())
                    if counts is not None:
                        plans[i] = select_units(self._units(i, scores[i]), *counts[i])
                        self._cut(i, plans[i])
                        outputs = forward_block(view.layer, inputs)
                self.blocks.save_progress(stage, Progress(i + 1, outputs, scores, norms, self.means))
            inputs = outputs
        return scores, norms, plans

    def _prune_sequentially(self, inputs: BlockInputs):
        """Counts per block first (global allocation needs a dense scoring pass for them), then
        score-and-cut block by block on inputs that went through the already pruned blocks."""
        counts = self.size_counts
        if self.alloc.allocation != "uniform":
            scores, norms, _ = self._score_blocks(inputs)
            counts = allocate(self._all_units(scores, norms), self._total(), self.alloc)
        scores, norms, plans = self._score_blocks(inputs, counts)
        return plans, scores, norms


def config_for_scores(config: PruneConfig, record: ScoreRecord) -> PruneConfig:
    """``config`` with every scoring setting it leaves at its default taken from ``record`` (a
    setting given explicitly must then agree with the record: the Pruner checks)."""
    defaults = PruneConfig()
    return replace(config, **{k: v for k, v in record.settings.items() if getattr(config, k) == getattr(defaults, k)})


def prune(model, tokenizer, config: PruneConfig | None = None, calib: torch.Tensor | None = None,
          record: ScoreRecord | None = None):
    """Prune ``model`` in place; returns (model, PruneResult). Works on an already loaded model;
    ``record`` (scores.load_scores) prunes from an earlier run's scores instead of scoring."""
    result = Pruner(model, tokenizer, config or PruneConfig(), calib, record).run()
    return model, result

