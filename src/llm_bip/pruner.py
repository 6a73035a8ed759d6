"""One pruning run over a loaded model: check the options against it, score (or take saved scores),
cut, and describe the result. The phases themselves are in engine.py."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .adapters import Widths, adapter_for
from .config import PruneConfig, PrunePlan
from .data import SELF
from .dispatch import blocks_of
from .engine import (
    Stack,
    add_compensation_biases,
    cut,
    cut_and_refit,
    needs_block_inputs,
    score,
    score_and_cut,
    size_counts,
)
from .errors import PruneError
from .gguf_layouts import serving
from .limits import check_calibration_memory, check_window
from .metrics import Metric, make_metric
from .offload import BlockStore
from .options import option_name
from .outputs import __version__, library_versions
from .profiling import PhaseLog
from .progress import ProgressStore
from .scores import ScoreRecord
from .selfcalib import calibration_batch
from .surgery import describe_widths
from .units import LayerPlan


@dataclass
class PruneResult:
    """What a pruning run did: sizes before/after, the per-layer plan, scores and costs."""

    config: PrunePlan  # the run's resolved options
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
            "config": self.config.as_dict(),
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


log = logging.getLogger(__name__)


@functools.cache
def note_heads_kept(model_type: str, reason: str) -> None:
    log.warning(f"{model_type} models keep every attention head ({reason}); only FFN channels are pruned")


class Pruner:
    """One pruning run over a loaded model. Construction checks every option against the model, with
    no data and no forward pass; ``run()`` prunes in place and returns the result. Given the ``record``
    of an earlier run's scores, it cuts from them without scoring. ``blocks`` says where the blocks'
    weights live (offload.py); by default all in memory, or as accelerate dispatched them (dispatch.py)."""

    def __init__(self, model, config: PruneConfig, record: ScoreRecord | None = None,
                 blocks: BlockStore | None = None):
        adapter = adapter_for(model.config)
        engine = serving(model.config) if config.target == "llamacpp" else None
        holds_biases = adapter.supports_compensation() and (engine is None or engine.output_biases)
        plan = config.plan(len(adapter.layers(model)), holds_biases, engine)
        self.stack = Stack(model, plan.keep_dense, blocks or blocks_of(model))
        self.plan, self.record = plan, record
        metric = make_metric(plan.metric, plan.score_options())
        self._check_against_model(metric)
        # reconstruction reads the calibration data even when the scores are given
        self.needs_data = plan.reconstruct or (record is None and (needs_block_inputs(plan, metric)
                                                                   or metric.needs_gradients))
        # compensation and reconstruction move what is cut into o_proj/down_proj biases, where the model can hold them
        self.output_biases = plan.compensate or (plan.reconstruct and holds_biases)
        if self.needs_data and plan.calibration == SELF and not self.stack.blocks.whole_model:
            raise PruneError("--calibration self samples text from the whole model, which --offload never holds "
                             "in memory; calibrate on a corpus or a file, or prune without --offload")
        self.sequential = plan.sequential and record is None and needs_block_inputs(plan, metric)
        self.alloc = plan.allocation_options()
        size_counts(self.stack, self.alloc)  # the budget can be met
        self.log = PhaseLog()

    def _check_against_model(self, metric: Metric) -> None:
        """Refuse, with no data and no forward pass, what this model cannot take: the metric, compensation, gradients
        through an offloaded model, scores made for another model or with other settings."""
        stack, plan, model = self.stack, self.plan, self.stack.model
        for i in stack.prunable:
            metric.check(stack.views[i])
        if stack.adapter.heads_kept_because:
            note_heads_kept(model.config.model_type, stack.adapter.heads_kept_because)
        if metric.needs_gradients and self.record is None:
            stack.blocks.check_gradients(plan.method)
        if plan.compensate:
            stack.adapter.check_compensation(model.config)
        if self.record is not None:
            self.record.check_matches(plan.scoring_settings(), [w.as_dict() for w in stack.widths()], stack.prunable)

    def calibration(self, tokenizer) -> torch.Tensor | None:
        """The calibration token ids this run needs (read with ``tokenizer``; for 'self', written by the model
        before it is pruned), or None when it needs none. Windows the model cannot take are refused first."""
        if not self.needs_data:
            return None
        self.check_calibration(self.plan.n_samples, self.plan.seqlen)
        return calibration_batch(self.stack.model, tokenizer, self.plan)

    def check_calibration(self, samples: int, seqlen: int) -> None:
        """Refuse calibration windows past the model's context, or a calibration forward past free memory
        (a run that reads no calibration data takes any)."""
        if not self.needs_data:
            return
        model = self.stack.model
        check_window(model.config, seqlen, option_name("seqlen"))
        for device in self.stack.blocks.compute_devices(model):
            check_calibration_memory(model.config, samples, seqlen, self.plan.batch_size, device)

    def run(self, calib: torch.Tensor | None = None, progress: ProgressStore | None = None) -> PruneResult:
        """Prune in place. ``calib``: token ids from ``calibration()`` (ignored when the run needs none);
        ``progress``: where an offloaded run keeps its progress, to resume after an interruption."""
        calib = calib if self.needs_data else None
        if self.needs_data and calib is None:
            needs = "reconstruction" if self.plan.reconstruct else f"method {self.plan.method}"
            raise ValueError(f"{needs} needs calibration token ids: pass calibration(tokenizer)")
        if calib is not None:
            self.check_calibration(*calib.shape)
        model, stack = self.stack.model, self.stack
        model_before = sum(p.numel() for p in model.parameters())
        widths_before, blocks_before = stack.widths(), stack.parameters()
        alloc = add_compensation_biases(stack, self.alloc) if self.output_biases else self.alloc
        record, plans = self._scores_and_plans(alloc, calib, progress)
        describe_widths(stack.adapter, model.config, stack.widths())
        params = {
            "blocks_before": blocks_before, "blocks_after": stack.parameters(),
            "model_before": model_before, "model_after": sum(p.numel() for p in model.parameters()),
        }
        tokens = 0 if calib is None else calib.numel()
        return PruneResult(self.plan, widths_before, stack.widths(), params, record, plans, self.log.phases, tokens)

    def _scores_and_plans(self, alloc, calib, progress) -> tuple[ScoreRecord, dict[int, LayerPlan]]:
        if self.sequential:
            return score_and_cut(self.stack, self.plan, alloc, calib, progress, self.log)
        if self.record is not None:
            record = self.record.only(self.stack.prunable)
        else:
            record = score(self.stack, self.plan, calib, progress, self.log)
        if self.plan.reconstruct:
            return record, cut_and_refit(self.stack, record, alloc, self.plan, calib, progress, self.log)
        with self.log.phase("surgery"):
            return record, cut(self.stack, record, alloc, self.plan.compensate)


def prune(model, tokenizer, config: PruneConfig | None = None, calib: torch.Tensor | None = None,
          record: ScoreRecord | None = None):
    """Prune ``model`` in place; returns (model, PruneResult). Works on an already loaded model;
    ``calib`` (token ids) overrides the calibration data the config names (read with ``tokenizer``);
    ``record`` (scores.load_scores) prunes from an earlier run's scores instead of scoring."""
    pruner = Pruner(model, config or PruneConfig(), record)
    return model, pruner.run(calib if calib is not None else pruner.calibration(tokenizer))
