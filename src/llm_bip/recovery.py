"""The recovery jobs as library calls: ``llm-bip finetune`` (the language-model loss on the data) and
``llm-bip distill`` (the unpruned teacher's next-token distributions, optionally with the language-model
loss and the teacher's block outputs):

    summary = run_distill("runs/bip-20", "runs/bip-20-kd", DistillConfig(data="warpeace", max_steps=480))

Both check everything that needs no model first, train (LoRA adapters merged afterwards, or all weights),
and write the model as ``prune`` does (per-layer widths, biases, tokenizer and scores file kept), its
summary gaining a ``finetune`` or ``distill`` section. Checkpoints go to ``OUT.checkpoints``; a run
interrupted there continues with ``resume=True``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from .data import check_text_source
from .devices import DTYPES, check_device
from .errors import PruneError
from .evaluation import perplexity
from .limits import check_window
from .loading import load_model, read_config
from .outputs import SCORES_FILE, SUMMARY_FILE, check_apart_from_inputs, check_output_folder, input_summary, save_model
from .profiling import PhaseLog
from .selfcalib import self_calibration_ids
from .sources import local_inputs, resolve_source
from .teacher import OnlineTeacher, check_same_vocabulary, load_tokenizer, parent_model, teacher_source
from .teacher_cache import CachedExamples, build_cache, cache_key, is_ready, partial_folder
from .training import (
    Objective,
    TrainConfig,
    checkpoint_folder,
    resume_point,
    run_record,
    train,
    trainable,
    trainable_checksum,
    trained,
    training_arguments,
)
from .training_data import DataFile, TrainingData, build_training_data, read_data

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)

FinetuneConfig = TrainConfig  # finetune's options are the shared ones


@dataclass
class DistillConfig(TrainConfig):
    """``distill``'s options: the shared ones, the loss (``Objective``) and where the teacher's answers come
    from. Defaults chosen by bench/recovery.py on validation text (docs/results.md)."""

    data: str = "mix"
    full: bool = True
    LORA_LR: ClassVar[float] = 3e-3
    FULL_LR: ClassVar[float] = 3e-4
    temperature: float = 1.0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    teacher: str | None = None  # default: the model the student was pruned from (its summary names it)
    teacher_dtype: str | None = None  # default: the student's
    teacher_device: str | None = None  # default: the student's
    teacher_cache: str | None = None  # a folder of the teacher's top-k log-probabilities (teacher_cache.py)
    cache_top_k: int = 64

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or min(self.lm_weight, self.hidden_weight) < 0 or self.cache_top_k < 1:
            raise PruneError("--temperature and --cache-top-k must be positive, --lm-weight and --hidden-weight "
                             "at least 0")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise PruneError(f"unknown --teacher-dtype {self.teacher_dtype!r}; use {', '.join(DTYPES)}")
        if self.teacher_cache is not None and self.hidden_weight:
            raise PruneError("--hidden-weight needs the teacher's block outputs, which --teacher-cache does not keep; "
                             "run the teacher online (no --teacher-cache)")

    def objective(self) -> Objective:
        return Objective(kl=1.0, lm=self.lm_weight, hidden=self.hidden_weight, temperature=self.temperature)


@dataclass(frozen=True)
class TeacherPlan:
    """Where a distillation's teacher comes from and where it runs."""

    source: str
    dtype: str
    device: str | None  # None: each process's own training device
    cache: Path | None  # --teacher-cache
    top_k: int


