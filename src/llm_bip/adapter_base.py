"""The adapter base class: how a model family names and wires its decoder blocks (Llama's names by default)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .block_view import BlockView, Norm, Rows, Widths
from .errors import PruneError


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
        """The view of decoder block ``index``, its parts found by the names above."""
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
        """Refuse bias compensation for a family that cannot declare output biases."""
        if not self.supports_compensation():
            from .adapters import ADAPTERS, supported_model_types  # the registry imports this module

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
