"""The keys units are ranked by, inside a block and across blocks (``--normalize``)."""

from __future__ import annotations

import torch

from .errors import PruneError
from .metrics import UnitScores
from .options import Normalize
from .units import BlockUnits

# --normalize values that rank by channel-standardised scores: whether they standardise logarithms
CHANNEL_RANKINGS = {"channels": False, "log-channels": True}


def ranking_scores(scores: UnitScores, head_dim: int, normalize: Normalize) -> UnitScores:
    """The scores a block's units are ordered and ranked by: ``scores`` themselves, or their channel
    standardisation where ``normalize`` ranks so."""
    return standardised(scores, head_dim, CHANNEL_RANKINGS[normalize]) if normalize in CHANNEL_RANKINGS else scores


def standardised(scores: UnitScores, head_dim: int, log: bool = False) -> UnitScores:
    """FLAP's standardisation: every attention channel's and every FFN channel's value standardised
    over the block's channels of its module; a head scores the mean of its channels' values.
    ``log``: standardise the logarithms, so that any power of the scores ranks alike."""
    if scores.attn_channels is None:
        raise PruneError("--normalize channels needs per-channel attention scores, which this metric does not give")
    values = _log_scores if log else torch.Tensor.double
    attn = _zscore(values(scores.attn_channels))
    return UnitScores(heads=attn.view(-1, head_dim).mean(-1), channels=_zscore(values(scores.channels)))


def _log_scores(x: torch.Tensor) -> torch.Tensor:
    """log of non-negative scores; zeros sit a factor 1e6 below the smallest positive score."""
    x = x.double()
    floor = x[x > 0].min() * 1e-6 if (x > 0).any() else x.new_tensor(1.0)
    return x.clamp_min(floor).log()


def ranking_keys(u: BlockUnits, normalize: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ranking keys of a block's attention units and channels (in removal order).

    none: score per parameter; output: the same relative to the block's ||y||; channels (FLAP):
    scores standardised per block and module over channels (``standardised``), an attention unit
    keyed by the mean over its heads; log-channels: the same over the scores' logarithms; zscore:
    scores standardised per block and module over removable units (degenerate with few units:
    kept for the earlier ``bip`` default).
    """
    if normalize in CHANNEL_RANKINGS:
        return u.attn_scores / len(u.attn_heads[0]), u.channel_scores
    if normalize == "zscore":
        return _zscore(u.attn_scores), _zscore(u.channel_scores)
    scale = u.output_norm if normalize == "output" else 1.0
    return u.attn_scores / scale / u.attn_cost, u.channel_scores / scale / u.costs.channel


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)
