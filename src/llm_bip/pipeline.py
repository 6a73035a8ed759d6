"""Prune, then recover, in one run (``llm-bip prune ... --recover STEPS``):

    summary = run_prune_and_recover("smollm2", "runs/bip-20", PruneConfig(ratio=0.2), DistillConfig(max_steps=480))

The pruned model is written to ``OUT.pruned`` first (a complete prune output), then distilled from the
model it was pruned from into ``OUT``; ``OUT.pruned`` is removed once ``OUT`` is written. An interrupted
run continues with ``resume=True`` at the phase it stopped in: a finished ``OUT.pruned`` is not pruned
again, and distillation continues from its last checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PruneConfig
from .errors import PruneError
from .job import run_prune
from .limits import context_length
from .loading import read_config
from .outputs import OUTPUT_MARKER, SUMMARY_FILE, check_output_folder, check_replaceable
from .recovery import DistillConfig, run_distill
from .sources import local_inputs, resolve_source
from .training import checkpoint_folder

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def pruned_stage(out: Path) -> Path:
    """Where the pruned, not yet recovered, model waits: a sibling of the output."""
    return out.parent / f"{out.name}.pruned"


def is_finished(folder: Path) -> bool:
    """True for a folder a prune run completed (written atomically: marker and summary present)."""
    return (folder / OUTPUT_MARKER).is_file() and (folder / SUMMARY_FILE).is_file()


def within_context(recovery: DistillConfig, source: str) -> DistillConfig:
    """``recovery`` with its training windows no longer than the model's context (``--recover`` has no
    window option: it trains on distill's default windows, or on the whole context where that is shorter)."""
    context = context_length(read_config(source, resolve_source(source)))
    return recovery if context is None or recovery.seqlen <= context else replace(recovery, seqlen=context)


def run_prune_and_recover(source: str, out: str | Path, config: PruneConfig, recovery: DistillConfig, *,
                          resume: bool = False, overwrite: bool = False, eval_dataset: str | None = None,
                          eval_seqlen: int = 128, eval_max_tokens: int | None = None, device: str = "cpu",
                          dtype: str = "float32", callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Prune ``source`` as ``run_prune`` does, then distil it into ``out`` (``llm-bip prune --recover``).
    Progress lines go to the ``llm_bip`` loggers.

    Args:
        source: a local folder, hub id, .gguf file or ``smollm2``.
        out: the output folder, written atomically; the pruned model waits in ``OUT.pruned``.
        config: the pruning options.
        recovery: the distillation's options (its windows cut to the model's context).
        resume: continue an interrupted run at the phase it stopped in.
        overwrite: replace ``out`` and an earlier run's ``OUT.pruned`` and checkpoints.
        eval_dataset: perplexity before and after both phases (default ptb, "none" to skip).
        eval_seqlen: the perplexity window length.
        eval_max_tokens: score only the first N tokens of the text (default: all).
        device: torch device, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16".
        callbacks: transformers TrainerCallbacks of the distillation.

    Returns:
        The summary written to ``out``: the prune's, plus a "distill" section.
    """
    out = Path(out)
    stage = pruned_stage(out)
    recovery = within_context(recovery, source)
    check_output_folder(out, overwrite, local_inputs(source, recovery.data))
    if stage.exists():
        check_replaceable(stage)  # a folder llm-bip did not write is never replaced
    if resume and is_finished(stage):
        logger.info(f"resuming: {stage} holds the pruned model; recovering it")
    elif stage.exists() and not (resume or overwrite):
        raise PruneError(f"{stage} holds an earlier run's pruned model; pass --resume to continue that run or "
                         "--overwrite to start over")
    else:
        summary = run_prune(source, stage, config, overwrite=True, eval_dataset=eval_dataset, eval_seqlen=eval_seqlen,
                            eval_max_tokens=eval_max_tokens, device=device, dtype=dtype)
        logger.info(f"pruned: {summary['parameters']['block_ratio_removed']:.2%} of block parameters removed; "
                    "recovering")
    recovery = replace(recovery, eval=eval_dataset or "ptb", eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens)
    summary = run_distill(str(stage), out, recovery, device=device, dtype=dtype, overwrite=overwrite,
                          resume=resume and checkpoint_folder(out).is_dir(), callbacks=callbacks)
    shutil.rmtree(stage, ignore_errors=True)
    return summary
