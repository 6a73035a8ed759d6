"""Where the engine's blocks live while it works: all in memory, or one at a time (``--offload``).

The engine touches block i's weights only inside ``blocks.resident(i)``. In memory
(:class:`BlockStore`) that changes nothing. Offloaded (:class:`OffloadedBlocks`), the model is a
skeleton on the meta device, whose shapes are all that counting parameters and allocating the
budget need: a block's weights are read from the checkpoint's safetensors shards while it is
resident, a cut block is written to its own shard, and then it goes back to the meta device. The
input embedding is read only to compute block 0's calibration inputs; the other tensors outside
the blocks are copied one module at a time when the output is written. Peak memory is about one
block plus the calibration activations, whatever the model's size.

An offloaded run keeps its work in ``OUT.partial`` next to ``OUT``: the cut blocks' shards, and
for each pass over the blocks the scores so far and the next block's calibration inputs. So an
interrupted run continues (``--resume``) from the last completed block, with the same result bit
for bit. The finished output is assembled in a temporary sibling and renamed to ``OUT``, as every
output is; then ``OUT.partial`` is removed.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, GenerationConfig

from .adapters import adapter_for
from .calibration import BlockInputs
from .checkpoint import (atomic_folder, check_stored_shapes, check_tokenizer_fits, empty_model, read_config,
                         resolve_dtype, resolve_source, save_model, weight_files)
from .errors import PruneError
from .metrics import UnitScores
from .scores import ScoreRecord, load_scores, save_scores

INDEX_FILE = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


@dataclass
class Progress:
    """How far a pass over the blocks got: the next block, its calibration inputs, and the scores,
    output norms and calibration means of the blocks before it."""

    next_block: int
    inputs: BlockInputs | None
    scores: dict[int, UnitScores]
    norms: dict[int, float]
    means: dict[int, tuple[torch.Tensor, torch.Tensor]]


class BlockStore:
    """Every block in memory, the default: residency changes nothing and there is no progress to keep."""

    whole_model = True

    @contextmanager
    def resident(self, index: int, write: bool = False):
        """Block ``index``'s weights in memory meanwhile; ``write``: keep its final (cut) weights."""
        yield

    @contextmanager
    def embedding_resident(self):
        """The input embedding in memory meanwhile, to compute block 0's calibration inputs."""
        yield

    def load_progress(self, stage: str, inputs: BlockInputs | None) -> Progress:
        """Where the pass ``stage`` stands, given block 0's calibration inputs."""
        return Progress(0, inputs, {}, {}, {})

    def save_progress(self, stage: str, progress: Progress) -> None:
        """Keep ``progress`` of the pass ``stage`` (called while its last block is still resident)."""

    def save(self, model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None):
        return save_model(model, tokenizer, out, overwrite, extras)


def partial_folder(out: Path) -> Path:
    """Where an offloaded run keeps its work until ``out`` is written."""
    return out.parent / f"{out.name}.partial"


