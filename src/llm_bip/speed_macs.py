"""MACs (multiply-accumulates) per token, counted from the instantiated modules, so the per-layer widths of
a pruned folder count as built: the linear maps (attention q/k/v/o, FFN gate/up/down, LM head) and
the attention products (query-key scores and the weighted sum of values). A query attending to
``context`` key positions, itself included, costs 2 * heads * head_dim * context product MACs per
layer. Prefill of L tokens under a causal mask: the average query attends to (L+1)/2 positions; a
decode step at (1-based) position p attends to p. Norms, rotary embeddings, softmax, activations
and the embedding lookup are not counted (elementwise, O(hidden) per token).
"""

from __future__ import annotations

from torch import nn

from .adapters import adapter_for


def linear_macs(linear: nn.Linear) -> int:
    """MACs per token of one linear map (a bias add is not a MAC)."""
    return linear.in_features * linear.out_features


def macs_per_token(model, context: float) -> dict[str, float]:
    """MACs of one token through ``model`` when its queries attend to ``context`` key positions."""
    views = adapter_for(model.config).blocks(model)
    counts = {
        "attention_linear": sum(linear_macs(m) for v in views for m in v.attention_projections()),
        "attention_products": sum(2 * v.widths.num_heads * v.head_dim * context for v in views),
        "ffn": sum(linear_macs(m) for v in views for m in v.ffn_projections()),
        "lm_head": linear_macs(model.get_output_embeddings()),
    }
    return {"context": context, **counts, "total": sum(counts.values())}


def prefill_context(length: int) -> float:
    """Key positions the average query of a causal prefill of ``length`` tokens attends to."""
    return (length + 1) / 2


def decode_context(prompt_length: int, steps: int) -> float:
    """Average key positions of ``steps`` decode steps after a prompt (step k sits at P + k + 1)."""
    return prompt_length + (steps + 1) / 2
