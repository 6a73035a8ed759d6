"""Speed of dense and pruned models side by side: parameters, MACs per token, prefill and decode
throughput, peak memory, and every model's ratios to the first model.

MACs (multiply-accumulates) are counted from the instantiated modules, so the per-layer widths of
a pruned folder count as built: the linear maps (attention q/k/v/o, FFN gate/up/down, LM head) and
the attention products (query-key scores and the weighted sum of values). A query attending to
``context`` key positions, itself included, costs 2 * heads * head_dim * context product MACs per
layer. Prefill of L tokens under a causal mask: the average query attends to (L+1)/2 positions; a
decode step at (1-based) position p attends to p. Norms, rotary embeddings, softmax, activations
and the embedding lookup are not counted (elementwise, O(hidden) per token).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from .adapters import adapter_for
from .errors import PruneError
from .loading import load_model
from .outputs import SPEED_FILE, atomic_folder, library_versions
from .profiling import PhaseLog
from .sources import resolve_source
from .tables import markdown_table

TABLE_FILE = "speed.md"


# --------------------------------------------------------------------------- MACs


def linear_macs(linear: nn.Linear) -> int:
    """MACs per token of one linear map (a bias add is not a MAC)."""
    return linear.in_features * linear.out_features


def macs_per_token(model, context: float) -> dict[str, float]:
    """MACs of one token through ``model`` when its queries attend to ``context`` key positions."""
    views = adapter_for(model.config).blocks(model)
    counts = {
        "attention_linear": sum(linear_macs(m) for v in views for m in v.attention_projections()),
        "attention_products": sum(2 * v.widths.num_heads * v.head_dim * context for v in views),
        "ffn": sum(linear_macs(m) for v in views for m in v.ffn_projections()),
        "lm_head": linear_macs(model.get_output_embeddings()),
    }
    return {"context": context, **counts, "total": sum(counts.values())}


def prefill_context(length: int) -> float:
    """Key positions the average query of a causal prefill of ``length`` tokens attends to."""
    return (length + 1) / 2


def decode_context(prompt_length: int, steps: int) -> float:
    """Average key positions of ``steps`` decode steps after a prompt (step k sits at P + k + 1)."""
    return prompt_length + (steps + 1) / 2


# --------------------------------------------------------------------------- settings


def parse_sizes(text: str, option: str) -> list[int]:
    """'1,8' -> [1, 8]; anything but comma-separated positive integers is a PruneError."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise PruneError(f"{option} takes comma-separated positive integers, e.g. 1,8; got {text!r}")
    return values


@dataclass
class SpeedSettings:
    """What is measured. The defaults keep dense + two pruned SmolLM2-135M within a few minutes on
    2 CPU cores (one 8x512 forward of the dense model takes about 12 s there)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    lengths: list[int] = field(default_factory=lambda: [128, 512])
    decode_tokens: int = 32
    prompt_length: int = 32
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def validate(self) -> None:
        sizes = {"--decode-tokens": self.decode_tokens, "--prompt-length": self.prompt_length,
                 "--repeats": self.repeats}
        if self.threads is not None:
            sizes["--threads"] = self.threads
        for option, value in sizes.items():
            if value < 1:
                raise PruneError(f"{option} must be a positive integer, got {value}")
        if self.warmup < 0:
            raise PruneError(f"--warmup must be zero or more, got {self.warmup}")
        if not (self.batch_sizes and self.lengths and min(self.batch_sizes + self.lengths) >= 1):
            raise PruneError("--batch-sizes and --lengths must list positive integers")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PruneError(f"--device {self.device}: no CUDA device is available here")

    @property
    def positions(self) -> int:
        """The most positions any measurement uses."""
        return max(*self.lengths, self.prompt_length + self.decode_tokens)


def check_positions(source: str, settings: SpeedSettings) -> None:
    """Fail before any measurement when a model cannot hold the longest sequence asked for."""
    location = resolve_source(source)
    try:
        limit = AutoConfig.from_pretrained(location).max_position_embeddings
    except Exception as err:
        raise PruneError(f"{source}: cannot read its config ({type(err).__name__}: {err})") from err
    if settings.positions > limit:
        raise PruneError(f"{source}: the measurements need {settings.positions} positions (--lengths, or "
                         f"--prompt-length + --decode-tokens), more than its max_position_embeddings {limit}")


# --------------------------------------------------------------------------- timing


def random_ids(vocab_size: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with queued device work finished before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def repeated(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    """The seconds ``run`` reports on each of ``repeats`` calls after ``warmup`` discarded ones."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def throughput(seconds: list[float], tokens: int) -> dict:
    """Median and min/max of the runs in ms, and tokens/s at the median."""
    median = statistics.median(seconds)

    def ms(s: float) -> float:
        return round(1e3 * s, 4)

    return {"ms": {"median": ms(median), "min": ms(min(seconds)), "max": ms(max(seconds)),
                   "runs": [ms(s) for s in seconds]}, "tokens_per_s": tokens / median}


