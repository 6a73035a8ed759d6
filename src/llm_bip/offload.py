"""Where the engine's blocks live while it works: all in memory, or one at a time (``--offload``).

The engine touches block i's weights only inside ``blocks.resident(i)``. In memory
(:class:`BlockStore`) that changes nothing. Offloaded (:class:`OffloadedBlocks`), the model is a
skeleton on the meta device, whose shapes are all that counting parameters and allocating the
budget need: a block's weights are read from the checkpoint's safetensors shards while it is
resident, a cut block is written to its own shard in the run's work folder (progress.py), and
then it goes back to the meta device. The input embedding is read only to compute block 0's
calibration inputs; the other tensors outside the blocks are copied one module at a time when the
output is written (shards.py). Peak memory is about one block plus the calibration activations,
whatever the model's size.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoTokenizer, GenerationConfig

from .adapters import adapter_for
from .devices import resolve_dtype
from .errors import PruneError
from .loading import check_stored_shapes, check_tokenizer_fits, empty_model, read_config
from .outputs import save_model
from .shards import read_tensors, save_sharded, stored_tensors, write_tensors
from .sources import resolve_source


class BlockStore:
    """Every block in memory, the default: residency changes nothing."""

    whole_model = True

    def compute_devices(self, model) -> list[torch.device]:
        """Where the blocks compute: the model's own device."""
        return [next(model.parameters()).device]

    def check_gradients(self, method: str) -> None:
        """Refuse ``method``, which needs the LM loss's gradients, where they cannot reach the block weights."""

    def placement(self) -> dict | None:
        """Where a device map put the model's modules, for the summary (None: no device map)."""
        return None

    @contextmanager
    def resident(self, index: int, write: bool = False):
        """Block ``index``'s weights in memory meanwhile; ``write``: keep its final (cut) weights."""
        yield

    @contextmanager
    def embedding_resident(self):
        """The input embedding in memory meanwhile, to compute block 0's calibration inputs."""
        yield

    def forget(self, index: int) -> None:
        """Drop what was written of block ``index``, so that it is read dense again (in memory nothing is
        written, and nothing resumed)."""

    def save(self, model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None):
        return save_model(model, tokenizer, out, overwrite, extras)


class OffloadedBlocks(BlockStore):
    """Blocks read from a checkpoint's shards one at a time, cut ones written to the work folder ``partial``."""

    whole_model = False

    def __init__(self, model, source: Path, stored: dict[str, Path], dtype: str, device: str, partial: Path):
        self.source, self.stored, self.dtype, self.device = source, stored, dtype, torch.device(device)
        self.partial = partial
        names = {module: name for name, module in model.named_modules()}
        self.layers = list(adapter_for(model.config).layers(model))
        self.prefixes = [names[layer] for layer in self.layers]
        self.embedding = model.get_input_embeddings()
        self.embedding_prefix = names[self.embedding]

    def compute_devices(self, model) -> list[torch.device]:
        return [self.device]

    def check_gradients(self, method: str) -> None:
        raise PruneError(f"--method {method} needs gradients through the whole model, which --offload "
                         "never holds in memory; choose another method or prune without --offload")

    def settings(self) -> dict[str, str]:
        """What a resumed run must read the same way: the checkpoint, dtype and device."""
        return {"model": str(self.source.resolve()), "dtype": self.dtype, "device": str(self.device)}

    @contextmanager
    def resident(self, index: int, write: bool = False):
        shard = self._shard(index)
        if write and shard.is_file():
            yield  # cut and written before an interruption: the engine cuts its shapes again
            return
        with self._materialised(self.layers[index], self.prefixes[index]):
            yield
            if write:
                write_tensors(shard, self.layers[index].state_dict(prefix=f"{self.prefixes[index]}."))

    @contextmanager
    def embedding_resident(self):
        with self._materialised(self.embedding, self.embedding_prefix):
            yield

    def forget(self, index: int) -> None:
        self._shard(index).unlink(missing_ok=True)

    def save(self, model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None):
        """Assemble the output from the cut blocks' shards and the checkpoint's other tensors; then the
        work folder goes."""
        block_shards = {prefix: self._shard(i) for i, prefix in enumerate(self.prefixes)}
        save_sharded(model, tokenizer, out, overwrite, block_shards, self.stored, extras)
        shutil.rmtree(self.partial)
        return out

    def _shard(self, index: int) -> Path:
        return self.partial / f"{self.prefixes[index]}.safetensors"

    @contextmanager
    def _materialised(self, module: nn.Module, prefix: str):
        """``module``'s stored weights in memory meanwhile; then back on the meta device, in the shapes
        the engine left them (a parameter it did not replace gets its own skeleton back, so ties hold)."""
        skeleton = dict(module.named_parameters())
        loaded = read_tensors({f"{prefix}.{name}": p for name, p in skeleton.items()}, self.stored, self.device)
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


def open_offloaded(source: str, dtype: str, device: str, partial: Path):
    """(skeleton model, tokenizer, OffloadedBlocks) of a local checkpoint; only the shards' headers are
    read. Cut blocks will go to the work folder ``partial``."""
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
        raise PruneError(f"{source}: cannot load its tokenizer ({type(err).__name__}: {err})") from err
    check_tokenizer_fits(source, tokenizer, model)
    if (location / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    shards = {name: shard for name, (shard, _) in stored.items()}
    return model, tokenizer, OffloadedBlocks(model, location, shards, dtype, device, partial)


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
