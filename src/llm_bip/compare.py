"""Side-by-side benchmark: methods x ratios on one model, same engine, same calibration data
unless a method asks for its own (``bip:calibration=ptb``).

Each row prunes a fresh copy of the model and records perplexity at every window length, the
pruning step's wall time and peak memory, and sizes. One plain forward pass over each calibration
batch is timed too: the physical floor of a one-pass method, so every method's cost is also given
as a ratio to the floor of the batch it pruned on. Writes results.json, results.md and ppl_vs_ratio.png:

    results = run_compare("smollm2", "runs/compare", CompareSpec(methods=["bip", "flap"], ratios=[0.2, 0.5]))
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch

from .config import PruneConfig
from .data import check_calibration_source, check_text_source
from .devices import check_device
from .errors import PruneError
from .evaluation import eval_split, perplexity, text_label
from .limits import check_window
from .loading import load_model
from .outputs import atomic_folder, check_output_folder, library_versions
from .profiling import PhaseLog
from .pruner import Pruner
from .selfcalib import calibration_batch
from .sources import local_inputs
from .tables import markdown_table

logger = logging.getLogger(__name__)

CONFIG_FIELDS = {f.name: f.type for f in fields(PruneConfig)}
# the settings that decide a calibration batch ('self' samples batch_size windows at a time)
CALIBRATION_FIELDS = ("calibration", "n_samples", "seqlen", "seed", "batch_size")


@dataclass
class CompareSpec:
    """What a compare run measures: ``methods`` (each 'name' or 'name:key=value,...', see ``parse_method``) x
    ``ratios`` on ``base``'s calibration settings, perplexity on ``datasets`` at every window length of
    ``seqlens``."""

    methods: list[str]
    ratios: list[float]
    seqlens: list[int] = field(default_factory=lambda: [128, 512])
    datasets: list[str] = field(default_factory=lambda: ["ptb"])
    split: str | None = None  # of the named corpora (default test); a text file is evaluated whole
    max_tokens: int | None = None
    base: PruneConfig = field(default_factory=PruneConfig)


def run_compare(source: str, out: str | Path, spec: CompareSpec, *, overwrite: bool = False, device: str = "cpu",
                dtype: str = "float32") -> dict:
    """Prune ``source`` with every method at every ratio, side by side (``llm-bip compare``), and write
    results.json, results.md and ppl_vs_ratio.png to ``out``. Every option is checked before the model is
    loaded; each finished row goes to the ``llm_bip.compare`` logger.

    Args:
        source: a local folder, hub id, .gguf file or ``smollm2``.
        out: the results folder, written atomically.
        spec: the methods, ratios, calibration settings (``spec.base``) and perplexity texts.
        overwrite: replace ``out`` (only a folder llm-bip wrote).
        device: torch device, e.g. "cpu", "cuda:1".
        dtype: "float32", "bfloat16" or "float16".

    Returns:
        The results written to results.json: the rows (dense first), calibrations, spec, versions and model.
    """
    check_compare_job(source, out, spec, overwrite=overwrite, device=device, dtype=dtype)
    model, tokenizer = load_model(source, dtype, device)
    results = compare_models(model, tokenizer, spec)
    results["model"] = source
    write_results(results, Path(out), overwrite)
    return results


def check_compare_job(source: str, out: str | Path, spec: CompareSpec, *, overwrite: bool, device: str,
                      dtype: str) -> None:
    """Every check that needs no model: the device, the split, every method's options at every ratio, an
    output folder apart from every input, readable calibration and evaluation text."""
    check_device(device, dtype)
    eval_split(spec.split, spec.datasets)
    configs = [parse_method(method, spec.base)[1] for method in spec.methods]
    for config in configs:  # fail on a bad spec before any long work
        for ratio in spec.ratios:
            replace(config, ratio=ratio).resolved()  # checks every option
    calibration_sources = sorted({config.calibration for config in configs})
    check_output_folder(out, overwrite, local_inputs(source, *calibration_sources, *spec.datasets))
    for calibration in calibration_sources:
        check_calibration_source(calibration)
    for dataset in spec.datasets:
        check_text_source(dataset)


def parse_method(spec: str, base: PruneConfig) -> tuple[str, PruneConfig]:
    """'name' or 'name:key=value,key=value' -> (label, config); e.g. 'bip:allocation=global'.
    Layer lists use '/': 'llm-pruner:keep_dense=0/-1' ('keep_dense=' for none)."""
    name, _, options = spec.partition(":")
    overrides: dict = {"method": name}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in CONFIG_FIELDS:
            raise PruneError(f"bad method option {item!r} in {spec!r}; use key=value with keys from PruneConfig")
        overrides[key] = [int(x) for x in value.split("/") if x] if key == "keep_dense" else _parse_value(value)
    return spec, PruneConfig(**{**base.__dict__, **overrides})


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@torch.no_grad()
def forward_floor(model, calib: torch.Tensor, batch_size: int) -> dict:
    """Wall time and peak memory of one plain forward pass over the calibration data."""
    log = PhaseLog()
    device = next(model.parameters()).device
    with log.phase("forward"):
        for batch in calib.split(batch_size):
            model(batch.to(device), use_cache=False)
    return log.phases["forward"]


def evaluate(model, tokenizer, spec: CompareSpec) -> dict[str, dict]:
    """Perplexity on every dataset at every window length, keyed 'dataset@seqlen' (``spec.split`` resolved)."""
    split = spec.split or "test"
    return {
        f"{dataset}@{seqlen}": perplexity(model, tokenizer, dataset, split, seqlen, spec.max_tokens).as_dict()
        for dataset in spec.datasets for seqlen in spec.seqlens
    }


@dataclass
class Calibration:
    """One calibration batch of a compare run, its settings and the forward floor measured on it."""

    settings: dict
    ids: torch.Tensor
    floor: dict

    def describe(self) -> dict:
        return {**self.settings, "tokens": self.ids.numel(), "floor_forward": self.floor}


def calibration_settings(config: PruneConfig) -> dict:
    return {name: getattr(config, name) for name in CALIBRATION_FIELDS}


def calibration_key(config: PruneConfig) -> str:
    """The same for two configs exactly when they name the same calibration batch."""
    return json.dumps(calibration_settings(config), sort_keys=True)


def calibrations(model, tokenizer, configs: list[PruneConfig]) -> dict[str, Calibration]:
    """One batch (and its forward floor) per distinct calibration setting among ``configs``, each built once."""
    found: dict[str, Calibration] = {}
    for config in configs:
        key = calibration_key(config)
        if key not in found:
            ids = calibration_batch(model, tokenizer, config)
            found[key] = Calibration(calibration_settings(config), ids, forward_floor(model, ids, config.batch_size))
    return found


def compare_models(model, tokenizer, spec: CompareSpec) -> dict:
    """Every (method, ratio) row plus the dense row, on a model in memory (each row prunes a copy); each
    method prunes on the calibration its options name (the base's unless it sets its own). Each row goes to
    the ``llm_bip.compare`` logger as it completes (long runs report progress); nothing is written here."""
    spec = replace(spec, split=eval_split(spec.split, spec.datasets))
    grid = [(label, PruneConfig(**{**config.__dict__, "ratio": ratio}))
            for label, config in map(partial(parse_method, base=spec.base), spec.methods) for ratio in spec.ratios]
    for _, config in grid:  # every option, budget and calibration window checked before the long part
        Pruner(model, config).check_calibration(config.n_samples, config.seqlen)
    for seqlen in spec.seqlens:
        check_window(model.config, seqlen, "--seqlens")
    batches = calibrations(model, tokenizer, [config for _, config in grid])
    rows = [logged({"method": "dense", "ratio": 0.0, "ppl": evaluate(model, tokenizer, spec),
                    "params_model": sum(p.numel() for p in model.parameters())})]
    for label, config in grid:
        rows.append(logged(pruned_row(model, tokenizer, spec, label, config, batches[calibration_key(config)])))
    return {"calibrations": [c.describe() for c in batches.values()], "rows": rows,
            "spec": {"methods": spec.methods, "ratios": spec.ratios, "seqlens": spec.seqlens,
                     "datasets": spec.datasets, "split": spec.split, "max_tokens": spec.max_tokens},
            "versions": library_versions()}


def pruned_row(model, tokenizer, spec: CompareSpec, label: str, config: PruneConfig, calibration: Calibration) -> dict:
    """One method at one ratio: a copy of ``model`` pruned on ``calibration``, measured, then freed."""
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    result = Pruner(pruned, config).run(calibration.ids)
    wall = time.perf_counter() - start
    return {
        "method": label, "ratio": config.ratio, "ppl": evaluate(pruned, tokenizer, spec),
        "block_ratio": round(result.block_ratio, 6), "params_model": result.params["model_after"],
        "params_blocks": result.params["blocks_after"], "prune_wall_s": round(wall, 3),
        "prune_peak_rss_mb": max(p["peak_rss_mb"] for p in result.phases.values()),
        "time_vs_forward": round(wall / max(calibration.floor["wall_s"], 1e-3), 2),
        "config": result.summary()["config"],
    }


def row_line(row: dict) -> str:
    """A finished row in one line: its perplexities, and how long the pruning took."""
    ppl = ", ".join(f"{key} {value['ppl']:.2f}" for key, value in row["ppl"].items())
    cost = f", pruned in {row['prune_wall_s']} s" if "prune_wall_s" in row else ""
    return f"{row['method']} @ {row['ratio']:.2f}: {ppl}{cost}"


def logged(row: dict) -> dict:
    """``row``, logged first."""
    logger.info(row_line(row))
    return row


def results_table(results: dict) -> str:
    """Markdown: one row per (method, ratio) with perplexity, size and pruning cost, then a footnote."""
    rows = results["rows"]
    keys = list(rows[0]["ppl"])
    head = ["method", "ratio", *[f"ppl {k}" for k in keys], "params", "prune s", "x forward", "peak RSS MB"]
    cells = [[r["method"], f"{r['ratio']:.2f}", *[f"{r['ppl'][k]['ppl']:.2f}" for k in keys], f"{r['params_model']:,}",
              r.get("prune_wall_s", "-"), r.get("time_vs_forward", "-"), r.get("prune_peak_rss_mb", "-")] for r in rows]
    first = rows[0]["ppl"][keys[0]]
    floors = "; ".join(f"over the {c['tokens']:,} tokens of calibration {c['calibration']!r} "
                       f"{c['floor_forward']['wall_s']} s (peak RSS {c['floor_forward']['peak_rss_mb']} MB)"
                       for c in results["calibrations"])
    note = (f"Perplexity over {first['tokens']:,} scored tokens of {text_label(first['dataset'], first['split'])} "
            f"(L={first['seqlen']}); one plain forward (x forward's unit) took {floors}.")
    return f"{markdown_table(head, cells)}\n\n{note}\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity vs ratio, one line per method, log scale (first dataset and window length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    key = next(iter(rows[0]["ppl"]))
    dense = rows[0]["ppl"][key]["ppl"]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colours = plt.get_cmap("tab20")(range(len(methods)))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for method, colour, marker in zip(methods, colours, "osD^v<>phX*" * 4):
        points = [(0.0, dense)] + [(r["ratio"], r["ppl"][key]["ppl"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points), marker=marker, color=colour, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of block parameters removed")
    ax.set_ylabel(f"perplexity ({key})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, out: Path, overwrite: bool) -> None:
    with atomic_folder(out, overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "results.md").write_text(results_table(results))
        plot(results, tmp / "ppl_vs_ratio.png")
