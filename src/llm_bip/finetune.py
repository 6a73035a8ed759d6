"""Recovery fine-tuning: LoRA adapters (peft) trained with transformers' Trainer, then merged.

Instruction data (Alpaca-style .json/.jsonl records with instruction, optional input, output)
becomes the standard Alpaca prompt followed by the response; the loss is on the response tokens
only (prompt tokens are labelled -100), the usual choice for instruction data. Plain .txt
becomes packed windows of ``seqlen`` tokens with the loss on every token.

Trainer runs on accelerate, so ``accelerate launch`` gives data parallel (DDP) or FSDP with no
code of our own: every process trains, only the main process writes the output.

peft and transformers' Trainer are imported where they are used: they take seconds to import,
and the CLI imports this module for every command.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from transformers import DataCollatorForSeq2Seq

from .adapters import adapter_for
from .checkpoint import (check_apart_from_inputs, check_device, check_output_folder, load_model, local_inputs,
                         save_model)
from .data import check_text_source, needs_bos, read_json_records, read_text_file, tokenize
from .errors import PruneError
from .evaluation import eval_windows, perplexity
from .profiling import PhaseLog
from .outputs import SCORES_FILE, SUMMARY_FILE, input_summary, library_versions

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Trainer, TrainerCallback, TrainingArguments

IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers' convention)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
FORMATS = {".json": "alpaca-json", ".jsonl": "alpaca-jsonl", ".txt": "text"}


@dataclass
class FinetuneConfig:
    """Every choice of a fine-tuning run; the CLI's options map onto these fields one to one."""

    data: str
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    seqlen: int = 256
    save_steps: int = 200
    log_steps: int = 1
    gradient_checkpointing: bool = True
    seed: int = 0
    eval: str = "ptb"  # perplexity before/after on its test split; "none" skips
    eval_seqlen: int = 128
    eval_max_tokens: int | None = None
    cache: bool = True  # reuse an identical earlier perplexity measurement (evaluation.perplexity)

    def validate(self) -> None:
        if min(self.lora_r, self.lora_alpha, self.batch_size, self.grad_accum, self.save_steps, self.log_steps) < 1:
            raise PruneError("--lora-r, --lora-alpha, --batch-size, --grad-accum, --save-steps and --log-steps "
                             "must be positive")
        if self.seqlen < 2 or not 0 <= self.lora_dropout < 1 or self.lr <= 0:
            raise PruneError("--seqlen must be at least 2, --lora-dropout in [0, 1) and --lr positive")
        if (self.max_steps is not None and self.max_steps < 1) or self.epochs <= 0:
            raise PruneError("--max-steps and --epochs must be positive")


@dataclass
class DataFile:
    """A training data file as read: Alpaca records, or plain text."""

    path: str
    format: str
    content: list[dict] | str = field(repr=False)


@dataclass
class TrainingData:
    """Tokenised training examples ({input_ids, labels}) and where they came from."""

    source: DataFile
    examples: list[dict[str, list[int]]] = field(repr=False)

    def describe(self) -> dict:
        return {
            "file": self.source.path, "format": self.source.format, "examples": len(self.examples),
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
            "loss_tokens": sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.examples),
        }


# --------------------------------------------------------------------------- data


def data_format(path: Path) -> str:
    """The data format a file's suffix names, or a PruneError (missing file, unknown suffix)."""
    if not path.is_file():
        raise PruneError(f"{path}: no such data file")
    if path.suffix not in FORMATS:
        raise PruneError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use .json or .jsonl "
                         "(Alpaca-style instruction/input/output records) or .txt (plain text)")
    return FORMATS[path.suffix]


def read_records(path: Path) -> list[dict]:
    """Alpaca-style records of a .json (one list) or .jsonl (one object a line) file, checked."""
    records = read_json_records(path)
    if not isinstance(records, list) or not records:
        raise PruneError(f"{path}: holds no examples (expected a list of instruction/input/output records)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise PruneError(f"{path}: record {i} lacks the 'instruction' and 'output' fields of Alpaca-style "
                             "data (use a .txt file for plain text)")
    return records


