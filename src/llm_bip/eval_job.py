"""The eval job (``llm-bip eval`` as a library call): perplexity on corpora or text files, the KL to a
teacher and top-1 agreement with it, and zero-shot accuracy through lm-evaluation-harness.

    summary = run_eval("runs/bip-20", EvalConfig(corpora=["ptb"], tasks=["piqa"]), out="runs/bip-20-eval")

checks everything that needs no model (tasks included) before any model is loaded, logs each
measurement as it is taken, writes the summary (llm_bip_eval.json) to ``out`` atomically where given,
and returns it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .data import check_text_source
from .devices import check_device
from .errors import PruneError
from .evaluation import agreement, eval_split, perplexity
from .loading import load_model
from .outputs import EVAL_FILE, atomic_folder, check_output_folder, library_versions
from .profiling import PhaseLog
from .sources import local_inputs
from .teacher import check_same_vocabulary
from .zeroshot import load_tasks, zero_shot

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What ``run_eval`` measures, and how (the options of ``llm-bip eval``)."""

    corpora: list[str] = field(default_factory=lambda: ["ptb"])  # perplexity texts: named corpora or text files
    split: str | None = None  # of the named corpora (default test); a text file is evaluated whole
    seqlen: int = 128  # perplexity window length
    max_tokens: int | None = None  # score only the first N tokens of each text
    cache: bool = True  # reuse an identical earlier perplexity measurement from the llm-bip cache
    teacher: str | None = None  # also the KL to this model and top-1 agreement with it, on each text
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks
    include_path: list[str | Path] = field(default_factory=list)  # folders of local task YAMLs
    limit: int | None = None  # score only the first N examples of each task
    num_fewshot: int = 0
    batch_size: int | None = None  # default: zero-shot 8, perplexity 2048 tokens' worth of windows


def run_eval(source: str, config: EvalConfig | None = None, *, out: str | Path | None = None,
             overwrite: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    """Evaluate a model (``llm-bip eval``): perplexities, agreement with a teacher, zero-shot accuracy. Each
    perplexity and agreement goes to the ``llm_bip.eval_job`` logger as it is measured.

    Args:
        source: a local folder, hub id, .gguf file or pruned folder; any causal LM transformers loads.
        config: what to measure (default ``EvalConfig()``: ptb test perplexity).
        out: a folder to write the summary (llm_bip_eval.json) into, atomically; None: nothing is written.
        overwrite: replace ``out`` (only a folder llm-bip wrote).
        device: torch device, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16".

    Returns:
        The summary: model, dtype, device, perplexity (one dict per text), zeroshot (None without tasks),
        teacher and agreement (with a teacher), versions and phases.
    """
    config = config or EvalConfig()
    split = check_eval_job(source, config, out=out, overwrite=overwrite, device=device, dtype=dtype)
    log = PhaseLog()
    tasks = {}
    if config.tasks:
        with log.phase("load_tasks"):  # before the model: a task that cannot run fails fast
            tasks = load_tasks(config.tasks, config.include_path)
    if config.teacher:
        check_same_vocabulary(source, config.teacher)
    with log.phase("load"):
        model, tokenizer = load_model(source, dtype, device, prunable=False)
        teacher = load_model(config.teacher, dtype, device, prunable=False)[0] if config.teacher else None
    summary: dict[str, Any] = {"model": source, "dtype": dtype, "device": device,
                               **measurements(model, teacher, tokenizer, tasks, config, split, log)}
    summary.update(versions={**library_versions(), "lm_eval": version("lm_eval")}, phases=log.phases)
    if out is not None:
        with atomic_folder(Path(out), overwrite) as tmp:
            (tmp / EVAL_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def check_eval_job(source: str, config: EvalConfig, *, out: str | Path | None, overwrite: bool, device: str,
                   dtype: str) -> str:
    """Every check that needs neither model nor tasks: something to measure, the device, the split, an output
    folder apart from every input, readable text. Returns the split of the named corpora."""
    if not config.corpora and not config.tasks:
        raise PruneError("nothing to evaluate: pass --tasks, or --ppl other than none")
    check_device(device, dtype)
    split = eval_split(config.split, config.corpora)
    if out is not None:
        check_output_folder(out, overwrite, local_inputs(source, *config.corpora, *config.include_path))
    for corpus in config.corpora:
        check_text_source(corpus)
    return split


def measurements(model, teacher, tokenizer, tasks: dict, config: EvalConfig, split: str, log: PhaseLog) -> dict:
    """The summary's measurements: perplexity, zeroshot, and with a teacher, teacher and agreement."""
    found: dict[str, Any] = {"perplexity": [], "zeroshot": None}
    if config.corpora:
        with log.phase("perplexity"):
            found["perplexity"] = [logged(perplexity(model, tokenizer, corpus, split, config.seqlen, config.max_tokens,
                                                     config.batch_size, cache=config.cache))
                                   for corpus in config.corpora]
    if teacher is not None and config.corpora:
        with log.phase("agreement"):
            found.update(teacher=config.teacher, agreement=[
                logged(agreement(model, teacher, tokenizer, corpus, split, config.seqlen, config.max_tokens,
                                 config.batch_size))
                for corpus in config.corpora])
    if tasks:
        with log.phase("zero_shot"):
            found["zeroshot"] = zero_shot(model, tokenizer, tasks, batch_size=config.batch_size, limit=config.limit,
                                          num_fewshot=config.num_fewshot)
    return found


def logged(result) -> dict:
    """A measurement (``Perplexity`` or ``Agreement``) as its summary dict, logged first."""
    logger.info(str(result))
    return result.as_dict()
