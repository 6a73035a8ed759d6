"""The training losses of recovery, as sums over the positions that predict a labelled next token.

Every function returns a sum over those positions; the trainer divides by their number (over the whole
accumulated batch), so losses of different kinds add with the weights a run gives them. Position t
predicts token t + 1: it counts where ``labels[:, t + 1]`` is not ``IGNORE_INDEX``.

- ``lm_sum``: next-token cross-entropy (the language-model loss).
- ``kl_sum``: forward KL(teacher ‖ student) of the next-token distributions at temperature T, times T²
  (so gradients keep their size when T ≠ 1), from the teacher's full log-probabilities (``log_probs``) or
  from its k most likely tokens (``TopK``): then the rest of the vocabulary is one bucket, whose teacher
  mass the cache keeps and whose student mass is computed exactly; that is the KL of the two
  distributions over k + 1 outcomes, a lower bound of the full KL, equal to it when k is the vocabulary.
- ``hidden_sum``: Minitron's intermediate-state loss: at every block output, the squared distance of
  student and teacher states divided by the teacher's mean squared norm at that block over the batch's
  positions (block outputs grow with depth; this weighs the blocks alike), averaged over blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers' convention)


@dataclass(frozen=True)
class TopK:
    """The teacher's k most likely next tokens per position, as a cache stores them.

    ``indices`` [batch, seq, k] (int), ``log_probs`` [batch, seq, k]: their log-probabilities at the cache's
    temperature; ``rest`` [batch, seq]: the log of the probability of every other token together (-inf
    where k is the whole vocabulary)."""

    indices: torch.Tensor
    log_probs: torch.Tensor
    rest: torch.Tensor

    def at(self, mask: torch.Tensor) -> "TopK":
        """The entries of the predicting positions ``mask`` [batch, seq - 1], flattened."""
        return TopK(self.indices[:, :-1][mask], self.log_probs[:, :-1][mask], self.rest[:, :-1][mask])


def predicting(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] bool: the positions whose next token carries a label."""
    return labels[:, 1:] != IGNORE_INDEX


def lm_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    targets = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def student_log_probs(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """[positions, vocab] float32 log-probabilities of the predicting positions at ``temperature``."""
    return (logits[:, :-1][mask].float() / temperature).log_softmax(-1)


def kl_sum(logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor, temperature: float = 1.0,
           ) -> torch.Tensor:
    """Summed KL(teacher ‖ student) at ``temperature`` (times its square) over the positions ``mask``.
    ``teacher``: its logits [batch, seq, vocab], or its top-k log-probabilities (``TopK``)."""
    student = student_log_probs(logits, mask, temperature)
    if isinstance(teacher, TopK):
        return topk_kl(student, teacher.at(mask)).sum() * temperature ** 2
    target = student_log_probs(teacher, mask, temperature)
    return F.kl_div(student, target, log_target=True, reduction="sum") * temperature ** 2


def topk_kl(student: torch.Tensor, teacher: TopK) -> torch.Tensor:
    """Per-position KL over the teacher's top k tokens and one bucket for the rest of the vocabulary."""
    indices = teacher.indices.long()
    kl = (teacher.log_probs.exp() * (teacher.log_probs - student.gather(-1, indices))).sum(-1)
    if indices.shape[-1] == student.shape[-1]:
        return kl  # no rest
    student_rest = student.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return kl + teacher.rest.exp() * (teacher.rest - student_rest)


def top_k(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The ``k`` most likely tokens of ``logits`` [..., vocab] at ``temperature``, and the rest's log-mass."""
    log_probs = (logits.float() / temperature).log_softmax(-1)
    values, indices = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TopK(indices.int(), values, rest)


def hidden_sum(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Summed over the positions ``mask``: the mean over blocks of ‖h_s − h_t‖² / (the teacher's mean ‖h_t‖²
    at that block). ``student``, ``teacher``: the block outputs [batch, seq, hidden], alike in number."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student block outputs against {len(teacher)} of the teacher")
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s[:, :-1][mask].float(), t[:, :-1][mask].float()
        scale = t.pow(2).sum(-1).mean().clamp_min(torch.finfo(torch.float32).tiny)
        total = total + (s - t).pow(2).sum() / scale
    return total / len(student)
