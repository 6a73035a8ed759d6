"""Blocks of a model dispatched over several devices by accelerate (``--device-map``).

transformers' ``from_pretrained(device_map=...)`` (or accelerate's ``dispatch_model`` for per-layer folders)
puts each module on its device and hooks it (``AlignDevicesHook``): a hooked module moves its inputs to its
execution device. A module mapped to ``disk`` (or to ``cpu`` while a GPU computes) is *offloaded*: its
weights wait on the meta device, the hook reads them from its weights map (the checkpoint's safetensors or
the offload folder; CPU memory) for each forward and drops them after.

The engine computes each block where its weights are (calibration.forward_block moves the activations
there). :class:`DispatchedBlocks` makes an offloaded block's weights real on its execution device while
the engine works on it (``resident``), and writes the cut ones back into its weights map (to the offload
folder, never into the checkpoint), so the hooks, a later forward and ``save_pretrained`` all read the cut
block. Blocks that live on a device are cut where they are; the hooks only move inputs, so replacing
their weights needs nothing more.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, set_module_tensor_to_device
from accelerate.utils.modeling import named_module_tensors
from torch import nn

from .adapters import adapter_for
from .devices import execution_device
from .errors import PruneError
from .offload import BlockStore


class DispatchedBlocks(BlockStore):
    """Blocks placed by a device map: computed on their devices, offloaded ones made real while resident."""

    def __init__(self, model, requested):
        self.requested = requested
        self.modules = dict(getattr(model, "hf_device_map", None) or {"": str(execution_device(model))})
        names = {module: name for name, module in model.named_modules()}
        self.layers = list(adapter_for(model.config).layers(model))
        _check_whole_blocks(self.modules, [names[layer] for layer in self.layers])
        self.offloaded = any(_offload_hooks(model))
        if self.offloaded:
            _keep_tied(model)

    def compute_devices(self, model) -> list[torch.device]:
        """Every device a block computes on."""
        return sorted({execution_device(layer) for layer in self.layers}, key=str)

    def check_gradients(self, method: str) -> None:
        if self.offloaded:
            raise PruneError(f"--method {method} needs gradients through the whole model, and the --device-map "
                             "offloads part of it (disk, or cpu beside a GPU), where none reach the weights; "
                             "map every module to a device, or choose another method")

    def placement(self) -> dict:
        """The map asked for and where every module went."""
        return {"requested": self.requested, "placement": {k: str(v) for k, v in self.modules.items()}}

    def save(self, model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None):
        """Written as in memory: save_pretrained reads the offloaded weights from their weights maps. Ties are
        made again first (a hook that drops an offloaded tied weight after a forward unties it)."""
        if self.offloaded:
            model.tie_weights()
        with warnings.catch_warnings():  # transformers' note that a shard's offloaded weights are read into memory
            warnings.filterwarnings("ignore", "Attempting to save a model with offloaded modules")
            return super().save(model, tokenizer, out, overwrite, extras)

    @contextmanager
    def resident(self, index: int, write: bool = False):
        hooked = list(_offload_hooks(self.layers[index]))
        for module, hook in hooked:
            _onload(module, hook)
        try:
            yield
            if write:
                for module, hook in hooked:
                    _write_back(module, hook)
        finally:
            for module, hook in hooked:
                _release(module, hook)


def blocks_of(model) -> BlockStore:
    """Where ``model``'s blocks live: dispatched where accelerate hooked it, else all in memory."""
    hooked = any(hasattr(module, "_hf_hook") for module in model.modules())
    return DispatchedBlocks(model, None) if hooked else BlockStore()


def _check_whole_blocks(placement: dict, prefixes: list[str]) -> None:
    """Refuse a map that places parts of a block on different devices: the engine computes a block in one place."""
    for key in placement:
        block = next((p for p in prefixes if key.startswith(f"{p}.")), None)
        if block is not None:
            raise PruneError(f"--device-map {key!r} places part of the block {block}; the engine computes each "
                             f"block on one device: map {block} as a whole")


def _keep_tied(model) -> None:
    """An offloaded module's hook drops its weights after each forward as new meta tensors, which unties a shared
    one (a tied LM head: then counted and saved twice): tie again after each forward of such a module."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for owner in {name.rpartition(".")[0] for pair in tied.items() for name in pair}:
        module = model.get_submodule(owner)
        if any(_offload_hooks(module)):
            module.register_forward_hook(lambda *_: model.tie_weights(recompute_mapping=False))


def _offload_hooks(module: nn.Module) -> Iterator[tuple[nn.Module, object]]:
    """(module, accelerate hook) of every module under ``module`` whose weights the hook loads per forward."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for each in getattr(hook, "hooks", [hook]):
            if getattr(each, "offload", False):
                yield sub, each


def _tensor_names(module: nn.Module, hook) -> list[str]:
    """The names the hook loads and drops for each forward (as accelerate's pre_forward lists them)."""
    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]


def _onload(module: nn.Module, hook) -> None:
    """The module's weights from the hook's weights map onto its execution device, kept there meanwhile (the
    hook stops loading them per forward). A tensor the map does not hold was added by the engine (the zero
    biases of compensation): it starts at zero, as with --offload."""
    for name in _tensor_names(module, hook):
        skeleton = _tensor(module, name)
        try:
            value = hook.weights_map[name]
        except KeyError:
            value = torch.zeros(skeleton.shape, dtype=skeleton.dtype)
        set_module_tensor_to_device(module, name, hook.execution_device, value=value.to(skeleton.dtype))
    hook.offload = False


def _release(module: nn.Module, hook) -> None:
    """Back on the meta device, in the shapes the engine left; the hook loads them per forward again."""
    for name in _tensor_names(module, hook):
        set_module_tensor_to_device(module, name, "meta")
    hook.offload = True


def _write_back(module: nn.Module, hook) -> None:
    """The module's (cut) weights into the hook's weights map: what was on disk to the offload folder (the
    checkpoint itself is never written), what was in CPU memory to CPU memory."""
    weights_map, prefix = hook.weights_map, ""
    if isinstance(weights_map, PrefixedDataset):
        weights_map, prefix = weights_map.dataset, weights_map.prefix
    for name in _tensor_names(module, hook):
        key, tensor = f"{prefix}{name}", _tensor(module, name).detach().cpu()
        if isinstance(weights_map, dict):
            weights_map[key] = tensor
        elif isinstance(weights_map, OffloadedWeightsLoader):
            _store(weights_map, key, tensor)
        else:
            raise PruneError(f"cannot cut a module offloaded with a {type(weights_map).__name__} weights map; "
                             "map its block to a device")


def _store(loader: OffloadedWeightsLoader, key: str, tensor: torch.Tensor) -> None:
    """``key`` in accelerate's loader: in its CPU state dict where it was there (or there is no folder), else
    in its offload folder (where it may have pointed into the checkpoint, which stays as it is)."""
    if key in loader.state_dict or loader.save_folder is None:
        loader.state_dict[key] = tensor
    else:
        offload_weight(tensor, key, loader.save_folder, index=loader.index)
    if key not in loader.all_keys:
        loader.all_keys.append(key)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` (dotted) of ``module``."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)
