"""GGUF export: a (pruned) model written as llama.cpp runs it.

Which of llama.cpp's architectures holds a family's blocks, and what it cannot hold, is gguf_layouts.py;
here the file is written: hyperparameters, tensors by the blocks' roles (q/k rows in GGML's RoPE order
where the layout rotates adjacent pairs, norm gains as the family applies them), the tokenizer. f32 and
f16 files are written by the ``gguf`` package; quantized types by llama.cpp's own quantizer from an f32
file. The tokenizer is copied from the GGUF the model came from, where there is one, else built with gguf's
vocabulary helpers from the SentencePiece model it came with (tokenizer.model) or its byte-level BPE
Hugging Face tokenizer.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .adapters import BlockView, Norm, Widths, adapter_for
from .data import needs_bos
from .errors import PruneError
from .gguf_layouts import Layout, layout_for, rope_base
from .llamacpp import quantize, require_llama_cpp
from .loading import load_model
from .outputs import check_apart_from_inputs, input_summary, write_atomically
from .sources import DEFAULT_MODEL, embedded_gguf, local_inputs, resolve_source

# llama.cpp's llama_ftype of each --type
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
WRITTEN = {"f32": np.float32, "f16": np.float16}  # written here; the rest by llama.cpp's quantizer
QUANT_BLOCK = 32  # the smallest quantization block: a row of another length is stored as f16
DESCRIPTIVE = ("general.name", "general.organization", "general.basename", "general.finetune",
                     "general.license", "general.languages")


@dataclass(frozen=True)
class Exported:
    """What ``export_gguf`` wrote."""

    path: Path
    architecture: str
    file_type: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return f"wrote {self.path}: {self.architecture} layout, {self.bytes / 2**20:.1f} MiB, tensors: {types}"


def export_gguf(source: str, out: str | Path, file_type: str = "f16", overwrite: bool = False,
                allow_f16_rows: bool = False) -> Exported:
    """Write the model ``source`` (anything ``load_model`` reads) to the GGUF file ``out`` atomically.
    A quantized ``file_type`` refuses rows whose length is not a multiple of the quantization block
    (llama.cpp would store them as f16) unless ``allow_f16_rows``."""
    out = check_output_file(out, overwrite, source)
    if file_type not in FILE_TYPES:
        raise PruneError(f"unknown --type {file_type!r}; use {', '.join(FILE_TYPES)}")
    if file_type not in WRITTEN:
        require_llama_cpp()
    model, tokenizer = load_model(source)
    layout_for(model.config, adapter_for(model.config).blocks(model))
    if file_type not in WRITTEN and not allow_f16_rows:
        check_quantizable(model, file_type)
    vocabulary = tokenizer_fields(source, tokenizer, model.get_input_embeddings().num_embeddings)
    write_atomically(out, lambda path: write_file(model, vocabulary, Path(path), file_type))
    return describe(out)


def check_output_file(out: str | Path, overwrite: bool, source: str) -> Path:
    """Refuse, before any work, an output that exists (without ``overwrite``), is the input, or cannot be written."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise PruneError(f"--out {out}: name the GGUF file with a .gguf suffix")
    if out.is_dir():
        raise PruneError(f"--out {out} is a folder; name a .gguf file")
    check_apart_from_inputs(out, local_inputs(source))
    if out.exists() and not overwrite:
        raise PruneError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PruneError(f"cannot write {out}: {parent} is not a writable folder")
    return out


def write_file(model, vocabulary: dict[str, gguf.GGUFValue], path: Path, file_type: str) -> None:
    """Write ``model`` to ``path`` as ``file_type``: directly for f32/f16, else quantized from an f32 file."""
    if file_type in WRITTEN:
        write_plain(model, vocabulary, path, file_type)
        return
    plain = path.with_name(path.name + ".f32")
    try:
        write_plain(model, vocabulary, plain, "f32")
        quantize(plain, path, FILE_TYPES[file_type])
    finally:
        plain.unlink(missing_ok=True)


