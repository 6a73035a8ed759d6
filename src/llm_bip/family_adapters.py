"""One :class:`ModelAdapter` subclass per supported model family: what differs from Llama's block."""

from __future__ import annotations

import copy

from torch import nn

from .adapter_base import ModelAdapter
from .block_view import BlockView, Rows, Widths


class LlamaAdapter(ModelAdapter):
    """Llama 1/2/3, Vicuna, SmolLM/SmolLM2: biases on every projection can be declared (compensation)."""

    model_types = ("llama",)
    bias_flags = ("attention_bias", "mlp_bias")


class MistralAdapter(ModelAdapter):
    """Mistral: no biases."""

    model_types = ("mistral",)


class Qwen2Adapter(ModelAdapter):
    """Qwen2 / Qwen2.5: biases on q, k and v only."""

    model_types = ("qwen2",)


class Qwen3Adapter(ModelAdapter):
    """Qwen3: RMSNorm per head on q and k (one gain over head_dim, shared by all heads: kept as it is)."""

    model_types = ("qwen3",)
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")


class SmolLM3Adapter(ModelAdapter):
    """SmolLM3: Llama's block; some layers apply no RoPE (``no_rope_layers``, read per layer index)."""

    model_types = ("smollm3",)
    bias_flags = ("attention_bias", "mlp_bias")


class Gemma2Adapter(ModelAdapter):
    """Gemma 2: sandwich norms, gains of (1 + weight). Its ``post_attention_layernorm`` normalises the
    attention's output; the FFN's input norm is ``pre_feedforward_layernorm``."""

    model_types = ("gemma2",)
    mlp_norm = "pre_feedforward_layernorm"
    attn_out_norm = "post_attention_layernorm"
    ffn_out_norm = "post_feedforward_layernorm"
    norm_offset = 1.0


class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3 text models (gemma-3-1b, or the language model saved alone): Gemma 2's block with q/k
    norms per head."""

    model_types = ("gemma3_text",)
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")


class Phi3Adapter(ModelAdapter):
    """Phi-3 / Phi-4: q, k, v fused in ``qkv_proj`` and gate, up in ``gate_up_proj``; the attention
    reads its query width from its config."""

    model_types = ("phi3",)
    projections = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                   "down": "mlp.down_proj"}

    def input_rows(self, layer: nn.Module) -> tuple[Rows, ...]:
        """q, k, v: the query width is o_proj's input width, k and v share the rest; gate, up: halves."""
        qkv, gate_up = (layer.get_submodule(self.projections[role]) for role in ("qkv", "gate_up"))
        q = layer.get_submodule(self.projections["o"]).in_features
        kv = (qkv.out_features - q) // 2
        ffn = gate_up.out_features // 2
        return (Rows(qkv, 0, q), Rows(qkv, q, q + kv), Rows(qkv, q + kv, q + 2 * kv),
                Rows(gate_up, 0, ffn), Rows(gate_up, ffn, 2 * ffn))

    def set_widths(self, view: BlockView, widths: Widths) -> None:
        config = copy.copy(view.attention.config)  # shared with the other blocks: this block's own copy
        for key, value in widths.as_config().items():
            setattr(config, key, value)
        view.attention.config = config
        view.attention.num_key_value_heads = widths.num_kv_heads
        view.attention.num_key_value_groups = widths.group_size


class Olmo2Adapter(ModelAdapter):
    """OLMo 2: no norm before either branch, one after each; q/k norms over all heads' channels."""

    model_types = ("olmo2",)
    attn_norm = None
    mlp_norm = None
    attn_out_norm = "post_attention_layernorm"
    ffn_out_norm = "post_feedforward_layernorm"
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")
    heads_kept_because = "its q/k norms span all heads' channels, so removing a head would change every other one"
