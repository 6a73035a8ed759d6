"""The report's sections, one per part of a run; each is empty where the run holds no data for it. Sections
with a plot write it into the report folder ``out``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report_data import SPEED_KINDS, WIDTH_NAMES
from .report_format import fmt, image, is_scalar, key_value_table, records_table, section, table
from .report_plots import plot_loss, plot_scores, plot_speed, plot_widths


def settings_section(summary: dict) -> str:
    """The model, dtype, device, pruning config, calibration tokens and wall time."""
    settings = {k: summary[k] for k in ("model", "dtype", "device") if k in summary}
    settings.update(summary.get("config", {}))
    if "calibration" in summary:
        settings["calibration tokens"] = summary["calibration"]["tokens"]
    if "prune_wall_s" in summary:
        settings["pruning wall time (s)"] = summary["prune_wall_s"]
    return section("Settings", key_value_table(settings)) if settings else ""


def removed_row(p: dict, part: str) -> list:
    """``part``'s parameters before and after pruning, and the share removed."""
    before, after = p[f"{part}_before"], p[f"{part}_after"]
    return [part, before, after, f"{100 * (1 - after / before):.2f}%"]


def parameters_section(summary: dict) -> str:
    """Parameters of the blocks and the whole model, before and after pruning."""
    if "parameters" not in summary:
        return ""
    rows = [removed_row(summary["parameters"], part) for part in ("blocks", "model")]
    return section("Parameters", table(["part", "before", "after", "removed"], rows),
                   "Blocks: attention and FFN weights of the decoder blocks (embeddings, norms and LM head excluded).")


def perplexity_table(results: dict, label: str = "model") -> str:
    """{name: Perplexity.as_dict()} as one table, the names in a first column called ``label``."""
    return records_table([{label: name, **values} for name, values in results.items()])


def perplexity_section(summary: dict) -> str:
    """The perplexities measured after pruning."""
    results = summary.get("perplexity")
    return section("Perplexity", perplexity_table(results)) if results else ""


def widths_section(summary: dict, out: Path) -> str:
    """Kept vs original widths per layer: a plot and a table."""
    layers = summary.get("layers")
    if not layers:
        return ""
    plot_widths(layers, out / "widths.png")
    rows = [[layer["layer"], *[f"{layer['after'][k]} / {layer['before'][k]}" for k in WIDTH_NAMES],
             f"{100 * layer['after']['intermediate_size'] / layer['before']['intermediate_size']:.1f}%"]
            for layer in layers]
    return section("Kept widths per layer", image("widths.png", "kept vs original widths per layer"),
                   table(["layer", *[f"{name} kept / original" for name in WIDTH_NAMES.values()], "FFN kept"], rows))


def score_stats(values: np.ndarray) -> list[float | None]:
    """Min, median and max of ``values`` (None for none)."""
    if not values.size:
        return [None] * 3
    return [float(np.min(values)), float(np.median(values)), float(np.max(values))]


def scores_section(scores: dict[int, dict[str, np.ndarray]], out: Path) -> str:
    """Head and channel score distributions per layer: a plot and a table."""
    if not scores:
        return ""
    plot_scores(scores, out / "scores.png")
    kinds = ("heads", "channels")
    head = ["layer", *[f"{kind} {stat}" for kind in kinds for stat in ("min", "median", "max")]]
    rows = [[i, *score_stats(s["heads"]), *score_stats(s["channels"])] for i, s in scores.items()]
    return section("Scores per layer", image("scores.png", "score distributions per layer"), table(head, rows),
                   "Scores as saved by the pruner: higher means more important.")


def phases_table(phases: dict) -> str:
    """{phase: {wall_s, peak_rss_mb, ...}} (PhaseLog.phases) as one table."""
    return records_table([{"phase": name, **record} for name, record in phases.items()])


def phases_section(summary: dict) -> str:
    """Time and memory of each phase of the pruning run."""
    phases = summary.get("phases")
    return section("Time and memory", phases_table(phases)) if phases else ""


RECOVERY_SECTIONS = {"finetune": "Fine-tuning", "distill": "Distillation"}


def recovery_section(name: str, record: dict, out: Path) -> str:
    """A finetune or distill section: settings, perplexity before/after, the loss curves, time and memory."""
    if not record:
        return ""
    settings = {k: v for k, v in record.items() if k not in ("perplexity", "loss_history", "phases")}
    parts = [key_value_table(settings) if settings else ""]
    if record["perplexity"]:  # empty with --eval none
        parts.append(perplexity_table(record["perplexity"], label=RECOVERY_SECTIONS[name].lower()))
    if record["loss_history"]:
        plot_loss(record["loss_history"], out / f"loss-{name}.png")
        parts.append(image(f"loss-{name}.png", f"{RECOVERY_SECTIONS[name].lower()} loss"))
    parts.append(phases_table(record["phases"]))
    return section(RECOVERY_SECTIONS[name], *parts)


def zeroshot_part(zeroshot: dict) -> str:
    """zeroshot.zero_shot's result: a row per task, the average, and the settings."""
    settings = {k: v for k, v in zeroshot.items() if k not in ("tasks", "average", "averaged")}
    return "\n\n".join([
        records_table([{"task": task, **scores} for task, scores in zeroshot["tasks"].items()]),
        f"Average ({fmt(zeroshot['averaged'])}): **{fmt(zeroshot['average'])}**",
        "Settings: " + ", ".join(f"{k} {fmt(v)}" for k, v in settings.items())])


def eval_section(evals: list[dict]) -> str:
    """Per evaluated model: its perplexities and zero-shot scores."""
    parts = []
    for result in evals:
        parts.append(f"### {fmt(result['model'])}")
        if result["perplexity"]:  # empty with --ppl none
            parts.append(records_table(result["perplexity"]))
        if result["zeroshot"]:  # None without --tasks
            parts.append(zeroshot_part(result["zeroshot"]))
    return section("Evaluation", *parts) if parts else ""


def speed_fields(record: dict) -> dict:
    """Scalar fields, plus the median / total of nested dicts (times, MACs) as 'key median' / 'key total'."""
    found = {}
    for key, value in record.items():
        if is_scalar(value):
            found[key] = value
        elif isinstance(value, dict):
            found.update({f"{key} {sub}": value[sub] for sub in ("median", "total") if sub in value})
    return found


def speed_section(speed: dict, out: Path) -> str:
    """speed.bench_speed's result: sizes and ratios per model, each prefill / decode setting, the speedup plot."""
    if not speed:
        return ""
    models = speed["models"]
    rows = [{**speed_fields(m), **{f"{k} ratio": v for k, v in m["ratios"].items()}} for m in models]
    parts = ["Ratios and speedups are relative to the first model.", records_table(rows)]
    for kind in SPEED_KINDS:
        parts += [f"**{kind}**", records_table([{"model": m["model"], **speed_fields(e)} for m in models
                                                for e in m[kind]])]
    plot_speed(models, out / "speed.png")
    parts.append(image("speed.png", "measured speedups and 1 / MAC ratio vs the first model"))
    settings = {**speed["settings"], **{k: v for k, v in speed.items() if k not in ("models", "settings")}}
    parts.append(key_value_table(settings))
    return section("Speed", *parts)


def versions_line(summary: dict) -> str:
    """The library versions the run used."""
    versions = summary.get("versions")
    return "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else ""
