"""The options of a pruning run: their types, their allowed values and how messages name them.

This module imports nothing of llm_bip's, so every layer can spell its choices with these types.
Values are checked once, by ``PruneConfig.plan`` (config.py); nothing below reads an unchecked one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

Method = Literal["bip", "bip-refit", "bip-unit-zscore", "bip-paper", "random", "magnitude", "wanda-sp", "flap",
                 "llm-pruner"]
Allocation = Literal["uniform", "block", "global"]
Normalize = Literal["none", "output", "zscore", "channels", "log-channels"]
Lipschitz = Literal["spectral", "certified", "none"]
HeadScore = Literal["channels", "exact"]
Gqa = Literal["groups", "heads"]
Compensate = Literal[True, False, "auto"]  # "auto": where the architecture can hold output biases
Selection = Literal["scores", "refit"]  # refit: by the error the refit leaves (selection.py); needs reconstruct
Target = Literal["transformers", "llamacpp"]  # the engine the result must run in (transformers: any widths)

# the options that take one of a fixed set of values
CHOICES = {"method": Method, "allocation": Allocation, "normalize": Normalize, "lipschitz": Lipschitz,
           "head_score": HeadScore, "gqa": Gqa, "compensate": Compensate, "selection": Selection, "target": Target}
# the CLI options spelled otherwise than their field (any other field f is --f, with dashes)
FLAGS = {"n_samples": "--samples", "seqlen": "--calib-seqlen"}
# the fields that decide the scores; a re-prune must agree with the run that made them
SCORING_FIELDS = ("method", "lipschitz", "head_score", "compensate", "sequential", "selection", "calibration",
                  "n_samples", "seqlen", "batch_size", "seed")


class Unit(IntEnum):
    """The two kinds of removable unit of a block."""

    ATTENTION = 0  # a KV group or a per-group head slot
    CHANNEL = 1  # one FFN channel


@dataclass(frozen=True)
class Serving:
    """What the engine a run targets computes for a model's family: per-layer widths, o_proj/down_proj biases,
    and rows of which multiple its quantized matrices hold."""

    per_layer: bool
    output_biases: bool
    row_multiple: int


def option_name(field: str) -> str:
    """How a message names the option ``field``: by the field and the CLI option that sets it."""
    return f"{field} ({FLAGS.get(field, '--' + field.replace('_', '-'))})"


@dataclass(frozen=True)
class AllocationOptions:
    """What the allocator reads of a plan."""

    ratio: float
    allocation: Allocation = "uniform"
    gqa: Gqa = "groups"
    normalize: Normalize = "none"  # see ranking.ranking_keys
    min_channels: float = 0.05  # fraction of FFN channels every block keeps
    round_to: int = 1  # kept FFN widths a multiple of this (or the block's full width)


@dataclass(frozen=True)
class ScoreOptions:
    """What a metric reads of a plan. ``centred`` scores the change left after bias compensation."""

    lipschitz: Lipschitz = "spectral"
    head_score: HeadScore = "channels"
    centred: bool = False
    seed: int = 0
