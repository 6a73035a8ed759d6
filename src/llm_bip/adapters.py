"""Architecture adapters: the only place that knows how a model family names and wires its blocks.

The engine sees a decoder block through :class:`BlockView`, by role: the attention's inputs (the q, k
and v projections, as :class:`Rows`: whole linear maps, or row ranges of a fused one) and output (o),
the FFN's inputs (gate, up) and output (down), and the norms on the residual path (:class:`Norm`):
before each branch, and after it where the family puts one there ("sandwich" norms). :class:`Widths`
are a block's prunable sizes. A family is one small :class:`ModelAdapter` subclass that names these
parts once; ``ADAPTERS`` maps each ``model_type`` to its adapter.
"""

from __future__ import annotations

import copy
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


@dataclass(frozen=True)
class Rows:
    """One projection: the output rows [start, stop) of a linear map, all of them unless the family
    fuses several projections into one map (Phi-3's qkv_proj and gate_up_proj)."""

    linear: nn.Linear
    start: int
    stop: int

    @classmethod
    def whole(cls, linear: nn.Linear) -> "Rows":
        return cls(linear, 0, linear.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.start:self.stop]

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.linear.weight.grad
        return None if grad is None else grad[self.start:self.stop]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Norm:
    """An RMSNorm on a block's path; ``offset``: the family scales by (offset + weight) (Gemma: 1)."""

    module: nn.Module
    offset: float = 0.0

    def gain(self) -> torch.Tensor:
        return self.module.weight.detach() + self.offset

    @property
    def eps(self) -> float:
        module = self.module
        return float(module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps)


@dataclass
class BlockView:
    """The parts of decoder block ``index`` that pruning reads and rewrites, by role.

    ``attn_norm`` and ``mlp_norm`` normalise each branch's input (None: the branch reads the residual
    itself, OLMo 2); ``attn_out_norm`` and ``ffn_out_norm`` normalise each branch's output before the
    residual add (Gemma's sandwich, OLMo 2), else None; ``q_norm`` and ``k_norm`` normalise queries and
    keys where the family does (per head: Qwen3, Gemma 3; over all heads: OLMo 2). ``heads_removable``:
    False where removing a head would change the others (a q/k norm over all heads' channels)."""

    index: int
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    q: Rows
    k: Rows
    v: Rows
    o: nn.Linear
    gate: Rows
    up: Rows
    down: nn.Linear
    attn_norm: Norm | None
    mlp_norm: Norm | None
    attn_out_norm: Norm | None
    ffn_out_norm: Norm | None
    head_dim: int
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    heads_removable: bool = True

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

    def attention_projections(self) -> tuple[Rows | nn.Linear, ...]:
        return self.q, self.k, self.v, self.o

    def ffn_projections(self) -> tuple[Rows | nn.Linear, ...]:
        return self.gate, self.up, self.down

    def linears(self) -> tuple[nn.Linear, ...]:
        """The block's distinct linear maps (a fused map once), in projection order."""
        maps = [p.linear if isinstance(p, Rows) else p for p in self.attention_projections() + self.ffn_projections()]
        return tuple(dict.fromkeys(maps))

    def prunable_parameters(self) -> int:
        """Parameters of the attention and FFN linear maps (norms excluded)."""
        return sum(p.numel() for m in self.linears() for p in m.parameters())