def start_decode(model, prompt: torch.Tensor):
    """(KV cache, first greedy token) after a forward over the prompt."""
    out = model(prompt, use_cache=True)
    return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_steps(model, cache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy one-token forwards on the KV cache; the tokens they produce (batch, steps)."""
    tokens = []
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


# --------------------------------------------------------------------------- one model


class ModelBench:
    """Measurements of one loaded model under the given settings."""

    def __init__(self, model, settings: SpeedSettings):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.log = PhaseLog()

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return random_ids(self.model.config.vocab_size, batch, length, self.settings.seed, self.device)

    def prefill(self, batch: int, length: int) -> dict:
        ids = self.ids(batch, length)
        with self.log.phase(f"prefill {batch}x{length}"):
            seconds = repeated(lambda: timed(lambda: self.model(ids, use_cache=False), self.device),
                               self.settings.warmup, self.settings.repeats)
        return {"batch": batch, "length": length, "macs_per_token": macs_per_token(self.model, prefill_context(length)),
                **throughput(seconds, batch * length)}

    def decode(self, batch: int) -> dict:
        """Per-step time of greedy decoding (the prompt's forward is not timed)."""
        s = self.settings
        prompt = self.ids(batch, s.prompt_length)

        def seconds_per_step() -> float:
            cache, token = start_decode(self.model, prompt)
            return timed(lambda: decode_steps(self.model, cache, token, s.decode_tokens), self.device) / s.decode_tokens

        with self.log.phase(f"decode {batch}"):
            seconds = repeated(seconds_per_step, s.warmup, s.repeats)
        context = decode_context(s.prompt_length, s.decode_tokens)
        return {"batch": batch, "prompt_length": s.prompt_length, "new_tokens": s.decode_tokens,
                "macs_per_token": macs_per_token(self.model, context), **throughput(seconds, batch)}

    def peak_memory_mb(self) -> float:
        """Peak over all measurements: CUDA memory allocated on a GPU, process RSS on the CPU."""
        key = "peak_cuda_mb" if self.device.type == "cuda" else "peak_rss_mb"
        return max(phase[key] for phase in self.log.phases.values())

    @torch.inference_mode()
    def run(self) -> dict:
        """Sizes, MACs, every prefill and decode setting, and the peak memory over all of them."""
        s = self.settings
        params = list(self.model.parameters())
        return {
            "params": sum(p.numel() for p in params),
            "weights_mb": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "linear_macs_per_token": macs_per_token(self.model, 0)["total"],
            "prefill": [self.prefill(b, n) for b in s.batch_sizes for n in s.lengths],
            "decode": [self.decode(b) for b in s.batch_sizes],
            "peak_memory_mb": self.peak_memory_mb(),
            "phases": self.log.phases,
        }


# --------------------------------------------------------------------------- several models


def add_ratios(row: dict, base: dict) -> None:
    """Ratios of ``row`` to the ``base`` model: sizes and memory as row/base, speed as a speedup."""
    row["ratios"] = {key: row[key] / base[key] for key in ("params", "linear_macs_per_token", "peak_memory_mb")}
    for kind in ("prefill", "decode"):
        for entry, ref in zip(row[kind], base[kind]):
            entry["mac_ratio"] = entry["macs_per_token"]["total"] / ref["macs_per_token"]["total"]
            entry["speedup"] = entry["tokens_per_s"] / ref["tokens_per_s"]


def cpu_info(device: str) -> dict:
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
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_speed(models: list[str], settings: SpeedSettings | None = None,
                on_model: Callable[[dict], None] | None = None) -> dict:
    """Measure each model in turn (one loaded at a time); ratios are to the first. ``on_model``
    sees each model's record as it completes. Nothing is written here."""
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
        if on_model:
            on_model(row)
    return {"settings": asdict(settings), "torch_threads": torch.get_num_threads(), "cpu": cpu_info(settings.device),
            "versions": library_versions(), "models": rows}


# --------------------------------------------------------------------------- output


def _count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _ms(ms: dict) -> str:
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


def write_speed(results: dict, out: Path, overwrite: bool) -> None:
    with atomic_folder(out, overwrite) as tmp:
        (tmp / SPEED_FILE).write_text(json.dumps(results, indent=2))
        (tmp / TABLE_FILE).write_text(speed_table(results))
