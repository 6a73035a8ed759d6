"""Named methods: a scoring metric plus the allocation, normalisation and compensation it is
defined with. Any option a user sets explicitly overrides the method's own choice."""

from __future__ import annotations

from .errors import PruneError

BASE_DEFAULTS = {
    "allocation": "uniform",
    "normalize": "none",
    "compensate": False,
    "keep_dense": [],
    "lipschitz": "spectral",
    "head_score": "channels",
}

METHODS: dict[str, dict] = {
    # tuned on PTB valid (docs/tuning.md): exact head change, bias compensation where possible,
    # one ranking across blocks of scores standardised per block and module; the FFN's Lipschitz
    # factor is the same for every head of a block, so z-scores cancel it: not computed
    "bip": {"metric": "bip", "head_score": "exact", "compensate": "auto", "allocation": "global",
            "normalize": "zscore", "lipschitz": "none"},
    "bip-paper": {"metric": "bip", "lipschitz": "spectral", "head_score": "channels", "compensate": False},
    "random": {"metric": "random"},
    "magnitude": {"metric": "magnitude"},
    "wanda-sp": {"metric": "wanda-sp", "allocation": "uniform"},
    "flap": {"metric": "flap", "allocation": "global", "normalize": "zscore", "compensate": True},
    "llm-pruner": {"metric": "llm-pruner", "allocation": "uniform", "keep_dense": [0, -1]},
}


def method_defaults(name: str) -> dict:
    """The option values a method implies, for every option it does not leave to the base defaults."""
    if name not in METHODS:
        raise PruneError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return {**BASE_DEFAULTS, **METHODS[name]}