class ModelAdapter:
    """A pre-norm decoder block with seven separate projections, named as in Llama. A family subclasses
    this and changes what differs: the names below, ``input_rows`` for fused projections, ``set_widths``
    for what its forward reads after a cut."""

    model_types: tuple[str, ...] = ()
    # the parts of a decoder layer, by role (None: the family has no such norm)
    attention, mlp = "self_attn", "mlp"
    projections = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    attn_out_norm: str | None = None
    ffn_out_norm: str | None = None
    qk_norms: tuple[str, str] | None = None
    norm_offset = 0.0
    # config flags that give every projection a bias (o_proj's and down_proj's hold bias compensation)
    bias_flags: tuple[str, ...] = ()
    # why no head may go, where none may (only FFN channels are pruned then)
    heads_kept_because: str | None = None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def blocks(self, model: nn.Module) -> list[BlockView]:
        """Every decoder block's view, in order."""
        return [self.block(model, i) for i in range(len(self.layers(model)))]

    def block(self, model: nn.Module, index: int) -> BlockView:
        layer = self.layers(model)[index]
        attention = layer.get_submodule(self.attention)
        q, k, v, gate, up = self.input_rows(layer)
        q_norm, k_norm = (self._norm(layer, name) for name in self.qk_norms or (None, None))
        return BlockView(
            index=index, layer=layer, attention=attention, mlp=layer.get_submodule(self.mlp),
            q=q, k=k, v=v, o=layer.get_submodule(self.projections["o"]),
            gate=gate, up=up, down=layer.get_submodule(self.projections["down"]),
            attn_norm=self._norm(layer, self.attn_norm), mlp_norm=self._norm(layer, self.mlp_norm),
            attn_out_norm=self._norm(layer, self.attn_out_norm), ffn_out_norm=self._norm(layer, self.ffn_out_norm),
            head_dim=attention.head_dim, q_norm=q_norm, k_norm=k_norm, heads_removable=self.heads_kept_because is None,
        )

    def input_rows(self, layer: nn.Module) -> tuple[Rows, ...]:
        """The rows of q, k, v, gate and up."""
        return tuple(Rows.whole(layer.get_submodule(self.projections[role])) for role in ("q", "k", "v", "gate", "up"))

    def _norm(self, layer: nn.Module, name: str | None) -> Norm | None:
        return None if name is None else Norm(layer.get_submodule(name), self.norm_offset)

    def final_norm(self, model: nn.Module) -> Norm:
        """The norm between the last block and the LM head."""
        return Norm(model.model.norm, self.norm_offset)

    def rotary(self, model: nn.Module) -> nn.Module:
        """The rotary embedding (its ``inv_freq`` and ``attention_scaling``)."""
        return model.model.rotary_emb

    def set_widths(self, view: BlockView, widths: Widths) -> None:
        """Update the attributes the block's forward reads after its weights were resized."""
        view.attention.num_key_value_groups = widths.group_size
        view.mlp.intermediate_size = widths.intermediate_size

    def supports_compensation(self) -> bool:
        """Bias compensation needs o_proj and down_proj biases, which only some families' configs can declare."""
        return bool(self.bias_flags)

    def check_compensation(self, config) -> None:
        from .errors import PruneError

        if not self.supports_compensation():
            able = ", ".join(t for t in supported_model_types() if ADAPTERS[t].bias_flags)
            raise PruneError(f"bias compensation needs output biases, which {config.model_type!r} models cannot "
                             f"hold in stock transformers (it is supported for {able} models); pass --no-compensate")

    def add_output_biases(self, view: BlockView) -> None:
        """Zero biases on every linear map that lacks one, and the config flags that declare them."""
        for linear in view.linears():
            if linear.bias is None:
                w = linear.weight
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        for flag in self.bias_flags:
            setattr(view.attention.config, flag, True)
            setattr(view.mlp.config, flag, True)

    def allows(self, config, widths: Widths) -> bool:
        """Whether ``config``'s class accepts these global widths (LlamaConfig and Gemma's, in transformers
        5.x, insist on hidden_size % num_attention_heads == 0 even with an explicit head_dim; they check
        the global fields only, so per-layer entries may hold any count)."""
        trial = copy.deepcopy(config)
        for key, value in widths.as_config().items():
            setattr(trial, key, value)
        try:
            trial.validate_architecture()
        except ValueError:
            return False
        return True


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


ADAPTERS: dict[str, ModelAdapter] = {
    model_type: adapter()
    for adapter in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, SmolLM3Adapter, Gemma2Adapter,
                    Gemma3Adapter, Phi3Adapter, Olmo2Adapter)
    for model_type in adapter.model_types
}


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
