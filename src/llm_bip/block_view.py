"""A decoder block as the engine sees it, by role: :class:`BlockView` of its projections (:class:`Rows`)
and norms (:class:`Norm`), and its prunable sizes (:class:`Widths`). Adapters build these views; nothing
here knows a family's module names.
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
