"""llama.cpp's architectures as the GGUF export writes them: which one computes a family's blocks, what each
cannot hold, and the hyperparameters a family needs beyond the common ones.

Llama-shaped blocks (Llama, Mistral, Qwen2, and Phi-3, whose fused maps are written apart) go to ``llama``,
or to ``deci`` where the widths differ per layer. The other families go to llama.cpp's own architecture for
them, which holds one head count and one FFN width for every layer: their per-layer results are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import gguf

from .adapters import BlockView
from .errors import PruneError
from .options import Serving

T = gguf.MODEL_TENSOR
QKV_BIASES = (T.ATTN_Q, T.ATTN_K, T.ATTN_V)  # loaded where present, in every architecture
ALL_BIASES = QKV_BIASES + (T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load time, so expressible as rope_freqs
QUANT_BLOCK = 32  # the smallest quantization block: a row of another length is stored as f16


@dataclass(frozen=True)
class Layout:
    """One of llama.cpp's architectures. ``rope_pairs``: it rotates adjacent pairs ("norm" RoPE), so q/k
    rows go from Hugging Face's half-split order to GGML's; ``per_layer``: it reads per-layer head and FFN
    counts; ``biases``: the projections whose biases its graph adds; ``rope_freqs``: it reads scaled RoPE
    from a ``rope_freqs`` tensor; ``windowed``: it computes sliding-window layers as such; ``own_head``: it
    reads an LM head of its own (else it always reuses the embedding); ``extras``
    writes further hyperparameters, ``check`` refuses what the graph would compute otherwise."""

    name: str
    rope_pairs: bool = False
    per_layer: bool = False
    biases: tuple[gguf.MODEL_TENSOR, ...] = QKV_BIASES
    rope_freqs: bool = False
    windowed: bool = False
    own_head: bool = True
    extras: Callable[[gguf.GGUFWriter, object], None] | None = None
    check: Callable[[object, list[BlockView]], None] | None = None


def check_smollm3(config, blocks: list[BlockView]) -> None:
    """llama.cpp's smollm3 graph skips RoPE in every fourth layer, whatever the file says."""
    expected = [int((i + 1) % 4 != 0) for i in range(len(blocks))]
    if list(config.no_rope_layers) != expected:
        raise PruneError("llama.cpp's smollm3 layout skips RoPE in every fourth layer; this model's layers "
                         f"without RoPE are {[i for i, r in enumerate(config.no_rope_layers) if not r]}")


def check_olmo2(config, blocks: list[BlockView]) -> None:
    """llama.cpp's olmo2 graph takes the query width to be the hidden size."""
    if any(view.q.out_features != config.hidden_size for view in blocks):
        raise PruneError("llama.cpp's olmo2 layout takes the query width to be the hidden size; this model's is "
                         f"{blocks[0].q.out_features} against {config.hidden_size}")


def check_gemma(config, blocks: list[BlockView], large_model_layers: int) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or in the largest model by 1/sqrt(hidden / heads)
    (recognised by its layer count), where Gemma's config says 1/sqrt(query_pre_attn_scalar)."""
    view = blocks[0]
    scalar = config.hidden_size / view.widths.num_heads if len(blocks) == large_model_layers else view.head_dim
    if scalar != config.query_pre_attn_scalar:
        raise PruneError(f"llama.cpp would scale this model's queries by 1/sqrt({scalar:g}), its config says "
                         f"1/sqrt({config.query_pre_attn_scalar}); the {config.model_type} layout cannot hold that")


def check_gemma2(config, blocks: list[BlockView]) -> None:
    check_gemma(config, blocks, large_model_layers=46)
    if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
        raise PruneError("llama.cpp's gemma2 graph always soft-caps attention and final logits; this model does not")


def check_gemma3(config, blocks: list[BlockView]) -> None:
    check_gemma(config, blocks, large_model_layers=62)
    if config.attn_logit_softcapping is not None:
        raise PruneError("llama.cpp's gemma3 graph does not soft-cap attention logits; this model does")


def sliding_window_fields(writer: gguf.GGUFWriter, config) -> None:
    """The window and which layers use it."""
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])


def gemma2_fields(writer: gguf.GGUFWriter, config) -> None:
    sliding_window_fields(writer, config)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)


