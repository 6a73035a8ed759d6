"""Which device and dtype a run uses: refused before any model is loaded where this machine cannot run them."""

from __future__ import annotations

import functools
import logging

import torch

from . import logs  # noqa: F401  (the llm_bip logger's handler: a library call's notes show on stderr)
from .errors import PruneError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PruneError(f"unknown --dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str, dtype: str = "float32") -> None:
    """Refuse, before any model is loaded, a device torch does not know or this machine lacks; note once
    that half precision on the CPU is slow."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise PruneError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from err
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
    logger.warning(f"{dtype} on the CPU runs about 4x slower than float32 (no fast half-precision kernels); "
                   "statistics are float32/64 either way")

