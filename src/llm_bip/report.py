"""Run report: a prune / finetune / distill / eval run folder as markdown and HTML, with tables and PNG plots.

Every section is optional: a section appears when the run (or an extra eval / speed folder)
holds its data. The report goes to its own folder, written atomically; the run is only read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
from markdown_it import MarkdownIt
from matplotlib.ticker import MaxNLocator
from safetensors.numpy import load_file

from .errors import PruneError
from .outputs import EVAL_FILE, SCORES_FILE, SPEED_FILE, SUMMARY_FILE, atomic_folder, check_output_folder
from .tables import markdown_table

REPORT_MD, REPORT_HTML = "report.md", "report.html"
RUN_FILES = (SUMMARY_FILE, SCORES_FILE, EVAL_FILE, SPEED_FILE)
SPEED_KINDS = ("prefill", "decode")
WIDTH_NAMES = {"num_heads": "query heads", "num_kv_heads": "KV heads", "intermediate_size": "FFN channels"}
SCORE_KEY = re.compile(r"layer(\d+)\.(\w+)")
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


@dataclass
class RunData:
    """Everything a report can show; each part may be missing."""

    name: str
    summary: dict = field(default_factory=dict)
    scores: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    speed: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PruneError(f"{path}: cannot read JSON ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise PruneError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_scores(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """``layer{i}.heads`` / ``layer{i}.channels`` tensors (see scores.save_scores) as {i: {kind: array}}."""
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise PruneError(f"{path}: cannot read scores ({type(err).__name__}: {err})") from err
    scores: dict[int, dict[str, np.ndarray]] = {}
    for key, values in tensors.items():
        match = SCORE_KEY.fullmatch(key)
        if match:
            scores.setdefault(int(match[1]), {})[match[2]] = values
    return dict(sorted(scores.items()))


def read_extra(path: Path, name: str, option: str) -> dict:
    """The JSON of an extra folder given by ``option`` (or the JSON file itself)."""
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise PruneError(f"{option} {path}: no {name} there; pass a folder written by llm-bip")
    return read_json(file)


def load_run(run: Path, speed: Path | None = None, evals: Sequence[Path] = ()) -> RunData:
    if not run.is_dir():
        raise PruneError(f"{run}: no such run folder")
    present = [name for name in RUN_FILES if (run / name).is_file()]
    if not present:
        raise PruneError(f"{run} holds none of {', '.join(RUN_FILES)}; pass a folder written by "
                         "llm-bip prune, finetune, distill, eval or bench-speed")
    data = RunData(name=run.resolve().name)
    if SUMMARY_FILE in present:
        data.summary = read_json(run / SUMMARY_FILE)
    if SCORES_FILE in present:
        data.scores = read_scores(run / SCORES_FILE)
    if EVAL_FILE in present:
        data.evals.append(read_json(run / EVAL_FILE))
    data.evals += [read_extra(path, EVAL_FILE, "--eval") for path in evals]
    if speed is not None:
        data.speed = read_extra(speed, SPEED_FILE, "--speed")
    elif SPEED_FILE in present:
        data.speed = read_json(run / SPEED_FILE)
    return data


# --------------------------------------------------------------------------- markdown


def fmt(value) -> str:
    """A table cell: thousands separators for ints, five significant digits for small floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "-"
    if isinstance(value, dict):
        return fmt(json.dumps(value))
    return str(value).replace("|", "\\|")


def table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    return markdown_table(head, [[fmt(cell) for cell in row] for row in rows])


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float))


def records_table(records: Sequence[dict]) -> str:
    """One row per record; columns: every scalar key, in order of first appearance."""
    columns = list(dict.fromkeys(k for r in records for k, v in r.items() if is_scalar(v)))
    return table(columns, [[r.get(c) for c in columns] for r in records])


def flatten(items: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of 'outer.inner' keys."""
    found = {}
    for key, value in items.items():
        if isinstance(value, dict):
            found.update(flatten(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def key_value_table(items: dict) -> str:
    return table(["setting", "value"], list(flatten(items).items()))


def section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *[p for p in parts if p]])


def image(name: str, alt: str) -> str:
    return f"![{alt}]({name})"


# --------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_widths(layers: list[dict], path: Path) -> None:
    """Kept vs original widths per layer: attention heads (query, KV) and FFN channels."""
    plt = pyplot()
    index = np.array([layer["layer"] for layer in layers])
    colours = plt.get_cmap("tab20").colors
    fig, panels = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, keys, title in zip(panels, (("num_heads", "num_kv_heads"), ("intermediate_size",)),
                               ("attention heads", "FFN channels")):
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            x = index + (j - (len(keys) - 1) / 2) * width
            ax.bar(x, [layer["before"][key] for layer in layers], width, color=colours[2 * j + 1],
                   label=f"{WIDTH_NAMES[key]} original")
            ax.bar(x, [layer["after"][key] for layer in layers], width, color=colours[2 * j],
                   label=f"{WIDTH_NAMES[key]} kept")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.35 * max(layer["before"][key] for layer in layers for key in keys))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small", loc="upper right", ncol=len(keys))
    save_figure(fig, path)


def spans_decades(values: np.ndarray) -> bool:
    """Log scale is sensible: every value positive, and they span at least a factor of ten."""
    return bool((values > 0).all() and values.max() >= 10 * values.min())


def plot_scores(scores: dict[int, dict[str, np.ndarray]], path: Path) -> None:
    """Box plots of head and channel scores per layer (log scale where they span decades)."""
    plt = pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(panels, ("heads", "channels")):
        layers = [i for i, s in scores.items() if s[kind].size]
        values = [scores[i][kind] for i in layers]
        if not layers:
            ax.set_visible(False)
            continue
        ax.boxplot(values, positions=layers, widths=0.6, manage_ticks=False)
        if spans_decades(np.concatenate(values)):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{kind[:-1]} scores")
        ax.set_xlabel("layer")
    save_figure(fig, path)


LOSS_LABELS = {"loss": "total", "kl": "KL to the teacher", "lm": "language model", "hidden": "block outputs"}


def plot_loss(history: list[dict], path: Path) -> None:
    """The training loss per logged step, and each loss of the objective where there are several."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    kinds = [k for k in LOSS_LABELS if k in history[0]]
    for kind in kinds if len(kinds) > 2 else ["loss"]:
        points = [(h["step"], h[kind]) for h in history]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=LOSS_LABELS[kind])
    if len(kinds) > 2:
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def setting_label(kind: str, entry: dict) -> str:
    """'prefill b1 L128' (prefill entries have a length), 'decode b1'."""
    return " ".join([kind, f"b{entry['batch']}", *([f"L{entry['length']}"] if "length" in entry else [])])


