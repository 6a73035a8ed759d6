"""Which device and dtype a run uses: refused before any model is loaded where this machine cannot run them."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from . import logs  # noqa: F401  (the llm_bip logger's handler: a library call's notes show on stderr)
from .errors import PruneError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements
# --device-map: a strategy, or module name -> device (a GPU index, a torch device name or "disk")
DeviceMap = str | dict[str, int | str]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PruneError(f"unknown --dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str, dtype: str = "float32") -> None:
    """Refuse, before any model is loaded, a device torch does not know or this machine lacks; note once
    that half precision on the CPU is slow."""
    device = _check_torch_device(name, "--device", "use --device cpu")
    resolve_dtype(dtype)
    if device.type == "cpu" and dtype != "float32":
        note_slow_cpu_dtype(dtype)


def _check_torch_device(name: str | int, option: str, instead: str) -> torch.device:
    """``name`` as a torch device this machine has, else a PruneError naming ``option`` (``instead``: what to
    use where there is no CUDA)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise PruneError(f"unknown {option} {name!r}; use cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise PruneError(f"{option} {name}: this torch ({torch.__version__}) sees no CUDA device; {instead}")
        if device.index is not None and device.index >= available:
            raise PruneError(f"{option} {name}: only {available} CUDA device(s) here (cuda:0..cuda:{available - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PruneError(f"{option} {name}: MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PruneError(f"{option} {name}: llm-bip runs on cpu, cuda or mps")
    return device


def parse_device_map(given: str | dict | None) -> DeviceMap | None:
    """``--device-map`` as accelerate takes it: a placement strategy (``auto``, ...), or module name -> device
    from a JSON object given as text or as a .json file; each device checked (``check_device_map``)."""
    if given is None:
        return None
    if isinstance(given, str):
        given = given.strip()
        if given in STRATEGIES:
            return given
        given = _json_map(given)
    check_device_map(given)
    return given


def _json_map(text: str) -> dict:
    """The JSON object in ``text``, or in the file it names."""
    source = "it"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise PruneError(f"--device-map {text!r}: use {', '.join(STRATEGIES)}, a JSON object of module names "
                             'to devices (e.g. {"model.layers.0": 0, "lm_head": "cpu"}) or a .json file of one')
        try:
            text, source = path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise PruneError(f"--device-map {path}: cannot read it ({err})") from err
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError as err:
        raise PruneError(f"--device-map: {source} is not valid JSON ({err})") from err
    if not isinstance(device_map, dict):
        raise PruneError(f"--device-map: {source} must be a JSON object of module names to devices, "
                         f"not {type(device_map).__name__}")
    return device_map


def check_device_map(device_map: DeviceMap) -> None:
    """Refuse, before any model is loaded, a device map with an unknown strategy, no entries, or a device this
    machine lacks: each value a GPU index, cpu, cuda[:N], mps or disk (accelerate's offload folder)."""
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise PruneError(f"--device-map {device_map!r}: use {', '.join(STRATEGIES)} or a JSON object")
        return
    if not device_map:
        raise PruneError("--device-map: the map is empty; name a device for every module (\"\" for all)")
    for module, device in device_map.items():
        where = f"--device-map {module!r}:"
        if isinstance(device, bool) or not isinstance(device, int | str):
            raise PruneError(f"{where} {device!r} is no device; use a GPU index, cpu, cuda:N, mps or disk")
        if isinstance(device, int) and device < 0:
            raise PruneError(f"{where} {device} is no GPU index; use 0, 1, ...")
        if device != "disk":
            _check_torch_device(f"cuda:{device}" if isinstance(device, int) else device, where, "use cpu or disk")


def execution_device(module) -> torch.device:
    """Where ``module`` computes: the execution device of accelerate's hook on it (in a dispatched model, whose
    offloaded weights wait on the meta device between forwards), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        device = getattr(each, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next(module.parameters()).device


def input_device(model) -> torch.device:
    """Where a model's token ids go: where its input embedding computes."""
    return execution_device(model.get_input_embeddings())


@functools.cache
def note_slow_cpu_dtype(dtype: str) -> None:
    logger.warning(f"{dtype} on the CPU runs about 4x slower than float32 (no fast half-precision kernels); "
                   "statistics are float32/64 either way")

