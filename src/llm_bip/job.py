"""The prune job (``llm-bip prune`` as a library call): check, load, measure, prune, measure, write.

    summary = run_prune("smollm2", "runs/bip-20", PruneConfig(ratio=0.2))

writes the pruned model, its scores (llm_bip_scores.safetensors) and the summary
(llm_bip_summary.json) to the output folder atomically, and returns the summary. With
``offload=True`` one block is in memory at a time and the work is kept in ``OUT.partial``, so an
interrupted run continues with ``resume=True``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .config import PruneConfig, config_for_scores
from .data import check_calibration_source, check_text_source
from .devices import DeviceMap, check_device, parse_device_map
from .dispatch import DispatchedBlocks
from .errors import PruneError
from .evaluation import Perplexity, perplexity
from .limits import check_window
from .loading import load_model
from .offload import BlockStore, OffloadedBlocks, open_offloaded
from .outputs import SCORES_FILE, SUMMARY_FILE, check_apart_from_inputs, check_output_folder
from .profiling import PhaseLog
from .progress import ProgressStore, begin_work, partial_folder
from .pruner import Pruner, PruneResult
from .scores import ScoreRecord, load_scores, save_scores
from .sources import local_inputs

logger = logging.getLogger(__name__)


def check_prune_job(source: str, out: str | Path, config: PruneConfig, *, offload: bool, resume: bool,
                    overwrite: bool, scores: str | Path | None, eval_dataset: str | None, device: str,
                    dtype: str, device_map: str | dict | None = None) -> tuple[Path, str, DeviceMap | None]:
    """Every check that needs no model, run before anything is loaded: the options, the device or device map,
    an output folder (and offloaded work folder) apart from every input, readable calibration and evaluation
    text. ``config`` is the run's, with ``scores``' settings taken in. Returns the output folder, the perplexity
    dataset ("none": no perplexity) and the device map as accelerate takes it (None: none)."""
    dataset = _eval_dataset(eval_dataset, offload, resume)
    resolved = config.resolved()  # checks every option first
    check_device(device, dtype)
    placement = parse_device_map(device_map)
    _check_placement(placement, offload, device)
    calibration = config.calibration if scores is None or resolved.reconstruct else None
    inputs = local_inputs(source, calibration, scores, dataset)
    out = check_output_folder(out, overwrite, inputs)
    if offload:
        check_apart_from_inputs(partial_folder(out), inputs)
    if calibration is not None:
        check_calibration_source(calibration)
    if dataset != "none":
        check_text_source(dataset)
    return out, dataset, placement


def run_prune(source: str, out: str | Path, config: PruneConfig | None = None, *,
              offload: bool = False, resume: bool = False, overwrite: bool = False, scores: str | Path | None = None,
              eval_dataset: str | None = None, eval_seqlen: int = 128, eval_max_tokens: int | None = None,
              device: str = "cpu", dtype: str = "float32", device_map: str | dict | None = None,
              measure: Callable[..., Perplexity] = partial(perplexity, cache=True)) -> dict:
    """Prune a model and write it, its scores and its summary to ``out`` (``llm-bip prune``); every check that
    needs no model comes first. Progress lines go to the ``llm_bip.job`` logger.

    Args:
        source: a local folder, hub id, .gguf file or ``smollm2``.
        out: the output folder, written atomically.
        config: the pruning options (default ``PruneConfig()``).
        offload: one block in memory at a time, the work kept in ``OUT.partial``.
        resume: continue an interrupted offloaded run from ``OUT.partial``.
        overwrite: replace ``out`` (only a folder llm-bip wrote).
        scores: an earlier run's scores file or folder, to prune from instead of scoring.
        eval_dataset: perplexity before and after on it (default ptb, "none" to skip; offloaded: none).
        eval_seqlen: the perplexity window length.
        eval_max_tokens: score only the first N tokens of the text (default: all).
        device: torch device, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16".
        device_map: accelerate's placement over devices, not ``device``: "auto" or module -> device (JSON).
        measure: computes perplexity as ``evaluation.perplexity`` does (default: reusing a cached measurement).

    Returns:
        The summary written to ``out`` (llm_bip_summary.json).
    """
    config, record = _with_scores(config or PruneConfig(), scores)
    out, dataset, placement = check_prune_job(source, out, config, offload=offload, resume=resume,
                                              overwrite=overwrite, scores=scores, eval_dataset=eval_dataset,
                                              device=device, dtype=dtype, device_map=device_map)
    log = PhaseLog()
    with _opened(source, out, offload, dtype, device, placement, log) as (model, tokenizer, blocks):
        pruner = Pruner(model, config, record, blocks)  # checks every option against the model before any long work
        evals = Measurements(measure, dataset, eval_seqlen, eval_max_tokens, log)
        evals.check_window(model.config)
        calib = pruner.calibration(tokenizer)
        progress = _begin_offloaded(pruner, blocks, out, scores, resume, overwrite, device) if offload else None
        evals.take("dense", model, tokenizer)
        start = time.perf_counter()
        result, prune_wall = pruner.run(calib, progress), time.perf_counter() - start
        evals.take("pruned", model, tokenizer)
        summary = result.summary()
        summary.update(model=source, dtype=dtype, device=device, prune_wall_s=round(prune_wall, 3),
                       perplexity={k: v.as_dict() for k, v in evals.results.items()}, scores_file=SCORES_FILE,
                       scores_from=str(scores) if scores else None, offload=offload, device_map=blocks.placement())
        with log.phase("save"):
            blocks.save(model, tokenizer, out, overwrite, lambda tmp: _write_run_files(tmp, result, summary, log))
    return summary


def _with_scores(config: PruneConfig, scores: str | Path | None) -> tuple[PruneConfig, ScoreRecord | None]:
    """The run's config with the scoring settings of ``scores`` (an earlier run's) taken in, and its record."""
    record = load_scores(scores) if scores else None
    return (config if record is None else config_for_scores(config, record)), record


@contextmanager
def _opened(source: str, out: Path, offload: bool, dtype: str, device: str, device_map: DeviceMap | None,
            log: PhaseLog):
    """(model, tokenizer, block store) meanwhile: the whole model on ``device``; offloaded, its blocks read one
    at a time; or dispatched by ``device_map``, with the modules it maps to disk in a work folder next to
    ``out`` (removed after)."""
    folder = _offload_folder(out, device_map)
    try:
        with log.phase("load"):
            if offload:
                opened = open_offloaded(source, dtype, device, partial_folder(out))
            else:
                model, tokenizer = load_model(source, dtype, device, device_map=device_map, offload_folder=folder)
                opened = model, tokenizer, BlockStore() if device_map is None else DispatchedBlocks(model, device_map)
        yield opened
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _offload_folder(out: Path, device_map: DeviceMap | None) -> Path | None:
    """A fresh folder next to ``out`` for what a device map puts on disk (a strategy may), else None."""
    if device_map is None or not (isinstance(device_map, str) or "disk" in device_map.values()):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent))


def _check_placement(device_map: DeviceMap | None, offload: bool, device: str) -> None:
    """Refuse a device map beside --offload or another --device."""
    if device_map is None:
        return
    if offload:
        raise PruneError("--device-map and --offload are two ways to place the model: --offload holds one block "
                         "at a time on --device; to stream blocks from the disk to a map's devices, map them to "
                         "\"disk\" in --device-map")
    if device != "cpu":
        raise PruneError(f"--device {device} and --device-map both place the model; pass one of them")


def _begin_offloaded(pruner: Pruner, blocks: OffloadedBlocks, out: Path, scores: str | Path | None, resume: bool,
                     overwrite: bool, device: str) -> ProgressStore:
    """The offloaded run's work folder, started (or resumed) with the run's settings."""
    settings = {**blocks.settings(), **pruner.plan.as_dict(), "scores": str(scores) if scores else None}
    begin_work(blocks.partial, settings, resume, overwrite)
    progress = ProgressStore(blocks.partial, device)
    logger.info(f"offloaded: one block in memory at a time; work kept in {blocks.partial} until {out} is written "
                "(--resume continues an interrupted run)")
    return progress


@dataclass
class Measurements:
    """A prune job's perplexities (dense, pruned), each logged as it is measured; none for dataset "none"."""

    measure: Callable[..., Perplexity]
    dataset: str
    seqlen: int
    max_tokens: int | None
    log: PhaseLog
    results: dict[str, Perplexity] = field(default_factory=dict)

    def check_window(self, config) -> None:
        """Refuse perplexity windows longer than the model's context."""
        if self.dataset != "none":
            check_window(config, self.seqlen, "--eval-seqlen")

    def take(self, name: str, model, tokenizer) -> None:
        if self.dataset == "none":
            return
        with self.log.phase(f"eval_{name}"):
            self.results[name] = self.measure(model, tokenizer, self.dataset, "test", self.seqlen, self.max_tokens)
        logger.info(f"{name + ':':<7} {self.results[name]}")


def _write_run_files(folder: Path, result: PruneResult, summary: dict, log: PhaseLog) -> None:
    """The scores and the summary, next to the model; the summary's phases are complete up to the save."""
    save_scores(folder / SCORES_FILE, result.record)
    summary["phases"] = {**log.phases, **summary["phases"]}
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def _eval_dataset(eval_dataset: str | None, offload: bool, resume: bool) -> str:
    """The perplexity dataset: ptb by default, none offloaded (the whole model is never in memory)."""
    if resume and not offload:
        raise PruneError("--resume continues an interrupted --offload run; pass --offload too")
    if not offload:
        return eval_dataset or "ptb"
    if eval_dataset not in (None, "none"):
        raise PruneError("--offload never holds the whole model, so it cannot measure perplexity; "
                         "run llm-bip eval OUT afterwards")
    return "none"
