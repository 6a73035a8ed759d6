"""GGUF tensors: a model's weights by the blocks' roles, named and ordered as llama.cpp's converter writes them
(q/k rows in GGML's RoPE order where the layout rotates adjacent pairs, norm gains as the family applies them,
``rope_freqs`` for scaled RoPE), and the row widths a quantized type can hold."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import torch

from .adapters import BlockView, Norm, adapter_for
from .errors import PruneError
from .gguf_layouts import QUANT_BLOCK, Layout, rope_base


def rope_factors(model, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (it divides each default frequency by its factor) for scaled RoPE
    (linear, llama3), from the frequencies the model actually uses; None for plain RoPE."""
    rotary = adapter_for(model.config).rotary(model)
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise PruneError("RoPE with attention scaling (e.g. YaRN) cannot be written to GGUF here")
    base = rope_base(model.config)
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = default / rotary.inv_freq.double().cpu()
    return None if torch.allclose(factors, torch.ones_like(factors)) else factors.float()


def model_tensors(model, layout: Layout, blocks: list[BlockView]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF tensor name, tensor) of the whole model: q/k rows permuted to GGML's RoPE pair order where the
    layout rotates adjacent pairs, norms as the gains they apply, biases only where they are not zero, the
    LM head only where it is not tied to the embedding."""
    names = gguf.TENSOR_NAMES
    yield names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", model.get_input_embeddings().weight
    yield names[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight", adapter_for(model.config).final_norm(model).gain()
    if not model.config.tie_word_embeddings:
        yield names[gguf.MODEL_TENSOR.OUTPUT] + ".weight", model.get_output_embeddings().weight
    factors = rope_factors(model, blocks[0].head_dim) if layout.rope_freqs else None
    if factors is not None:
        yield names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    for view in blocks:
        for kind, weight, bias in block_tensors(view):
            name = names[kind].format(bid=view.index)
            yield name + ".weight", rope_order(weight, view, kind) if layout.rope_pairs else weight
            if bias is not None and bool(bias.any()):
                yield name + ".bias", rope_order(bias, view, kind) if layout.rope_pairs else bias


def block_tensors(view: BlockView) -> list[tuple[gguf.MODEL_TENSOR, torch.Tensor, torch.Tensor | None]]:
    """(GGUF tensor kind, weight, bias) of one block's norms (those the family has) and projections, in the
    order llama.cpp's converter writes them."""
    t = gguf.MODEL_TENSOR
    parts = ((t.ATTN_NORM, view.attn_norm), (t.ATTN_Q, view.q), (t.ATTN_K, view.k), (t.ATTN_V, view.v),
             (t.ATTN_Q_NORM, view.q_norm), (t.ATTN_K_NORM, view.k_norm), (t.ATTN_OUT, view.o),
             (t.ATTN_POST_NORM, view.attn_out_norm), (t.FFN_NORM, view.mlp_norm), (t.FFN_GATE, view.gate),
             (t.FFN_UP, view.up), (t.FFN_DOWN, view.down), (t.FFN_POST_NORM, view.ffn_out_norm))
    return [(kind, part.gain(), None) if isinstance(part, Norm) else (kind, part.weight, part.bias)
            for kind, part in parts if part is not None]


def rope_order(tensor: torch.Tensor, view: BlockView, kind: gguf.MODEL_TENSOR) -> torch.Tensor:
    """Q and K rows (weights or biases) of each head from Hugging Face's half-split RoPE order
    (x_i pairs with x_{i+d/2}) to GGML's adjacent pairs (x_{2i} with x_{2i+1}); other tensors as they are."""
    if kind not in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        return tensor
    heads = tensor.shape[0] // view.head_dim
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 2, view.head_dim // 2, *rest).transpose(1, 2).reshape(tensor.shape)


def check_quantizable(model, file_type: str) -> None:
    """Refuse widths a quantized type cannot hold: llama.cpp stores a matrix whose rows are not a multiple
    of 32 long as f16 (K-quants fall back to a 32-block type for rows not a multiple of 256)."""
    for view in adapter_for(model.config).blocks(model):
        for kind, weight, _ in block_tensors(view):
            width = weight.shape[-1]
            if weight.dim() == 2 and width % QUANT_BLOCK:
                name = gguf.TENSOR_NAMES[kind].format(bid=view.index)
                raise PruneError(f"{name} has rows of {width} values, not a multiple of {QUANT_BLOCK}, so llama.cpp "
                                 f"would store it as f16, not {file_type}; prune with --round-to {QUANT_BLOCK} "
                                 "(as --target llamacpp does), or pass --allow-f16-rows")
