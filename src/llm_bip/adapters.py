"""Architecture adapters: the only place that knows module names of a model family.

The engine sees a decoder block through :class:`BlockView` (the seven linear maps of a
LLaMA-style block and its post-attention norm) and :class:`Widths` (its prunable sizes).
A new family registers a subclass of :class:`ModelAdapter` in ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Widths:
    """Prunable sizes of one decoder block."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (n_rep)."""
        return self.num_heads // self.num_kv_heads

    def as_config(self) -> dict[str, int]:
        """The same sizes under transformers' config attribute names."""
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
        }

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class BlockView:
    """Handles on the parts of a pre-norm block that pruning reads and rewrites."""

    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    attn_norm: nn.Module
    mlp_norm: nn.Module
    head_dim: int

    @property
    def widths(self) -> Widths:
        return Widths(
            num_heads=self.q.out_features // self.head_dim,
            num_kv_heads=self.k.out_features // self.head_dim,
            intermediate_size=self.gate.out_features,
        )

    @property
    def hidden_size(self) -> int:
        return self.o.out_features

    def attention_linears(self) -> tuple[nn.Linear, ...]:
        return self.q, self.k, self.v, self.o

    def ffn_linears(self) -> tuple[nn.Linear, ...]:
        return self.gate, self.up, self.down

    def linears(self) -> tuple[nn.Linear, ...]:
        """The seven projections: q, k, v, o, then gate, up, down."""
        return self.attention_linears() + self.ffn_linears()

    def prunable_parameters(self) -> int:
        """Parameters of the attention and FFN linear maps (norms excluded)."""
        return sum(p.numel() for m in self.linears() for p in m.parameters())


class ModelAdapter:
    """LLaMA-style decoder (Llama 1/2/3, Vicuna, Mistral, Qwen2, SmolLM).

    Subclass and override the accessors for families whose modules are named otherwise.
    """

    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def block(self, model: nn.Module, index: int) -> BlockView:
        layer = self.layers(model)[index]
        attn, mlp = layer.self_attn, layer.mlp
        return BlockView(
            layer=layer, attention=attn, mlp=mlp,
            q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
            gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
            attn_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm, head_dim=attn.head_dim,
        )

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last block and the LM head."""
        return model.model.norm

    def rotary(self, model: nn.Module) -> nn.Module:
        """The rotary embedding (its ``inv_freq`` and ``attention_scaling``)."""
        return model.model.rotary_emb

    def set_widths(self, view: BlockView, widths: Widths) -> None:
        """Update the attributes the block's forward reads after its weights were resized."""
        view.attention.num_key_value_groups = widths.group_size
        view.mlp.intermediate_size = widths.intermediate_size

    def supports_compensation(self, config) -> bool:
        """Bias compensation needs o_proj/down_proj biases, which only Llama's config can declare
        (``attention_bias``/``mlp_bias``; Mistral and Qwen2 hard-code them off)."""
        return config.model_type == "llama"

    def check_compensation(self, config) -> None:
        from .errors import PruneError

        if not self.supports_compensation(config):
            raise PruneError(f"bias compensation needs output biases, which {config.model_type!r} models cannot "
                             "hold in stock transformers; it is supported for llama models")

    def add_output_biases(self, view: BlockView) -> None:
        """Zero biases on every projection that lacks one (Llama's flags cover all four attention
        and all three FFN projections), and the config flags that declare them."""
        for linear in view.linears():
            if linear.bias is None:
                w = linear.weight
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        view.attention.config.attention_bias = True
        view.mlp.config.mlp_bias = True

    def allows_heads(self, config, num_heads: int) -> bool:
        """Whether ``config``'s class accepts this global ``num_attention_heads``: LlamaConfig's validation
        (transformers 5.x) insists on hidden_size % num_attention_heads == 0 even when head_dim is
        explicit, and checks the global field only (per-layer entries may hold any count); Mistral's
        and Qwen2's accept any count."""
        return config.model_type != "llama" or config.hidden_size % num_heads == 0


ADAPTERS: dict[str, ModelAdapter] = {t: ModelAdapter() for t in ModelAdapter.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> ModelAdapter:
    """The adapter for a model config, or a PruneError naming the supported families."""
    from .errors import PruneError

    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PruneError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]

