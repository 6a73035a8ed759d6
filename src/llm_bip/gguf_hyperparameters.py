"""GGUF hyperparameters: a model's sizes, norms, RoPE and context length as llama.cpp reads them."""

from __future__ import annotations

import gguf

from .adapters import BlockView, Widths
from .errors import PruneError
from .gguf_layouts import Layout, rope_base


def check_block(view: BlockView) -> Widths:
    """A block's widths; refused where llama.cpp's graph would compute something else (no heads or no
    FFN channels left: its deci graph skips such parts, and their biases with them)."""
    widths = view.widths
    if widths.num_heads == 0 or widths.intermediate_size == 0:
        raise PruneError(f"layer {view.index} has {widths.num_heads} heads and {widths.intermediate_size} FFN "
                         "channels; llama.cpp cannot run a block with an empty attention or FFN as transformers does")
    return widths


def write_hyperparameters(writer: gguf.GGUFWriter, model, layout: Layout, widths: list[Widths], head_dim: int,
                          ftype: int) -> None:
    """Sizes (per-layer arrays where blocks differ), norms, RoPE, context length, the layout's own fields and
    the file type."""
    config = model.config
    per_layer = len(set(widths)) > 1

    def field(values: list[int]) -> int | list[int]:
        return values if per_layer else values[0]

    writer.add_block_count(len(widths))
    writer.add_context_length(context_length(config, layout))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(field([w.intermediate_size for w in widths]))
    writer.add_head_count(field([w.num_heads for w in widths]))
    writer.add_head_count_kv(field([w.num_kv_heads for w in widths]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_base(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().num_embeddings)
    if layout.extras is not None:
        layout.extras(writer, config)
    writer.add_file_type(ftype)


def context_length(config, layout: Layout) -> int:
    """The trained context; for a model with a sliding window in every layer (Mistral), no longer than the
    window, beyond which llama.cpp's full attention would differ, unless the layout computes windows."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if layout.windowed or window is None:
        return config.max_position_embeddings
    return min(config.max_position_embeddings, window)