def gemma3_fields(writer: gguf.GGUFWriter, config) -> None:
    sliding_window_fields(writer, config)
    writer.add_rope_freq_base_swa(rope_parameters(config, "sliding_attention")["rope_theta"])
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


LLAMA = Layout("llama", rope_pairs=True, biases=ALL_BIASES, rope_freqs=True)
GEMMA = Layout("gemma2", windowed=True, own_head=False, biases=(), extras=gemma2_fields, check=check_gemma2)
# model_type -> (layout for blocks of one size, layout for per-layer sizes or None)
LAYOUTS: dict[str, tuple[Layout, Layout | None]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "phi3"), (LLAMA, replace(LLAMA, name="deci", per_layer=True))),
    "qwen3": (Layout("qwen3"), None),
    "smollm3": (Layout("smollm3", rope_pairs=True, check=check_smollm3), None),
    "olmo2": (Layout("olmo2", check=check_olmo2), None),
    "gemma2": (GEMMA, None),
    "gemma3_text": (replace(GEMMA, name="gemma3", own_head=True, extras=gemma3_fields, check=check_gemma3), None),
}


def serving(config) -> Serving:
    """What llama.cpp computes for this model's family (``--target llamacpp``): per-layer widths where its
    ``deci`` graph serves the family, output biases where the graph adds them, rows of quantization blocks."""
    uniform, per_layer = LAYOUTS[config.model_type]
    biases = set((per_layer or uniform).biases)
    return Serving(per_layer=per_layer is not None, output_biases={T.ATTN_OUT, T.FFN_DOWN} <= biases,
                   row_multiple=QUANT_BLOCK)


def layout_for(config, blocks: list[BlockView]) -> Layout:
    """The llama.cpp layout that computes these blocks as transformers does; a PruneError where none does."""
    uniform, per_layer = LAYOUTS[config.model_type]
    layout = uniform if len({view.widths for view in blocks}) == 1 else per_layer
    if layout is None:
        raise PruneError(f"llama.cpp's {uniform.name} layout holds one head count and one FFN width for every "
                         "layer, and this model's differ; prune with --target llamacpp (--allocation uniform, chosen "
                         "by the same scores) for a file llama.cpp runs")
    check_rope(config, layout)
    if not layout.own_head and not config.tie_word_embeddings:
        raise PruneError(f"llama.cpp's {layout.name} layout always reuses the embedding as LM head, and this model "
                         "has an LM head of its own")
    for view in blocks:
        check_biases(layout, view)
    if layout.check is not None:
        layout.check(config, blocks)
    return layout


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of one kind of layer (Gemma 3 keeps one set per kind, the others one in all)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get(layer_type, parameters)


def rope_base(config) -> float:
    """The RoPE base frequency of the global layers."""
    return float(rope_parameters(config).get("rope_theta", 10000.0))


def check_rope(config, layout: Layout) -> None:
    """Refuse a RoPE llama.cpp would compute otherwise in ``layout``: scaled where it reads no rope_freqs,
    partial rotary."""
    allowed = ROPE_TYPES if layout.rope_freqs else ("default",)
    for kind in set(getattr(config, "layer_types", None) or ["full_attention"]):
        rope_type = rope_parameters(config, kind).get("rope_type", "default")
        if rope_type not in allowed:
            raise PruneError(f"RoPE type {rope_type!r} cannot be written in llama.cpp's {layout.name} layout here; "
                             f"supported: {', '.join(allowed)}")
    factors = (getattr(config, "partial_rotary_factor", None), rope_parameters(config).get("partial_rotary_factor"))
    if any(f is not None and f != 1.0 for f in factors):  # transformers 5 may keep it in rope_parameters alone
        raise PruneError(f"partial rotary embeddings cannot be written to llama.cpp's {layout.name} layout")


def check_biases(layout: Layout, view: BlockView) -> None:
    """Refuse a non-zero bias the layout's graph would leave out."""
    projections = zip(ALL_BIASES, (view.q, view.k, view.v, view.o, view.gate, view.up, view.down))
    for kind, projection in projections:
        if kind not in layout.biases and projection.bias is not None and bool(projection.bias.any()):
            name = gguf.TENSOR_NAMES[kind].format(bid=view.index)
            raise PruneError(f"llama.cpp's {layout.name} graph adds no {name} bias, and this model has one "
                             "(bias compensation or reconstruction puts it there: prune with --target llamacpp "
                             "for this export)")