def read_data(path: str | Path) -> DataFile:
    """Read a data file, with every check that needs no tokenizer."""
    path = Path(path)
    fmt = data_format(path)
    if fmt != "text":
        return DataFile(str(path), fmt, read_records(path))
    return DataFile(str(path), fmt, read_text_file(path))


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def instruction_example(tokenizer, record: dict, seqlen: int) -> dict[str, list[int]]:
    """Prompt + response + EOS, cut to ``seqlen``; only the response and EOS carry labels."""
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = bos + tokenizer(alpaca_prompt(record), add_special_tokens=False).input_ids
    response = tokenizer(str(record["output"]), add_special_tokens=False).input_ids + eos
    return {"input_ids": (prompt + response)[:seqlen], "labels": ([IGNORE_INDEX] * len(prompt) + response)[:seqlen]}


def text_examples(tokenizer, text: str, seqlen: int, source: str) -> list[dict[str, list[int]]]:
    """Consecutive windows of ``seqlen`` tokens (BOS first where the model uses one), loss on all."""
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen - int(needs_bos(tokenizer)):
        raise PruneError(f"{source}: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                         "use more text or a smaller --seqlen")
    return [{"input_ids": w, "labels": w} for w in eval_windows(tokenizer, ids, seqlen).tolist()]


def build_training_data(tokenizer, data: DataFile, seqlen: int) -> TrainingData:
    """Tokenised examples: instruction records (response-only labels) or text windows."""
    if data.format == "text":
        return TrainingData(data, text_examples(tokenizer, data.content, seqlen, data.path))
    examples = [instruction_example(tokenizer, r, seqlen) for r in data.content]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise PruneError(f"{data.path}: every prompt fills --seqlen {seqlen}, leaving no response tokens to train "
                         "on; raise --seqlen")
    return TrainingData(data, examples)


def padding_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads input_ids (with EOS where the tokenizer has no pad token) and labels (with -100)."""
    if tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)  # the saved tokenizer stays as it was
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


# --------------------------------------------------------------------------- LoRA and training


def lora_targets(model) -> list[str]:
    """Module names of the seven block projections (q/k/v/o/gate/up/down), as the adapter knows them."""
    view = adapter_for(model.config).block(model, 0)
    projections = {id(m) for m in view.linears()}
    return sorted({name.rsplit(".", 1)[-1] for name, m in view.layer.named_modules() if id(m) in projections})


def add_lora(model, config: FinetuneConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on every block projection; biases stay frozen and untouched."""
    import peft

    torch.manual_seed(config.seed)  # the same adapter initialisation in every process
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, target_modules=lora_targets(model), bias="none")
    return peft.get_peft_model(model, lora)


def checkpoint_folder(out: Path) -> Path:
    """Where training checkpoints go: a sibling of the output, so they outlive a failed run."""
    return out.parent / f"{out.name}.checkpoints"


def training_arguments(config: FinetuneConfig, checkpoints: Path, device: str) -> TrainingArguments:
    """Trainer settings; creating them sets up the (possibly distributed) accelerate state."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1, learning_rate=config.lr, logging_steps=config.log_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (peft)
        seed=config.seed, data_seed=config.seed, use_cpu=torch.device(device).type == "cpu", report_to="none",
    )


def resume_point(checkpoints: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuse to mix a fresh run into an earlier run's checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if last is None and checkpoints.exists() and (not checkpoints.is_dir() or any(checkpoints.iterdir())):
        raise PruneError(f"{checkpoints} is in the way of the training checkpoints and holds none; remove it or "
                         "choose another --out")
    if resume and last is None:
        raise PruneError(f"--resume: no checkpoint in {checkpoints}; run without --resume to start training")
    if not resume and last is not None and not overwrite:
        raise PruneError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it "
                         "or --overwrite to start over")
    return last if resume else None


def lora_checksum(model) -> str:
    """SHA-256 (first 16 hex digits) of the trainable LoRA weights, in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def loss_history(trainer: Trainer) -> list[dict[str, float]]:
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


