"""GGUF export: a (pruned) model written as llama.cpp runs it.

Which of llama.cpp's architectures holds a family's blocks, and what it cannot hold, is gguf_layouts.py;
here the file is written: hyperparameters (gguf_hyperparameters.py), tensors by the blocks' roles
(gguf_tensors.py), the tokenizer (gguf_vocab.py). f32 and f16 files are written by the ``gguf`` package;
quantized types by llama.cpp's own quantizer from an f32 file.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .adapters import adapter_for
from .errors import PruneError
from .gguf_hyperparameters import check_block, write_hyperparameters
from .gguf_layouts import layout_for
from .gguf_tensors import check_quantizable, model_tensors
from .gguf_vocab import tokenizer_fields
from .llamacpp import quantize, require_llama_cpp
from .loading import load_model
from .outputs import check_apart_from_inputs, write_atomically
from .sources import local_inputs

# llama.cpp's llama_ftype of each --type
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
WRITTEN = {"f32": np.float32, "f16": np.float16}  # written here; the rest by llama.cpp's quantizer


@dataclass(frozen=True)
class Exported:
    """What ``run_export`` wrote."""

    path: Path
    architecture: str
    file_type: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return f"wrote {self.path}: {self.architecture} layout, {self.bytes / 2**20:.1f} MiB, tensors: {types}"


def run_export(source: str, out: str | Path, file_type: str = "f16", overwrite: bool = False,
               allow_f16_rows: bool = False) -> Exported:
    """The export job (``llm-bip export``): write a model to one GGUF file for llama.cpp, atomically.

    Args:
        source: anything ``load_model`` reads (a pruned folder with per-layer widths included).
        out: the ``.gguf`` file to write; never an input.
        file_type: one of ``FILE_TYPES``; the quantized ones need llama.cpp's quantizer.
        overwrite: replace an existing ``out``.
        allow_f16_rows: let llama.cpp store rows whose length is not a multiple of the quantization block
            as f16 instead of refusing them.

    Returns:
        What was written: the file, its size and type.
    """
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


def describe(path: Path) -> Exported:
    """Layout, size and tensor types of a GGUF file, read back."""
    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    ftype = reader.fields["general.file_type"].contents()
    file_type = next((name for name, value in FILE_TYPES.items() if value == ftype), str(ftype))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return Exported(path, architecture, file_type, path.stat().st_size, dict(types))
