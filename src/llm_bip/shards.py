"""Sharded safetensors I/O: read a checkpoint's tensors by name without loading the rest, write a
file whole or not at all, and assemble a sharded model folder with its index."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import PruneError
from .outputs import atomic_folder, write_atomically
from .remote_code import add_remote_code

INDEX_FILE = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


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
            raise PruneError(f"{shard}: corrupted or truncated safetensors file ({err})") from err
    return state



def stored_tensors(folder: Path) -> dict[str, tuple[Path, torch.Size]]:
    """Each stored tensor's shard and shape, from the shards' headers (no tensor data is read)."""
    stored = {}
    for shard in weight_files(folder):
        try:
            with safe_open(str(shard), "pt") as f:
                for name in f.keys():
                    stored[name] = (shard, torch.Size(f.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as err:
            raise PruneError(f"{shard}: missing, corrupted or truncated safetensors file ({err})") from err
    return stored


def read_tensors(wanted: dict[str, torch.Tensor], stored: dict[str, Path],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The stored values of ``wanted`` (name -> skeleton tensor) on ``device`` in the skeleton's dtype,
    each shard (``stored``: name -> shard) opened once. A tensor no shard holds was added by the
    engine (the zero biases of compensation): it starts at zero."""
    by_shard = defaultdict(list)
    for name in wanted:
        if name in stored:
            by_shard[stored[name]].append(name)
    values = {name: torch.zeros(t.shape, dtype=t.dtype, device=device)
              for name, t in wanted.items() if name not in stored}
    for shard, names in by_shard.items():
        with safe_open(str(shard), "pt") as f:
            for name in names:
                values[name] = f.get_tensor(name).to(device, wanted[name].dtype)
    return values


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] = SHARD_METADATA) -> None:
    """One safetensors file, whole or absent."""
    write_atomically(path, lambda tmp: save_file(_contiguous(tensors), tmp, metadata))


def save_sharded(model, tokenizer, out: Path, overwrite: bool, block_shards: dict[str, Path],
                 stored: dict[str, Path], extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (a skeleton) to ``out`` atomically: the blocks' finished shards (``block_shards``:
    module prefix -> file) hard-linked, every other tensor copied from ``stored`` one module at a time,
    then the index, config, tokenizer and ``extras``."""
    tensors = _unique_tensors(model)
    weight_map = {name: _shard_of(name, block_shards) for name in tensors}
    with atomic_folder(out, overwrite) as tmp:
        for prefix, block_file in block_shards.items():
            os.link(block_file, tmp / f"{prefix}.safetensors")
        for shard in sorted(set(weight_map.values()) - {f"{p}.safetensors" for p in block_shards}):
            wanted = {name: tensors[name] for name, s in weight_map.items() if s == shard}
            save_file(read_tensors(wanted, stored, torch.device("cpu")), str(tmp / shard), SHARD_METADATA)
        metadata = {"total_parameters": sum(t.numel() for t in tensors.values()),
                    "total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
        _save_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extras is not None:
            extras(tmp)
    return out


def _shard_of(name: str, block_shards: dict[str, Path]) -> str:
    """A block's tensors go to the block's shard; any other tensor to the shard of its module."""
    owner = next((p for p in block_shards if name.startswith(f"{p}.")), name.rpartition(".")[0])
    return f"{owner}.safetensors"


def _unique_tensors(model) -> dict[str, torch.Tensor]:
    """The model's saved tensors by name, a tied one once under its first name (as save_pretrained does)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def _save_config(model, folder: Path) -> None:
    """config.json and generation_config.json, as ``save_pretrained`` writes them (and ``save_model``: the
    modelling file of per-layer widths)."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    add_remote_code(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
