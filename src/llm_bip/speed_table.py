"""bench-speed's results as markdown: sizes and memory, then prefill and decode per setting."""

from __future__ import annotations

from collections.abc import Callable

from .tables import markdown_table


def _count(x: float) -> str:
    """A count with a G / M / k suffix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _ms(ms: dict) -> str:
    """Median (min–max) milliseconds."""
    return f"{ms['median']:.2f} ({ms['min']:.2f}–{ms['max']:.2f})"


def _speed_rows(models: list[dict], kind: str, setting: Callable[[dict], str]) -> list[list[str]]:
    """One row per (setting, model) of ``kind`` ('prefill' or 'decode'), grouped by setting."""
    pairs = [(m, m[kind][i]) for i in range(len(models[0][kind])) for m in models]
    return [[m["model"], setting(e), _count(e["macs_per_token"]["total"]), _ms(e["ms"]), f"{e['tokens_per_s']:,.1f}",
             f"{e['speedup']:.2f}", f"{1 / e['mac_ratio']:.2f}"] for m, e in pairs]


def speed_table(results: dict) -> str:
    """Markdown: sizes and memory, then prefill and decode per setting, speedup next to 1 / MAC ratio."""
    s, models = results["settings"], results["models"]
    memory = "peak CUDA MB" if s["device"].startswith("cuda") else "peak RSS MB"
    lines = ["## Models", ""]
    lines.append(markdown_table(
        ["model", "params", "ratio", "weights MB", "linear MACs/token", "ratio", memory, "ratio"],
        [[m["model"], f"{m['params']:,}", f"{m['ratios']['params']:.3f}", f"{m['weights_mb']:.1f}",
          _count(m["linear_macs_per_token"]), f"{m['ratios']['linear_macs_per_token']:.3f}",
          f"{m['peak_memory_mb']:.0f}", f"{m['ratios']['peak_memory_mb']:.3f}"] for m in models]))
    speed_head = ["MACs/token", "ms median (min–max)", "tokens/s", "speedup", "1 / MAC ratio"]
    lines += ["", "## Prefill: one forward over batch x length tokens (logits at every position, no KV cache)", ""]
    lines.append(markdown_table(["model", "batch x length", *speed_head],
                                _speed_rows(models, "prefill", lambda e: f"{e['batch']} x {e['length']}")))
    lines += ["", f"## Decode: greedy, KV cache, {s['decode_tokens']} timed steps after a {s['prompt_length']}-token "
                  "prompt (ms per step)", ""]
    lines.append(markdown_table(["model", "batch", *speed_head],
                                _speed_rows(models, "decode", lambda e: str(e["batch"]))))
    lines += ["", f"{s['device']}, {s['dtype']}, {results['torch_threads']} torch threads, {results['cpu']['name']}; "
                  f"median of {s['repeats']} runs after {s['warmup']} warm-up. Ratios are to the first model. "
                  "MACs/token: linear maps and attention products at the average context (prefill (L+1)/2, "
                  "decode prompt + (steps+1)/2). 1 / MAC ratio is the speedup a compute-bound run can reach; "
                  "large batch x length comes closest, small batches are bound by weight traffic and per-call "
                  "overhead. Peak memory covers all measurements of a model (on the CPU, the whole process's RSS, "
                  "runtime included)."]
    return "\n".join(lines) + "\n"
