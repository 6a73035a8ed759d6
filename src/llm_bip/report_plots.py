"""The report's PNG plots: kept widths and scores per layer, training loss, measured speedups."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .report_data import SPEED_KINDS, WIDTH_NAMES


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG and close it."""
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
    """A speed record's model, by its folder or file name."""
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