def write_plain(model, vocabulary: dict[str, gguf.GGUFValue], path: Path, file_type: str) -> None:
    """One GGUF file of hyperparameters, ``vocabulary`` fields and tensors (matrices as ``file_type``,
    vectors f32, as llama.cpp's converter stores them)."""
    blocks = adapter_for(model.config).blocks(model)
    widths = [check_block(view) for view in blocks]
    layout = layout_for(model.config, blocks)
    writer = gguf.GGUFWriter(str(path), layout.name)
    write_hyperparameters(writer, model, layout, widths, blocks[0].head_dim, FILE_TYPES[file_type])
    for key, field in vocabulary.items():
        writer.add_key_value(key, field.value, field.type, field.sub_type)
    for name, tensor in model_tensors(model, layout, blocks):
        array = tensor.detach().float().cpu().numpy()
        writer.add_tensor(name, array.astype(WRITTEN[file_type]) if array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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


def model_tensors(model, layout: Layout, blocks: list[BlockView]):
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
                                 f"would store it as f16, not {file_type}; prune with --round-to {QUANT_BLOCK}, "
                                 "or pass --allow-f16-rows")


def tokenizer_fields(source: str, tokenizer, embeddings: int) -> dict[str, gguf.GGUFValue]:
    """The GGUF fields of the tokenizer and the model's descriptive metadata: copied from
    the GGUF file the model came from where there is one, else built from its Hugging Face tokenizer."""
    if (origin := origin_gguf(source)) is not None:
        fields = copied_fields(origin)
    elif (sentencepiece := sentencepiece_folder(source)) is not None:
        fields = sentencepiece_fields(source, sentencepiece, tokenizer, embeddings)
    else:
        fields = hf_tokenizer_fields(source, tokenizer)
    listed = len(fields["tokenizer.ggml.tokens"].value)
    if listed != embeddings:
        raise PruneError(f"{source}: the tokenizer lists {listed} tokens but the model embeds {embeddings}; "
                         "llama.cpp needs one token per embedding row")
    return fields


def lineage(source: str, depth: int = 8) -> Iterator[Path]:
    """``source`` and the models it was pruned or fine-tuned from, nearest first (followed through llm-bip
    summaries, at most ``depth`` steps)."""
    for _ in range(depth + 1):
        path = embedded_gguf() if source == DEFAULT_MODEL else Path(source)
        yield path
        summary = input_summary(path) if path.is_dir() else {}
        source = summary.get("model") or summary.get("finetune", {}).get("model")
        if source is None:
            return


def origin_gguf(source: str) -> Path | None:
    """The GGUF file ``source`` is or was pruned/fine-tuned from, or None."""
    return next((p for p in lineage(source) if p.is_file() and p.suffix == ".gguf"), None)


def sentencepiece_folder(source: str) -> Path | None:
    """The nearest folder of ``source``'s lineage that holds a SentencePiece ``tokenizer.model`` (Gemma, Phi-3,
    Llama 2 ship one; transformers does not write it into saved folders), or None."""
    return next((p for p in lineage(source) if (p / "tokenizer.model").is_file()), None)


def copied_fields(origin: Path) -> dict[str, gguf.GGUFValue]:
    """The tokenizer.* fields and descriptive general.* fields of a GGUF file, with their types."""
    reader = gguf.GGUFReader(origin)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key in DESCRIPTIVE:
            kind = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
            fields[key] = gguf.GGUFValue(field.contents(), kind, sub)
    if "tokenizer.ggml.tokens" not in fields:
        raise PruneError(f"{origin}: the GGUF file holds no tokenizer to copy")
    return fields


