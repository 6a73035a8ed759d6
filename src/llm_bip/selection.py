"""Refit-aware selection (``--selection refit``): units chosen by the error the least-squares refit leaves.

The refit (surgery.refit_projection) re-expresses a removed unit's contribution through the kept columns
of o_proj and down_proj, so a unit that the others can stand in for is cheap to remove, however large
its own output. As in structured OBS (ZipLM, SlimGPT), each projection's units are removed greedily by
the squared output error left after the optimal refit of the rest, with the inverse of the damped Gram
H = G + lambda I of the projection's calibration inputs updated after every removal:

    error(S) = tr(W_S (H^-1_SS)^-1 W_S^T)
    W <- W - W_S (H^-1_SS)^-1 H^-1_S:          H^-1 <- H^-1 - H^-1_:S (H^-1_SS)^-1 H^-1_S:

(W: the weight, with its bias as the column of the Gram's ones where it has one; that column is never
removed). One unit a step, the errors so far add up to the refit's damped error for the units removed. A
projection wider than GREEDY_STEPS units removes ceil(width / GREEDY_STEPS) of its cheapest units per
step, together (a unit's error is then its own, the step's others kept); ties go to the method's own
scores (the prior).

A unit's score is the square root of its step's error, raised to the running maximum of the earlier
steps' (times 1 + 1e-9 a step) so that every ranking keeps the greedy order; the engine ranks these as
it ranks any metric's scores (standardised per block and module by default).
"""

from __future__ import annotations

import math

import torch

from .adapters import BlockView
from .allocation import attention_units
from .calibration import BlockGrams
from .metrics import UnitScores
from .surgery import RIDGE, augmented

GREEDY_STEPS = 64  # removal steps per projection at most: wider ones remove several units a step
NUDGE = 1e-9  # each score exceeds the one before it by this fraction at least: the greedy order is kept


@torch.no_grad()
def refit_aware_scores(view: BlockView, grams: BlockGrams, prior: UnitScores, gqa: str) -> UnitScores:
    """Block scores by refit-aware selection: attention units over o_proj's columns, FFN channels over
    down_proj's; ``prior`` (the method's scores) breaks ties; ``gqa`` decides the attention units."""
    hd, width = view.head_dim, view.widths
    units = attention_units(width, gqa, view.heads_removable)
    unit_prior = torch.stack([prior.heads.double()[heads].sum() for heads in units])
    columns = torch.stack([torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) for heads in units])
    attn = removal_scores(augmented(view.o.weight, view.o.bias), grams.attn, columns, unit_prior)
    attn_channels = torch.empty(width.num_heads * hd, dtype=torch.float64)
    for cols, value in zip(columns, attn):
        attn_channels[cols] = value / cols.numel()
    channels = torch.arange(width.intermediate_size)[:, None]
    ffn = removal_scores(augmented(view.down.weight, view.down.bias), grams.ffn, channels, prior.channels.double())
    return UnitScores.of_channels(attn_channels, ffn, hd)


def removal_scores(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Every unit's score (see the module's docstring): ``units`` [m, s] holds each unit's columns of
    ``weight`` [d, n] and ``gram`` [n, n] (float64; any column not in a unit is kept), ``prior`` [m] breaks ties."""
    order, errors = greedy_removal(weight, gram, units, prior)
    scores = torch.empty(len(order), dtype=torch.float64)
    last = 0.0
    for unit, error in zip(order, errors.clamp_min(0).sqrt().tolist()):
        last = max(error, last * (1 + NUDGE))
        scores[unit] = last
    return scores


def greedy_removal(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor,
                   prior: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """All units in greedy removal order and each one's error at the step it went (see the module's docstring).
    The weight and the inverse shrink to the columns still there as units go."""
    device = gram.device
    w = weight.to(device=device, dtype=torch.float64)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=device)
    h = gram.double() + RIDGE * gram.diagonal().mean() * eye
    hinv = torch.cholesky_solve(eye, torch.linalg.cholesky(h))
    units, prior = units.to(device), prior.to(device)
    alive = torch.arange(units.shape[0], device=device)
    there = torch.ones(gram.shape[0], dtype=torch.bool, device=device)  # the columns not removed
    per_step = math.ceil(units.shape[0] / GREEDY_STEPS)
    order, errors = [], []
    while alive.numel():
        columns = (torch.cumsum(there, 0) - 1)[units[alive]]  # the alive units' columns in w and hinv
        costs = unit_errors(w, hinv, columns)
        by_prior = torch.argsort(prior[alive], stable=True)
        ranked = by_prior[torch.argsort(costs[by_prior], stable=True)][:per_step]
        w, hinv = _remove(w, hinv, columns[ranked].flatten())
        there[units[alive[ranked]].flatten()] = False
        order += alive[ranked].tolist()
        errors.append(costs[ranked])
        stay = torch.ones_like(alive, dtype=torch.bool)
        stay[ranked] = False
        alive = alive[stay]
    return order, torch.cat(errors).cpu()


def unit_errors(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """tr(W_S (H^-1_SS)^-1 W_S^T) of each unit S (a row of ``units``): its removal's error, the rest refit."""
    if units.shape[1] == 1:
        cols = units[:, 0]
        return w[:, cols].pow(2).sum(0) / hinv.diagonal()[cols]
    blocks = hinv[units[:, :, None], units[:, None, :]]
    rows = w[:, units].permute(1, 2, 0)
    return (torch.linalg.solve(blocks, rows) * rows).sum((1, 2))


def _remove(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` and ``hinv`` without the columns ``cols``, removed together: the rest of ``w`` refit, ``hinv`` updated."""
    stay = torch.ones(hinv.shape[0], dtype=torch.bool, device=hinv.device)
    stay[cols] = False
    stay = stay.nonzero()[:, 0]
    rows = hinv.index_select(0, cols)
    step = torch.linalg.inv(rows[:, cols]) @ rows.index_select(1, stay)
    refit = torch.addmm(w.index_select(1, stay), w.index_select(1, cols), step, alpha=-1)
    rest = hinv.index_select(0, stay).index_select(1, stay)
    return refit, rest.addmm_(rows.index_select(1, stay).T, step, alpha=-1)
