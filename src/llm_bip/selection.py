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

The greedy decides which units go, not how many: each module's scores are the method's own, handed out
again in the greedy order (the unit removed first takes the lowest score), so the allocation across blocks
is the method's. Allocating by the greedy's errors themselves, standardised per block and module as the
bounds are, was measured and lost clearly (docs/results.md, issue 22): a block's own output error says
little about what the model loses.
"""

from __future__ import annotations

import math

import torch

from .adapters import BlockView
from .calibration import BlockGrams
from .metrics import UnitScores
from .options import Gqa
from .surgery import add_ridge, augmented
from .units import attention_units

GREEDY_STEPS = 64  # removal steps per projection at most: wider ones remove several units a step


@torch.no_grad()
def refit_aware_scores(view: BlockView, grams: BlockGrams, prior: UnitScores, gqa: Gqa) -> UnitScores:
    """The method's scores ``prior`` handed out again in the refit-aware order: in each module, the unit the
    greedy removes k-th takes the values of the unit ``prior`` ranks k-th. Every block keeps the values it had,
    so any allocation takes as many units from it as the method does; the refit decides which. Attention units
    (whole KV groups or heads, by ``gqa``) over o_proj's columns, FFN channels over down_proj's."""
    hd, width = view.head_dim, view.widths
    heads = torch.tensor(attention_units(width, gqa, view.heads_removable))  # [units, heads of each]
    # the K/V heads' scores where a unit holds its K/V head, else None
    kv_heads = prior.kv_heads if len(heads) == width.num_kv_heads else None
    unit_prior = prior.heads.double()[heads].sum(1) + (kv_heads.double() if kv_heads is not None else 0)
    columns = (heads[:, :, None] * hd + torch.arange(hd)).flatten(1)
    order, _ = greedy_removal(augmented(view.o.weight, view.o.bias), grams.attn.gram(), columns, unit_prior)
    source = torch.empty(len(heads), dtype=torch.long)
    source[torch.tensor(order)] = torch.argsort(unit_prior, stable=True)  # whose values each unit takes
    attn_channels = None
    if prior.attn_channels is not None:
        attn_channels = prior.attn_channels.clone()
        attn_channels[columns] = prior.attn_channels[columns[source]]
    moved = UnitScores(prior.heads.clone(), prior.channels.double().clone(),
                       prior.kv_heads if kv_heads is None else kv_heads[source], attn_channels)
    moved.heads[heads] = prior.heads[heads[source]]
    channels = torch.arange(width.intermediate_size)[:, None]
    down = augmented(view.down.weight, view.down.bias)
    order, _ = greedy_removal(down, grams.ffn.gram(), channels, prior.channels.double())
    moved.channels[torch.tensor(order)] = prior.channels.double().sort().values
    return moved


def greedy_removal(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor,
                   prior: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """All units in greedy removal order and each one's error at the step it went (see the module's docstring).
    The weight and the inverse shrink to the columns still there as units go."""
    device = gram.device
    w = weight.to(device=device, dtype=torch.float64)
    h = gram.double().clone()
    add_ridge(h)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=device)
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
