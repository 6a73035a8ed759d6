"""Named methods: a scoring metric plus the allocation, normalisation and compensation it is
defined with. Any option a user sets explicitly overrides the method's own choice."""

from __future__ import annotations

BASE_DEFAULTS = {
    "allocation": "uniform",
    "normalize": "none",
    "compensate": False,
    "lipschitz": "spectral",
    "head_score": "channels",
    "sequential": False,
    "reconstruct": False,
    "selection": "scores",
    "round_to": 1,
}

METHODS: dict[str, dict] = {
    # chosen on PTB valid and a non-PTB validation text (docs/tuning.md): centred channel bounds
    # (bias compensation where possible), one ranking across blocks of the bounds standardised per
    # block and module over channels, then the kept columns refit by least squares; the FFN's
    # Lipschitz factor is the same for every channel of a block, so standardising cancels it: not computed
    "bip": {"metric": "bip", "head_score": "channels", "compensate": "auto", "allocation": "global",
            "normalize": "channels", "lipschitz": "none", "reconstruct": True},
    # bip with refit-aware selection (selection.py): each block's units ranked by the error the refit leaves,
    # the bounds breaking ties; the same cross-block ranking
    "bip-refit": {"metric": "bip", "head_score": "channels", "compensate": "auto", "allocation": "global",
                  "normalize": "channels", "lipschitz": "none", "reconstruct": True, "selection": "refit"},
    # the default until 0.2: exact head change, z-scores over removable units per block and module
    "bip-unit-zscore": {"metric": "bip", "head_score": "exact", "compensate": "auto", "allocation": "global",
                        "normalize": "zscore", "lipschitz": "none"},
    "bip-paper": {"metric": "bip", "lipschitz": "spectral", "head_score": "channels", "compensate": False},
    "random": {"metric": "random"},
    "magnitude": {"metric": "magnitude"},
    # FLAP's prune_wanda_sp: the same share of every layer, each layer scored on the pruned ones' outputs
    "wanda-sp": {"metric": "wanda-sp", "allocation": "uniform", "sequential": True},
    # FLAP's prune_flap, structure AL-AM: one-shot, one threshold over channel-standardised scores
    "flap": {"metric": "flap", "allocation": "global", "normalize": "channels", "compensate": True},
    "llm-pruner": {"metric": "llm-pruner", "allocation": "uniform"},
}

# Layers a method keeps dense unless --keep-dense says otherwise: (share of the first layers, share
# of the last). LLM-Pruner's LLaMA-7B recipe prunes layers 4..29 of 32.
DENSE_SHARES = {"llm-pruner": (4 / 32, 2 / 32)}


def method_dense_layers(name: str, num_layers: int) -> list[int]:
    """The layers method ``name`` keeps dense in a model of ``num_layers`` layers."""
    first, last = DENSE_SHARES.get(name, (0, 0))
    return [*range(round(first * num_layers)), *range(num_layers - round(last * num_layers), num_layers)]


def method_defaults(name: str) -> dict:
    """The option values method ``name`` (a checked one) implies, the base defaults where it names none."""
    return {**BASE_DEFAULTS, **METHODS[name]}
