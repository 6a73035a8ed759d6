"""Wall time and peak memory of named phases of a run."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last reset, on Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseLog:
    """Collects {phase: {wall_s, peak_rss_mb[, peak_cuda_mb]}} across a run."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @contextmanager
    def phase(self, name: str):
        _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            record = {"wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            if torch.cuda.is_available():
                record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.phases[name] = record