def run_finetune(source: str, out: str | Path, config: TrainConfig, *, device: str = "cpu", dtype: str = "float32",
                 overwrite: bool = False, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train ``source`` on ``config.data`` with the language-model loss and write it to ``out``
    (``llm-bip finetune``). Progress lines go to the ``llm_bip.recovery`` logger.

    Args:
        source: any model ``prune`` reads or wrote.
        out: the output folder, written atomically; checkpoints go to ``OUT.checkpoints``.
        config: the training options (``FinetuneConfig``).
        device: torch device it trains on, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16".
        overwrite: replace ``out`` and an earlier run's checkpoints.
        resume: continue from the last checkpoint in ``OUT.checkpoints``.
        callbacks: transformers TrainerCallbacks.

    Returns:
        The summary written to ``out``: the input's, plus a "finetune" section.
    """
    return recover(source, out, config, Objective(), None, device=device, dtype=dtype, overwrite=overwrite,
                   resume=resume, callbacks=callbacks)


def run_distill(source: str, out: str | Path, config: DistillConfig, *, device: str = "cpu", dtype: str = "float32",
                overwrite: bool = False, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Distil the teacher (the model ``source`` was pruned from, or ``config.teacher``) into ``source`` and
    write the student to ``out`` (``llm-bip distill``). Progress lines go to the ``llm_bip.recovery`` logger.

    Args:
        source: the student: any model ``prune`` reads or wrote.
        out: the output folder, written atomically; checkpoints go to ``OUT.checkpoints``.
        config: the training, loss and teacher options (``DistillConfig``).
        device: torch device the student trains on, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16" (the teacher's too unless ``config.teacher_dtype``).
        overwrite: replace ``out`` and an earlier run's checkpoints.
        resume: continue from the last checkpoint in ``OUT.checkpoints``.
        callbacks: transformers TrainerCallbacks.

    Returns:
        The summary written to ``out``: the input's, plus a "distill" section.
    """
    config.validate()
    plan = TeacherPlan(teacher_source(source, config.teacher), config.teacher_dtype or dtype, config.teacher_device,
                       Path(config.teacher_cache) if config.teacher_cache else None, config.cache_top_k)
    if plan.device is not None:
        check_device(plan.device, plan.dtype)
    return recover(source, out, config, config.objective(), plan, device=device, dtype=dtype, overwrite=overwrite,
                   resume=resume, callbacks=callbacks)


def recover(source: str, out: str | Path, config: TrainConfig, objective: Objective, plan: TeacherPlan | None, *,
            device: str, dtype: str, overwrite: bool, resume: bool, callbacks: Sequence[TrainerCallback]) -> dict:
    """The recovery job: checks, data, the teacher (online or cached), training, perplexity before and after,
    the written model and its summary."""
    out, checkpoints, resume_from = check_recovery_job(source, out, config, plan, device, dtype, overwrite, resume)
    data_file = read_data(config.data)  # bad data fails before any model loads
    args = training_arguments(config, checkpoints, device)  # sets up the processes of a distributed run
    teacher_device = plan.device if plan and plan.device else str(args.device)
    log = PhaseLog()
    with log.phase("data"):
        data, writer = training_data(source, data_file, config, plan, dtype, teacher_device, args.world_size)
    dataset, teacher_model = teacher_answers(plan, data, objective, writer, teacher_device, config, log)
    del writer  # a writer that is not the online teacher is freed before the student loads
    with log.phase("load"):
        model, tokenizer = load_model(source, dtype, "cpu")
    state = PartialState()
    if state.is_main_process and resume_from is None and checkpoints.exists():
        shutil.rmtree(checkpoints)  # an earlier run's; resume_point allows this only with --overwrite
    state.wait_for_everyone()
    model.to(args.device)
    ppl = {}
    if config.eval != "none":
        with log.phase("eval_before"):
            ppl["before"] = evaluate(model, tokenizer, config, state.is_main_process)
    with log.phase("train"):
        model, trainer, checksums = train_model(model, tokenizer, dataset, config, objective, teacher_model, args,
                                                resume_from, callbacks)
    if config.eval != "none":
        with log.phase("eval_after"):
            ppl["after"] = evaluate(model, tokenizer, config, state.is_main_process)
    section = {"model": source, "dtype": dtype, **run_record(config, data, args, trainer), "resumed_from": resume_from,
               "checksums": checksums, "objective": asdict(objective), "perplexity": ppl}
    if plan is not None:
        section["teacher"] = teacher_record(plan, teacher_device)
    name = "distill" if plan is not None else "finetune"
    summary = {**input_summary(source), name: section}
    if state.is_main_process:
        with log.phase("save"):
            save_model(model, tokenizer, out, overwrite, lambda tmp: write_extras(tmp, source, summary, name, log))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
        logger.info(f"trained {trainer.state.global_step} steps on {args.world_size} process(es); wrote {out}")
    state.wait_for_everyone()
    return summary


def check_recovery_job(source: str, out: str | Path, config: TrainConfig, plan: TeacherPlan | None, device: str,
                       dtype: str, overwrite: bool, resume: bool) -> tuple[Path, Path, str | None]:
    """Every check that needs no model (its config only): options, devices, text sources, an output (and
    checkpoint and teacher cache folder) apart from every input, windows within the model's context.
    Returns the output folder, its checkpoint folder and the checkpoint to resume from."""
    config.validate()
    check_device(device, dtype)
    if config.eval != "none":
        check_text_source(config.eval)
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not config.full:
        raise PruneError("FSDP trains with --full only: merging LoRA adapters needs their full weights in every "
                         "process; pass --full, or launch data parallel (accelerate launch --multi_gpu ...)")
    inputs = local_inputs(source, config.data, config.eval, plan.source if plan else None)
    out = check_output_folder(out, overwrite, inputs)
    checkpoints = checkpoint_folder(out)
    for folder in (checkpoints, *((plan.cache, partial_folder(plan.cache)) if plan and plan.cache else ())):
        check_apart_from_inputs(folder, [*inputs, out])
    resume_from = resume_point(checkpoints, resume, overwrite)
    if plan is not None:
        check_same_vocabulary(source, plan.source)
    model_config = read_config(source, resolve_source(source, prunable=False), prunable=False)
    check_window(model_config, config.seqlen, "--seqlen")
    if config.eval != "none":
        check_window(model_config, config.eval_seqlen, "--eval-seqlen")
    return out, checkpoints, resume_from


def self_data_writer(source: str, plan: TeacherPlan | None) -> str:
    """Who writes ``--data self``: the teacher; without one, the model ``source`` was pruned from, or itself."""
    return plan.source if plan else (parent_model(source) or source)


def training_data(source: str, data_file: DataFile, config: TrainConfig, plan: TeacherPlan | None, dtype: str,
                  teacher_device: str, world_size: int) -> tuple[TrainingData, object]:
    """The examples the run reads, and the model that wrote them for ``--data self`` (else None)."""
    tokenizer = load_tokenizer(source)
    writer = None
    if data_file.format == "self":
        writer = load_model(self_data_writer(source, plan), plan.dtype if plan else dtype, teacher_device)[0]
    sample = partial(self_calibration_ids, writer, tokenizer, seqlen=config.seqlen, seed=config.seed,
                     batch_size=config.batch_size)
    data = build_training_data(tokenizer, data_file, config.seqlen, config.seed, config.examples_read(world_size),
                               sample)
    return data, writer


def teacher_answers(plan: TeacherPlan | None, data: TrainingData, objective: Objective, writer, teacher_device: str,
                    config: TrainConfig, log: PhaseLog):
    """(the dataset: examples, with the teacher's top-k where cached; the online teacher model, or None)."""
    if plan is None:
        return data.examples, None
    if plan.cache is not None:
        with log.phase("teacher_cache"):
            return cached_dataset(plan, plan.cache, data, objective, writer, teacher_device, config), None
    if writer is not None:
        return data.examples, writer  # the teacher wrote --data self: it stays for training
    with log.phase("load_teacher"):
        return data.examples, load_model(plan.source, plan.dtype, teacher_device)[0]


def cached_dataset(plan: TeacherPlan, folder: Path, data: TrainingData, objective: Objective, teacher_model,
                   teacher_device: str, config: TrainConfig) -> CachedExamples:
    """The examples with the teacher's top-k log-probabilities, from the cache ``folder`` (``plan.cache``): made
    here (the teacher loaded alone, then freed) unless a run on the same examples made it before."""
    key = cache_key(plan.source, data.examples, plan.top_k, objective.temperature)
    if not is_ready(folder, key):
        teacher_model = teacher_model or load_model(plan.source, plan.dtype, teacher_device)[0]
        tokenizer = load_tokenizer(plan.source)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        build_cache(teacher_model, data.examples, folder, key, config.batch_size, pad_id or 0)
    return CachedExamples(data.examples, folder)


def train_model(model, tokenizer, dataset, config: TrainConfig, objective: Objective, teacher_model,
                args: TrainingArguments, resume_from: str | None, callbacks: Sequence[TrainerCallback]):
    """(the trained model, LoRA merged in; the Trainer; every process's checksum of the trained weights)."""
    use_cache = model.config.use_cache  # activation checkpointing turns it off; the output keeps it as it was
    wrapped = trainable(model, config)
    teacher = OnlineTeacher(teacher_model) if teacher_model is not None else None
    trainer = train(wrapped, tokenizer, dataset, args, objective, teacher, resume_from, callbacks)
    checksums = gather_object([trainable_checksum(wrapped)])
    result = trained(wrapped, config).eval()
    result.config.use_cache = use_cache
    return result, trainer, checksums


def teacher_record(plan: TeacherPlan, device: str) -> dict:
    record: dict[str, str | int] = {"source": plan.source, "dtype": plan.dtype, "device": device}
    if plan.cache is not None:
        record.update(cache=str(plan.cache), top_k=plan.top_k)
    return record


def evaluate(model, tokenizer, config: TrainConfig, progress: bool) -> dict:
    """The perplexity of ``config.eval``, logged where ``progress`` (the main process)."""
    result = perplexity(model, tokenizer, config.eval, "test", config.eval_seqlen, config.eval_max_tokens,
                        progress=progress, cache=config.cache)
    if progress:
        logger.info(str(result))
    return result.as_dict()


def write_extras(folder: Path, source: str, summary: dict, name: str, log: PhaseLog) -> None:
    """The summary (with every phase's wall time and peak memory) and the input's scores file."""
    summary[name]["phases"] = log.phases
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    scores = Path(source) / SCORES_FILE
    if scores.is_file():
        shutil.copy2(scores, folder / SCORES_FILE)