class OffloadedBlocks(BlockStore):
    """Blocks read from a checkpoint's shards one at a time, cut ones written to ``OUT.partial``."""

    whole_model = False

    def __init__(self, model, source: Path, stored: dict[str, Path], dtype: str, device: str):
        self.source, self.stored, self.dtype, self.device = source, stored, dtype, torch.device(device)
        names = {module: name for name, module in model.named_modules()}
        self.layers = list(adapter_for(model.config).layers(model))
        self.prefixes = [names[layer] for layer in self.layers]
        self.embedding = model.get_input_embeddings()
        self.embedding_prefix = names[self.embedding]
        self.partial: Path | None = None

    def begin(self, out: Path, settings: dict, resume: bool, overwrite: bool) -> None:
        """Start the work folder ``OUT.partial``, or with ``resume`` continue the run in it (the same
        settings, else a PruneError); an earlier run's work is discarded only with ``overwrite``."""
        self.partial = partial_folder(out)
        settings = json.loads(json.dumps({"model": str(self.source.resolve()), "dtype": self.dtype,
                                          "device": str(self.device), **settings}))
        saved = self.partial / "progress" / "settings.json"
        if resume:
            _check_same_settings(saved, settings)
            return
        if self.partial.exists():
            if not overwrite:
                raise PruneError(f"{self.partial} holds an unfinished offloaded run; pass --resume to continue it "
                                 "or --overwrite to start over")
            shutil.rmtree(self.partial)
        saved.parent.mkdir(parents=True)
        saved.write_text(json.dumps(settings, indent=2))

    @contextmanager
    def resident(self, index: int, write: bool = False):
        shard = self.partial / f"{self.prefixes[index]}.safetensors"
        if write and shard.is_file():
            yield  # cut and written before an interruption: the engine cuts its shapes again
            return
        with self._materialised(self.layers[index], self.prefixes[index]):
            yield
            if write:
                tensors = self.layers[index].state_dict(prefix=f"{self.prefixes[index]}.")
                _write_atomically(shard, lambda path: save_file(_contiguous(tensors), path, SHARD_METADATA))

    @contextmanager
    def embedding_resident(self):
        with self._materialised(self.embedding, self.embedding_prefix):
            yield

    @contextmanager
    def _materialised(self, module: nn.Module, prefix: str):
        """``module``'s stored weights in memory meanwhile; then back on the meta device, in the shapes
        the engine left them (a parameter it did not replace gets its own skeleton back, so ties hold)."""
        skeleton = dict(module.named_parameters())
        loaded = self._read({f"{prefix}.{name}": p for name, p in skeleton.items()}, self.device)
        real = {name: nn.Parameter(loaded[f"{prefix}.{name}"]) for name in skeleton}
        for name, param in real.items():
            _set_parameter(module, name, param)
        try:
            yield
        finally:
            for name, param in list(module.named_parameters()):
                freed = skeleton[name] if param is real[name] else nn.Parameter(param.detach().to("meta"))
                _set_parameter(module, name, freed)
            del loaded, real
            _return_freed_memory()

    def _read(self, wanted: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The stored values of ``wanted`` (name -> skeleton tensor) on ``device`` in the skeleton's dtype,
        each shard opened once. A parameter the checkpoint lacks was added by the engine (the zero
        biases of compensation): it starts at zero."""
        by_shard = defaultdict(list)
        for name in wanted:
            if name in self.stored:
                by_shard[self.stored[name]].append(name)
        values = {name: torch.zeros(t.shape, dtype=t.dtype, device=device)
                  for name, t in wanted.items() if name not in self.stored}
        for shard, names in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for name in names:
                    values[name] = f.get_tensor(name).to(device, wanted[name].dtype)
        return values

    def _progress_file(self, stage: str, kind: str) -> Path:
        return self.partial / "progress" / f"{stage}-{kind}.safetensors"

    def load_progress(self, stage: str, inputs: BlockInputs | None) -> Progress:
        marker = self._progress_file(stage, "inputs")
        if not marker.is_file():
            return super().load_progress(stage, inputs)
        with safe_open(str(marker), "pt") as f:
            next_block = int(f.metadata()["next_block"])
            hidden = [f.get_tensor(f"batch{j}").to(self.device) for j in range(len(inputs or []))]
        if inputs is not None:
            inputs = [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]
        record = load_scores(self._progress_file(stage, "scores"))
        done = [i for i in record.scores if i < next_block]  # a block scored after the marker was written is redone
        return Progress(next_block, inputs, {i: record.scores[i] for i in done}, {i: record.norms[i] for i in done},
                        {i: m for i, m in record.means.items() if i < next_block})

    def save_progress(self, stage: str, progress: Progress) -> None:
        record = ScoreRecord(progress.scores, progress.norms, progress.means, settings={}, widths=[])
        _write_atomically(self._progress_file(stage, "scores"), lambda path: save_scores(path, record))
        hidden = {f"batch{j}": h for j, (h, _) in enumerate(progress.inputs or [])}
        _write_atomically(self._progress_file(stage, "inputs"),
                          lambda path: save_file(_contiguous(hidden), path, {"next_block": str(progress.next_block)}))

    def save(self, model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None):
        """Assemble the output: the cut blocks' shards (hard links), the other tensors copied one module
        at a time, the index, config and tokenizer; renamed to ``out`` once complete."""
        tensors = _unique_tensors(model)
        weight_map = {name: self._shard_of(name) for name in tensors}
        with atomic_folder(out, overwrite) as tmp:
            for prefix in self.prefixes:
                os.link(self.partial / f"{prefix}.safetensors", tmp / f"{prefix}.safetensors")
            for shard in sorted(set(weight_map.values()) - {f"{p}.safetensors" for p in self.prefixes}):
                wanted = {name: tensors[name] for name, s in weight_map.items() if s == shard}
                save_file(self._read(wanted, torch.device("cpu")), str(tmp / shard), SHARD_METADATA)
            metadata = {"total_parameters": sum(t.numel() for t in tensors.values()),
                        "total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
            _save_config(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if extras is not None:
                extras(tmp)
        shutil.rmtree(self.partial)
        return out

    def _shard_of(self, name: str) -> str:
        """A block's tensors go to the block's shard; any other tensor to the shard of its module."""
        owner = next((p for p in self.prefixes if name.startswith(f"{p}.")), name.rpartition(".")[0])
        return f"{owner}.safetensors"


def open_offloaded(source: str, dtype: str = "float32", device: str = "cpu"):
    """(skeleton model, tokenizer, OffloadedBlocks) of a local checkpoint; only the shards' headers are read."""
    location = resolve_source(source)
    if not isinstance(location, Path):
        raise PruneError(f"--offload reads a local model folder; download {source} first "
                         f"(hf download {source} --local-dir DIR) and pass DIR")
    config = read_config(source, location)
    model = empty_model(config, resolve_dtype(dtype)).eval()
    for name, _ in list(model.named_buffers()):  # computed ones, such as rotary frequencies
        set_module_tensor_to_device(model, name, device)
    stored = stored_tensors(location)
    check_stored_shapes(location, model, {name: shape for name, (_, shape) in stored.items()})
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as err:
        raise PruneError(f"{source}: cannot load its tokenizer ({type(err).__name__}: {err})") from None
    check_tokenizer_fits(source, tokenizer, model)
    if (location / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    blocks = OffloadedBlocks(model, location, {name: shard for name, (shard, _) in stored.items()}, dtype, device)
    return model, tokenizer, blocks


def stored_tensors(folder: Path) -> dict[str, tuple[Path, torch.Size]]:
    """Each stored tensor's shard and shape, from the shards' headers (no tensor data is read)."""
    stored = {}
    for shard in weight_files(folder):
        try:
            with safe_open(str(shard), "pt") as f:
                for name in f.keys():
                    stored[name] = (shard, torch.Size(f.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as err:
            raise PruneError(f"{shard}: missing, corrupted or truncated safetensors file ({err})") from None
    return stored


def _check_same_settings(saved: Path, settings: dict) -> None:
    """Refuse to resume a run (its settings file ``saved``) with other settings than ``settings``."""
    if not saved.is_file():
        raise PruneError(f"--resume: no unfinished offloaded run in {saved.parent.parent}; run without --resume")
    before = json.loads(saved.read_text())
    differing = [f"{k} {before.get(k)!r} (asked: {v!r})" for k, v in settings.items() if before.get(k) != v]
    if differing:
        raise PruneError(f"--resume: the run in {saved.parent.parent} has other settings: {', '.join(differing)}; "
                         "set the same options, or pass --overwrite without --resume to start over")


def _unique_tensors(model) -> dict[str, torch.Tensor]:
    """The model's saved tensors by name, a tied one once under its first name (as save_pretrained does)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: measured, about 650 MB of a
    1.8 GB peak on a 1.1B model); a no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once; None where there is no glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner), attr, param)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write`` a file under a temporary name, then rename it: it is whole or absent, never partly written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise PruneError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from None


def _save_config(model, folder: Path) -> None:
    """config.json and generation_config.json, as ``save_pretrained`` writes them."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