def hf_tokenizer_fields(source: str, tokenizer) -> dict[str, gguf.GGUFValue]:
    """A byte-level BPE Hugging Face tokenizer (GPT-2 style: Llama 3, Qwen2, SmolLM) as GGUF fields: tokens from
    gguf's BpeVocab, merges, special ids and chat template from its SpecialVocab, token types and BOS use from
    ``tokenizer``. llama.cpp's pre-tokenizer is named "default": its own converter picks the name from a
    table of known tokenizers, so text llama.cpp tokenizes itself may split differently in places."""
    folder = Path(resolve_source(source, prunable=False))
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise PruneError(f"{source}: its tokenizer is not a byte-level BPE one, which is all llm-bip builds a "
                         f"GGUF vocabulary from ({err})") from err
    texts = [text for text, _, _ in vocab.all_tokens()]
    recorder = gguf.GGUFWriter(None, "llama")  # no file: collects the fields its helpers add
    recorder.add_tokenizer_model(vocab.tokenizer_model)
    recorder.add_tokenizer_pre("default")
    recorder.add_token_list(texts)
    recorder.add_token_types(with_added_token_types(tokenizer, [gguf.TokenType.NORMAL] * len(texts)))
    recorder.add_add_bos_token(needs_bos(tokenizer))
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(texts)).add_to_gguf(recorder, quiet=True)
    return {key: value for key, value in recorder.kv_data[0].items() if key.startswith("tokenizer.")}


def sentencepiece_fields(source: str, folder: Path, tokenizer, rows: int) -> dict[str, gguf.GGUFValue]:
    """A SentencePiece vocabulary (``folder``'s tokenizer.model, read by gguf's SentencePieceVocab) as GGUF
    fields, as llama.cpp's converter writes it: padded to the embedding's ``rows`` with unused tokens, the
    Hugging Face tokenizer's added tokens over their ids (special ones CONTROL), its special ids and chat
    template, and the model's own choice of a leading space (Gemma adds none)."""
    try:
        vocab = gguf.vocab.SentencePieceVocab(folder)
    except (OSError, RuntimeError, ValueError) as err:
        raise PruneError(f"{folder / 'tokenizer.model'}: not a readable SentencePiece model ({err})") from err
    tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
    missing = range(len(tokens), rows)
    tokens += [f"[PAD{i}]".encode() for i in missing]
    scores += [-10000.0] * len(missing)
    types += [gguf.TokenType.UNUSED] * len(missing)
    for index, token in tokenizer.added_tokens_decoder.items():
        if index < rows:
            tokens[index], scores[index] = token.content.encode(), -1000.0
    leading_space = vocab.sentencepiece_tokenizer.encode("a", out_type=str)[0].startswith("\u2581")
    recorder = gguf.GGUFWriter(None, "llama")  # no file: collects the fields its helpers add
    recorder.add_tokenizer_model(vocab.tokenizer_model)
    recorder.add_tokenizer_pre("default")
    recorder.add_token_list(tokens)
    recorder.add_token_scores(scores)
    recorder.add_token_types(with_added_token_types(tokenizer, types))
    recorder.add_add_space_prefix(leading_space)
    gguf.SpecialVocab(Path(resolve_source(source, prunable=False)), load_merges=False, n_vocab=rows).add_to_gguf(
        recorder, quiet=True)
    return {key: value for key, value in recorder.kv_data[0].items() if key.startswith("tokenizer.")}


def with_added_token_types(tokenizer, types: list[gguf.TokenType]) -> list[int]:
    """GGUF token types: the tokenizer's added special tokens CONTROL, its other added tokens USER_DEFINED,
    the rest as ``types`` gives them."""
    types = list(types)
    for index, token in tokenizer.added_tokens_decoder.items():
        if index < len(types):
            types[index] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return [int(t) for t in types]


def describe(path: Path) -> Exported:
    """Layout, size and tensor types of a GGUF file, read back."""
    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    ftype = reader.fields["general.file_type"].contents()
    file_type = next((name for name, value in FILE_TYPES.items() if value == ftype), str(ftype))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return Exported(path, architecture, file_type, path.stat().st_size, dict(types))
