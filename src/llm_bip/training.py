"""The mechanics of recovery training, shared by ``finetune`` and ``distill``: the options, the loss a
run minimises (``Objective``), transformers' ``Trainer`` computing it, LoRA adapters (peft) or all
weights, checkpoints and resuming, and what a run records.

Trainer runs on accelerate, so ``accelerate launch`` gives data parallel (DDP) or FSDP with no code of
our own: every process trains, only the main process writes the output.

peft and transformers' Trainer are imported where they are used: they take seconds to import, and the
CLI imports this module for every command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.nn.utils.rnn import pad_sequence

from .adapters import adapter_for
from .errors import PruneError
from .losses import IGNORE_INDEX, TopK, hidden_sum, kl_sum, lm_sum, predicting
from .outputs import library_versions
from .teacher import TeacherSignal
from .teacher_cache import BATCH_FIELDS, batch_top_k, pad_top_k
from .training_data import TrainingData

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback, TrainingArguments

LOSS_NAMES = ("kl", "lm", "hidden")


@dataclass
class TrainConfig:
    """The options every recovery run shares; the CLI's options map onto these fields one to one."""

    data: str
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    full: bool = False  # train every weight of the model instead of LoRA adapters
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float | None = None  # default: LORA_LR, or FULL_LR with ``full``
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
    LORA_LR: ClassVar[float] = 2e-4
    FULL_LR: ClassVar[float] = 1e-4  # not tuned: the benchmark trains LoRA with the LM loss

    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, else the default for LoRA or for all weights."""
        if self.lr is not None:
            return self.lr
        return self.FULL_LR if self.full else self.LORA_LR

    def validate(self) -> None:
        if min(self.lora_r, self.lora_alpha, self.batch_size, self.grad_accum, self.save_steps, self.log_steps) < 1:
            raise PruneError("--lora-r, --lora-alpha, --batch-size, --grad-accum, --save-steps and --log-steps "
                             "must be positive")
        if self.seqlen < 2 or not 0 <= self.lora_dropout < 1 or self.learning_rate() <= 0:
            raise PruneError("--seqlen must be at least 2, --lora-dropout in [0, 1) and --lr positive")
        if (self.max_steps is not None and self.max_steps < 1) or self.epochs <= 0:
            raise PruneError("--max-steps and --epochs must be positive")

    def examples_read(self, world_size: int) -> int | None:
        """How many examples a run of ``max_steps`` reads (None: whole epochs of the data)."""
        if self.max_steps is None:
            return None
        return self.max_steps * self.batch_size * self.grad_accum * world_size


@dataclass(frozen=True)
class Objective:
    """The loss: ``kl`` × KL(teacher ‖ student) at ``temperature`` + ``lm`` × the language-model loss +
    ``hidden`` × the block-output loss, each a mean over the tokens that predict a labelled token."""

    kl: float = 0.0
    lm: float = 1.0
    hidden: float = 0.0
    temperature: float = 1.0

    @property
    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_NAMES if getattr(self, name)}

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kl or self.hidden)


# --------------------------------------------------------------------------- the model trained


def lora_targets(model) -> list[str]:
    """Module names of the seven block projections (q/k/v/o/gate/up/down), as the adapter knows them."""
    view = adapter_for(model.config).block(model, 0)
    projections = {id(m) for m in view.linears()}
    return sorted({name.rsplit(".", 1)[-1] for name, m in view.layer.named_modules() if id(m) in projections})


def add_lora(model, config: TrainConfig):
    """Wrap ``model`` with LoRA adapters on every block projection; biases stay frozen and untouched."""
    import peft

    torch.manual_seed(config.seed)  # the same adapter initialisation in every process
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, target_modules=lora_targets(model), bias="none")
    return peft.get_peft_model(model, lora)


def trainable(model, config: TrainConfig):
    """The model to train: every weight (``full``), or LoRA adapters around the frozen weights."""
    if config.full:
        return model.requires_grad_(True)
    return add_lora(model, config)


def trained(model, config: TrainConfig):
    """The plain model after training: LoRA adapters merged into the weights."""
    return model if config.full else model.merge_and_unload()


def trainable_checksum(model) -> str:
    """SHA-256 (first 16 hex digits) of the trained weights (LoRA's or all), in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- batches


class Collator:
    """Pads a batch: token ids (with EOS where the tokenizer has no pad token), labels with -100, an attention
    mask, and a teacher cache's fields."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"]) for f in features]
        batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_id),
                 "labels": pad_sequence([torch.as_tensor(f["labels"]) for f in features], batch_first=True,
                                        padding_value=IGNORE_INDEX),
                 "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)}
        if BATCH_FIELDS["indices"] in features[0]:
            batch.update(pad_top_k(features, batch["input_ids"].shape[1]))
        return batch


# --------------------------------------------------------------------------- training


def loss_sums(objective: Objective, teacher, outputs, inputs: dict, labels: torch.Tensor,
              cached: TopK | None) -> dict[str, torch.Tensor]:
    """The summed losses ``objective`` weighs, of the model's ``outputs`` on a batch; the teacher's signal from the
    batch's ``cached`` top-k where the teacher cache holds it, else from running ``teacher`` on ``inputs``."""
    sums = {}
    if objective.lm:
        sums["lm"] = lm_sum(outputs.logits, labels)
    if objective.needs_teacher:
        signal = TeacherSignal(cached) if cached is not None else teacher.signal(inputs, bool(objective.hidden))
        sums.update(teacher_sums(objective, outputs, signal, predicting(labels)))
    return sums


def teacher_sums(objective: Objective, outputs, signal: TeacherSignal, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The summed losses against the teacher's ``signal`` that ``objective`` weighs (over ``mask``'s positions)."""
    sums = {}
    if objective.kl:
        sums["kl"] = kl_sum(outputs.logits, signal.logits, mask, objective.temperature)
    if objective.hidden:
        if signal.hidden is None:
            raise ValueError("the block-output loss needs the teacher's block outputs, which a teacher cache does "
                             "not keep")
        sums["hidden"] = hidden_sum(outputs.hidden_states[1:], signal.hidden[1:], mask)
    return sums


def loss_means(sums: dict[str, torch.Tensor], positions: torch.Tensor | int, accelerator,
               device: torch.device) -> dict[str, float]:
    """Each loss's ``sums`` per predicting position, both summed over all processes, rounded for the log."""
    names = sorted(sums)
    totals = torch.stack([sums[n].float() for n in names] + [torch.as_tensor(positions).float().to(device)])
    totals = accelerator.reduce(totals, reduction="sum")
    return {n: round(float(v / totals[-1]), 6) for n, v in zip(names, totals[:-1])}


def recovery_trainer_class():
    """``RecoveryTrainer``, defined on first use (transformers' Trainer takes seconds to import)."""
    from transformers import Trainer

    class RecoveryTrainer(Trainer):
        """Trainer whose loss is an ``Objective``; each loss is logged beside the total."""

        def __init__(self, *args, objective: Objective, teacher=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.objective, self.teacher = objective, teacher
            self.sums: dict[str, torch.Tensor] = {}
            self.positions = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            cached = batch_top_k(inputs)
            outputs = model(**inputs, output_hidden_states=bool(self.objective.hidden), use_cache=False)
            sums = loss_sums(self.objective, self.teacher, outputs, inputs, labels, cached)
            positions = predicting(labels).sum()
            self.remember(sums, positions)
            total = sum(weight * sums[name] for name, weight in self.objective.weights.items())
            loss = total / self.normaliser(positions, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def normaliser(self, positions: torch.Tensor, num_items_in_batch) -> torch.Tensor:
            """As transformers normalises its own loss: over the whole accumulated batch (all processes') where
            it counts the batch's tokens, else over this micro-batch (Trainer then divides by the steps)."""
            if num_items_in_batch is None:
                return positions.clamp_min(1)
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return num_items_in_batch / processes

        def remember(self, sums: dict[str, torch.Tensor], positions: torch.Tensor) -> None:
            for name, value in sums.items():
                self.sums[name] = self.sums.get(name, 0) + value.detach()
            self.positions = self.positions + positions

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            """Every loss's mean since the last log (over all processes) beside Trainer's total."""
            if "loss" in logs and self.sums:
                logs.update(loss_means(self.sums, self.positions, self.accelerator, self.args.device))
                self.sums, self.positions = {}, 0
            super().log(logs, *args, **kwargs)

    return RecoveryTrainer


def training_arguments(config: TrainConfig, checkpoints: Path, device: str) -> TrainingArguments:
    """Trainer settings; creating them sets up the (possibly distributed) accelerate state."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1, learning_rate=config.learning_rate(), logging_steps=config.log_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (peft)
        remove_unused_columns=False,  # a teacher cache's fields are not arguments of the model
        seed=config.seed, data_seed=config.seed, use_cpu=torch.device(device).type == "cpu", report_to="none",
    )


def train(model, tokenizer, dataset, args: TrainingArguments, objective: Objective = Objective(), teacher=None,
          resume_from: str | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Train ``model`` (LoRA-wrapped or all weights trainable) in place on ``dataset`` (examples, with
    teacher fields where cached); returns the Trainer (state, log history)."""
    trainer = recovery_trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=Collator(tokenizer),
                                       callbacks=list(callbacks), objective=objective, teacher=teacher)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


# --------------------------------------------------------------------------- checkpoints and records


def checkpoint_folder(out: Path) -> Path:
    """Where training checkpoints go: a sibling of the output, so they outlive a failed run."""
    return out.parent / f"{out.name}.checkpoints"


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


def loss_history(trainer: Trainer) -> list[dict[str, float]]:
    """Per logged step: the total loss and each loss of the objective."""
    keys = ("step", "loss", *LOSS_NAMES)
    return [{k: e[k] for k in keys if k in e} for e in trainer.state.log_history if "loss" in e]


def run_record(config: TrainConfig, data: TrainingData, args: TrainingArguments, trainer: Trainer) -> dict:
    """Data, settings, training progress and library versions of a run, for the summary."""
    described = data.describe()
    per_step = config.batch_size * config.grad_accum * args.world_size
    examples_read = trainer.state.global_step * per_step
    record = {
        "device": str(args.device), "data": described, "config": asdict(config), "world_size": args.world_size,
        "learning_rate": config.learning_rate(),
        "effective_batch_size": per_step, "steps": trainer.state.global_step, "epochs_done": trainer.state.epoch,
        "training_tokens": round(examples_read * described["tokens"] / described["examples"]),
        "loss_history": loss_history(trainer),
        "versions": {**library_versions(), "peft": importlib.metadata.version("peft")},
    }
    if not config.full:
        record["lora"] = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                          "targets": sorted(trainer.model.peft_config["default"].target_modules)}
    return record