def train(model: PeftModel, tokenizer, data: TrainingData, args: TrainingArguments,
          resume_from: str | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Train the adapters of ``model`` in place; returns the Trainer (state, log history)."""
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, train_dataset=data.examples, data_collator=padding_collator(tokenizer),
                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


# --------------------------------------------------------------------------- the whole run


def finetune(source: str, out: str | Path, config: FinetuneConfig, device: str = "cpu", dtype: str = "float32",
             overwrite: bool = False, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Fine-tune LoRA adapters on ``config.data``, merge them and write the model to ``out`` as
    ``llm-bip prune`` does, the summary gaining a "finetune" section; returns the summary."""
    config.validate()
    check_device(device, dtype)
    if config.eval != "none":
        check_text_source(config.eval)
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise PruneError("FSDP is not supported yet: merging needs the full LoRA weights in every process; "
                         "launch data parallel instead (accelerate launch --multi_gpu ...)")
    inputs = local_inputs(source, config.data, config.eval)
    out = check_output_folder(out, overwrite, inputs)
    checkpoints = checkpoint_folder(out)
    check_apart_from_inputs(checkpoints, inputs)
    resume_from = resume_point(checkpoints, resume, overwrite)
    data_file = read_data(config.data)  # bad data fails before the model loads
    log = PhaseLog()
    with log.phase("load"):
        model, tokenizer = load_model(source, dtype, "cpu")
        data = build_training_data(tokenizer, data_file, config.seqlen)
    args = training_arguments(config, checkpoints, device)
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
        merged, trainer, checksums = train_and_merge(model, tokenizer, data, config, args, resume_from, callbacks)
    if config.eval != "none":
        with log.phase("eval_after"):
            ppl["after"] = evaluate(merged, tokenizer, config, state.is_main_process)
    section = {"model": source, "dtype": dtype, **run_record(config, data, args, trainer), "resumed_from": resume_from,
               "lora_checksums": checksums, "perplexity": ppl}
    summary = {**input_summary(source), "finetune": section}
    if state.is_main_process:
        with log.phase("save"):
            save_model(merged, tokenizer, out, overwrite, lambda tmp: write_extras(tmp, source, summary, log))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
        print(f"trained {trainer.state.global_step} steps on {args.world_size} process(es); wrote {out}")
    state.wait_for_everyone()
    return summary


def train_and_merge(model, tokenizer, data: TrainingData, config: FinetuneConfig, args: TrainingArguments,
                    resume_from: str | None, callbacks: Sequence[TrainerCallback]):
    """(model with the trained adapters merged in, Trainer, every process's LoRA checksum)."""
    use_cache = model.config.use_cache  # activation checkpointing turns it off; the output keeps it as it was
    peft_model = add_lora(model, config)
    trainer = train(peft_model, tokenizer, data, args, resume_from, callbacks)
    checksums = gather_object([lora_checksum(peft_model)])
    merged = peft_model.merge_and_unload().eval()
    merged.config.use_cache = use_cache
    return merged, trainer, checksums


def run_record(config: FinetuneConfig, data: TrainingData, args: TrainingArguments, trainer: Trainer) -> dict:
    """Data, settings, training progress and library versions of a run, for the summary."""
    return {
        "device": str(args.device), "data": data.describe(), "config": asdict(config),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "targets": sorted(trainer.model.peft_config["default"].target_modules)},
        "world_size": args.world_size,
        "effective_batch_size": config.batch_size * config.grad_accum * args.world_size,
        "steps": trainer.state.global_step, "epochs_done": trainer.state.epoch, "loss_history": loss_history(trainer),
        "versions": {**library_versions(), "peft": importlib.metadata.version("peft")},
    }


def evaluate(model, tokenizer, config: FinetuneConfig, progress: bool) -> dict:
    result = perplexity(model, tokenizer, config.eval, "test", config.eval_seqlen, config.eval_max_tokens,
                        progress=progress, cache=config.cache)
    if progress:
        print(result, flush=True)
    return result.as_dict()


def write_extras(folder: Path, source: str, summary: dict, log: PhaseLog) -> None:
    """The summary (with every phase's wall time and peak memory) and the input's scores file."""
    summary["finetune"]["phases"] = log.phases
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    scores = Path(source) / SCORES_FILE
    if scores.is_file():
        shutil.copy2(scores, folder / SCORES_FILE)
