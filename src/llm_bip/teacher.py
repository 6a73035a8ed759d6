"""The teacher of distillation: which model it is, that it speaks the student's vocabulary, and what it
tells the student about a batch.

The teacher of a pruned model is the dense model it was pruned from, as its run's summary names it
(``prune`` writes it; ``finetune`` and ``distill`` keep it); ``--teacher`` names another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from .errors import PruneError
from .loading import read_config
from .losses import TopK
from .outputs import SUMMARY_FILE, input_summary
from .sources import resolve_source


@dataclass(frozen=True)
class TeacherSignal:
    """What the teacher says about a batch: its next-token logits [batch, seq, vocab] (or its top-k
    log-probabilities, from a cache) and, where asked, its block outputs."""

    logits: torch.Tensor | TopK
    hidden: tuple[torch.Tensor, ...] | None = None


def parent_model(student: str) -> str | None:
    """The model ``student`` was pruned from, as its summary names it; None for a model llm-bip did not prune."""
    return input_summary(student).get("model")


def teacher_source(student: str, teacher: str | None) -> str:
    """``teacher`` if given, else the model ``student`` was pruned from; a PruneError where neither is known."""
    if teacher is not None:
        return teacher
    parent = parent_model(student)
    if parent is None:
        raise PruneError(f"{student}: no {SUMMARY_FILE} names a model it was pruned from; pass --teacher MODEL")
    return parent


def load_tokenizer(source: str):
    """The tokenizer of a model source, without its weights."""
    try:
        return AutoTokenizer.from_pretrained(resolve_source(source, prunable=False))
    except PruneError:
        raise
    except Exception as err:
        raise PruneError(f"{source}: cannot load its tokenizer ({type(err).__name__}: {err})") from err


def check_same_vocabulary(student: str, teacher: str) -> None:
    """Refuse, from configs and tokenizers alone, a teacher that cannot be read or whose tokens are not the
    student's: distillation compares the two next-token distributions token by token."""
    try:
        sizes = [read_config(s, resolve_source(s, prunable=False), prunable=False).vocab_size
                 for s in (student, teacher)]
        vocabularies = [load_tokenizer(s).get_vocab() for s in (student, teacher)]
    except PruneError as err:
        raise PruneError(f"the teacher {teacher} of {student}: {err}; pass --teacher MODEL") from err
    if sizes[0] != sizes[1] or vocabularies[0] != vocabularies[1]:
        raise PruneError(f"the teacher {teacher} has another vocabulary ({len(vocabularies[1])} tokens, {sizes[1]} "
                         f"embedded) than the student {student} ({len(vocabularies[0])}, {sizes[0]}); distillation "
                         "needs the same tokens")


class OnlineTeacher:
    """The teacher in memory beside the student: no gradients, on its own device and in its own dtype; its
    answers come back on the student's device in float32."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def signal(self, inputs: dict[str, torch.Tensor], hidden: bool) -> TeacherSignal:
        target = inputs["input_ids"].device
        mask = inputs.get("attention_mask")
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         attention_mask=None if mask is None else mask.to(self.device),
                         output_hidden_states=hidden, use_cache=False)
        states = tuple(h.to(target, torch.float32) for h in out.hidden_states) if hidden else None
        return TeacherSignal(out.logits.to(target, torch.float32), states)
