"""Architecture adapters: the only place that knows how a model family names and wires its blocks.

The engine sees a decoder block through :class:`BlockView`, by role: the attention's inputs (the q, k
and v projections, as :class:`Rows`: whole linear maps, or row ranges of a fused one) and output (o),
the FFN's inputs (gate, up) and output (down), and the norms on the residual path (:class:`Norm`):
before each branch, and after it where the family puts one there ("sandwich" norms). :class:`Widths`
are a block's prunable sizes. A family is one small :class:`ModelAdapter` subclass that names these
parts once; ``ADAPTERS`` maps each ``model_type`` to its adapter.

The views are in block_view.py, the base class in adapter_base.py, the families in family_adapters.py;
this module is the registry and their public home.
"""

from __future__ import annotations

from .adapter_base import ModelAdapter
from .block_view import BlockView, Norm, Rows, Widths
from .errors import PruneError
from .family_adapters import (
    Gemma2Adapter,
    Gemma3Adapter,
    LlamaAdapter,
    MistralAdapter,
    Olmo2Adapter,
    Phi3Adapter,
    Qwen2Adapter,
    Qwen3Adapter,
    SmolLM3Adapter,
)

__all__ = ["ADAPTERS", "BlockView", "ModelAdapter", "Norm", "Rows", "Widths", "adapter_for", "supported_model_types"]

ADAPTERS: dict[str, ModelAdapter] = {
    model_type: adapter()
    for adapter in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, SmolLM3Adapter, Gemma2Adapter,
                    Gemma3Adapter, Phi3Adapter, Olmo2Adapter)
    for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    """Every model_type an adapter prunes, sorted."""
    return sorted(ADAPTERS)


def adapter_for(config) -> ModelAdapter:
    """The adapter for a model config, or a PruneError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PruneError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]