def speedups(model: dict) -> dict[str, tuple[float, float]]:
    """{setting: (measured speedup, 1 / MAC ratio)} of one model vs the first model of its run."""
    return {setting_label(kind, entry): (entry["speedup"], 1 / entry["mac_ratio"])
            for kind in SPEED_KINDS for entry in model[kind]}


def model_name(model: dict) -> str:
    return Path(model["model"]).name


def plot_speed(models: list[dict], path: Path) -> None:
    """Measured speedup per setting, one bar per model after the first, with 1 / MAC ratio marked on
    each bar: the speedup that a compute-bound run would reach."""
    plt = pyplot()
    shown = models[1:] or models
    found = [speedups(m) for m in shown]
    labels = list(dict.fromkeys(k for f in found for k in f))
    width = 0.8 / len(shown)
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(4 + 1.2 * len(labels), 4))
    for j, (model, values) in enumerate(zip(shown, found)):
        x = np.arange(len(labels)) + (j - (len(shown) - 1) / 2) * width
        measured, ideal = np.array([values[k] for k in labels]).T
        ax.bar(x, measured, width, label=model_name(model), color=colours[j % len(colours)])
        ax.hlines(ideal, x - width / 2, x + width / 2, colors="black", lw=2, zorder=3,
                  label="1 / MAC ratio" if j == 0 else None)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(f"speedup vs {model_name(models[0])}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


# --------------------------------------------------------------------------- sections


def settings_section(summary: dict) -> str:
    settings = {k: summary[k] for k in ("model", "dtype", "device") if k in summary}
    settings.update(summary.get("config", {}))
    if "calibration" in summary:
        settings["calibration tokens"] = summary["calibration"]["tokens"]
    if "prune_wall_s" in summary:
        settings["pruning wall time (s)"] = summary["prune_wall_s"]
    return section("Settings", key_value_table(settings)) if settings else ""


def removed_row(p: dict, part: str) -> list:
    before, after = p[f"{part}_before"], p[f"{part}_after"]
    return [part, before, after, f"{100 * (1 - after / before):.2f}%"]


def parameters_section(summary: dict) -> str:
    if "parameters" not in summary:
        return ""
    rows = [removed_row(summary["parameters"], part) for part in ("blocks", "model")]
    return section("Parameters", table(["part", "before", "after", "removed"], rows),
                   "Blocks: attention and FFN weights of the decoder blocks (embeddings, norms and LM head excluded).")


def perplexity_table(results: dict, label: str = "model") -> str:
    """{name: Perplexity.as_dict()} as one table, the names in a first column called ``label``."""
    return records_table([{label: name, **values} for name, values in results.items()])


def perplexity_section(summary: dict) -> str:
    results = summary.get("perplexity")
    return section("Perplexity", perplexity_table(results)) if results else ""


def widths_section(summary: dict, out: Path) -> str:
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
    if not values.size:
        return [None] * 3
    return [float(np.min(values)), float(np.median(values)), float(np.max(values))]


def scores_section(scores: dict[int, dict[str, np.ndarray]], out: Path) -> str:
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
    versions = summary.get("versions")
    return "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else ""


def report_markdown(data: RunData, out: Path) -> str:
    """The report's markdown; plots are written into ``out`` as a side effect."""
    summary = data.summary
    parts = [f"# llm-bip report: {data.name}", settings_section(summary), parameters_section(summary),
             perplexity_section(summary), widths_section(summary, out), scores_section(data.scores, out),
             *(recovery_section(name, summary.get(name, {}), out) for name in RECOVERY_SECTIONS),
             eval_section(data.evals),
             speed_section(data.speed, out), phases_section(summary), versions_line(summary)]
    return "\n\n".join(p for p in parts if p) + "\n"


def to_html(markdown_text: str, title: str) -> str:
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)  # names stay text
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}</body></html>\n")


# --------------------------------------------------------------------------- entry point


def default_out(run: Path) -> Path:
    run = run.resolve()
    return run.parent / f"{run.name}-report"


def build_report(run: Path, out: Path | None = None, speed: Path | None = None, evals: Sequence[Path] = (),
                 overwrite: bool = False) -> Path:
    """Write report.md, report.html and the plots for ``run`` into ``out`` (default: ``<RUN>-report``)."""
    run = Path(run)
    data = load_run(run, speed, [Path(p) for p in evals])
    out = Path(out) if out is not None else default_out(run)
    check_output_folder(out, overwrite, inputs=[run, *([speed] if speed else []), *evals])
    with atomic_folder(out, overwrite) as tmp:
        text = report_markdown(data, tmp)
        (tmp / REPORT_MD).write_text(text)
        (tmp / REPORT_HTML).write_text(to_html(text, f"llm-bip report: {data.name}"))
    return out
