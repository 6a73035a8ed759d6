"""Speed of dense and pruned models side by side: parameters, MACs per token (speed_macs.py), prefill and
decode throughput and peak memory (speed_measure.py), and every model's ratios to the first model; written
as JSON and a markdown table (speed_table.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from .devices import check_device
from .errors import PruneError
from .loading import load_model
from .outputs import SPEED_FILE, atomic_folder, check_output_folder, library_versions
from .sources import local_inputs
from .speed_measure import ModelBench
from .speed_settings import SpeedSettings, check_positions, parse_sizes
from .speed_table import speed_table

__all__ = ["SpeedSettings", "bench_speed", "parse_sizes", "run_bench_speed", "speed_table", "write_speed"]

TABLE_FILE = "speed.md"
log = logging.getLogger(__name__)


def run_bench_speed(models: list[str], out: str | Path, settings: SpeedSettings | None = None, *,
                    overwrite: bool = False) -> dict:
    """The bench-speed job (``llm-bip bench-speed``): measure models side by side and write the results.

    Args:
        models: anything ``load_model`` reads; ratios are to the first.
        out: the results folder (speed.json, speed.md); never an input.
        settings: batch sizes, lengths, repeats, threads, device and dtype (default: ``SpeedSettings()``).
        overwrite: replace an existing ``out``.

    Returns:
        The results written to speed.json.
    """
    settings = settings or SpeedSettings()
    check_device(settings.device, settings.dtype)
    folder = check_output_folder(out, overwrite, local_inputs(*models))
    results = bench_speed(models, settings)
    write_speed(results, folder, overwrite)
    return results


def add_ratios(row: dict, base: dict) -> None:
    """Ratios of ``row`` to the ``base`` model: sizes and memory as row/base, speed as a speedup."""
    row["ratios"] = {key: row[key] / base[key] for key in ("params", "linear_macs_per_token", "peak_memory_mb")}
    for kind in ("prefill", "decode"):
        for entry, ref in zip(row[kind], base[kind]):
            entry["mac_ratio"] = entry["macs_per_token"]["total"] / ref["macs_per_token"]["total"]
            entry["speedup"] = entry["tokens_per_s"] / ref["tokens_per_s"]


def cpu_info(device: str) -> dict:
    """The CPU's model name, core count and machine type, and the GPU's name on a CUDA ``device``."""
    name = platform.processor()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"name": name, "logical_cores": os.cpu_count(), "machine": platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _free_memory(device: str) -> None:
    """Release a dropped model's memory before the next one is loaded."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_speed(models: list[str], settings: SpeedSettings | None = None) -> dict:
    """Measure each model in turn (one loaded at a time; each logged as it completes); ratios are to the
    first. Nothing is written here."""
    if not models:
        raise PruneError("bench-speed needs at least one model")
    settings = settings or SpeedSettings()
    settings.validate()
    for source in models:  # every model checked before the long part
        check_positions(source, settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    rows: list[dict] = []
    for source in models:
        model, _ = load_model(source, settings.dtype, settings.device)
        row = {"model": source, **ModelBench(model, settings).run()}
        del model
        _free_memory(settings.device)
        add_ratios(row, rows[0] if rows else row)
        rows.append(row)
        log.info(f"measured {source}: {row['params']:,} parameters, peak {row['peak_memory_mb']:.0f} MB")
    return {"settings": asdict(settings), "torch_threads": torch.get_num_threads(), "cpu": cpu_info(settings.device),
            "versions": library_versions(), "models": rows}


def write_speed(results: dict, out: Path, overwrite: bool) -> None:
    """Write ``results`` as JSON and as the markdown table into the folder ``out``, atomically."""
    with atomic_folder(out, overwrite) as tmp:
        (tmp / SPEED_FILE).write_text(json.dumps(results, indent=2))
        (tmp / TABLE_FILE).write_text(speed_table(results))
