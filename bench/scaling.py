"""Scaling of ``llm-bip prune`` (the default method) with model width and depth (issue 24, item 5).

For each shape, a random Llama-style checkpoint with a real model's widths, depth, vocabulary and tying
(bench/offload_memory.py's synthesis, shard by shard; SmolLM2's tokenizer) is pruned offloaded and in memory,
each in its own process, with the default method, a small calibration (8 x 128 tokens of ``mix``) and
``--eval none``: wall time, peak RSS (wait4) and the run's own phases per block. One block of the same
shape is then timed in this process, with the functions the run uses: a plain forward pass over the
calibration tokens, and the refit's two float64 least-squares solves (o_proj and down_proj, 80% kept).

Fit: per-block prune time = c x block forward time + refit solve time (c in forward passes), and the
growth exponent of prune time against forward time across shapes. From it: Llama-3.1-8B and -70B on this
CPU (8 x 128, and the default 64 x 512; their block forwards are timed here too), and, from FLOP counts
and the stated throughputs in GPU_ASSUMED, on one GPU and on eight: estimates, not measurements.

    OMP_NUM_THREADS=1 python bench/scaling.py [--shapes 135m,0.5b,1b,3b] [--threads 1]
    python bench/scaling.py --dry-run   # a tiny shape, 2 x 32 tokens: tests the logic in seconds

Resumable: each finished run is a row of bench/results/scaling.json (the table: scaling.md), and a shape
and run already there is skipped. The extrapolation: bench/results/scaling_extrapolation.{json,md}, and
the fits and assumptions behind it: bench/results/scaling_fit.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import bench_results
import torch
from bench_results import write_rows
from offload_memory import compare_outputs, folder_size, run_prune, synthesize
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llm_bip.calibration import capture_block_inputs, collect_block_grams, forward_block
from llm_bip.config import PruneConfig
from llm_bip.devices import DTYPES
from llm_bip.engine import Stack
from llm_bip.surgery import Projection, refit_projection


@dataclass(frozen=True)
class Shape:
    """A Llama-family model's block widths, depth and embedding, as its config.json gives them."""

    model: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def attn_width(self) -> int:  # heads x head_dim; head_dim = hidden / heads in every shape here
        return self.hidden

    def linear_params(self) -> int:
        kv = self.kv_heads * self.hidden // self.heads
        return 2 * self.hidden * (self.attn_width + kv) + 3 * self.hidden * self.intermediate

    def block_params(self) -> int:
        return self.linear_params() + 2 * self.hidden  # the two norms

    def parameters(self) -> int:
        return self.layers * self.block_params() + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


SMOLLM2_VOCAB = 49152  # the tokenizer's; the "dry" shape takes it
SHAPES = {
    "dry": Shape("tiny test shape", 64, 2, 172, 4, 2, SMOLLM2_VOCAB, True),
    "135m": Shape("SmolLM2-135M", 576, 30, 1536, 9, 3, 49152, True),
    "0.5b": Shape("Qwen2.5-0.5B widths, Llama block (no QKV biases)", 896, 24, 4864, 14, 2, 151936, True),
    "1b": Shape("Llama-3.2-1B", 2048, 16, 8192, 32, 8, 128256, True),
    "3b": Shape("Llama-3.2-3B", 3072, 28, 8192, 24, 8, 128256, True),
}
EXTRAPOLATED = {
    "8b": Shape("Llama-3.1-8B", 4096, 32, 14336, 32, 8, 128256, False),
    "70b": Shape("Llama-3.1-70B", 8192, 80, 28672, 64, 8, 128256, False),
}
ALL_SHAPES = {**SHAPES, **EXTRAPOLATED}
MODES = ("offload", "in_memory")
BLOCK_FIELDS = ("block_forward_s", "forward_gflop", "refit_solve_s", "solve_gflop", "gram_solve_s",
                "gram_solve_gflop")  # measure_block's
PRUNE_PHASES = ("scoring", "reconstruction", "surgery", "scoring_and_surgery")  # the per-block passes
IN_MEMORY_RATIO = 2.0  # in-memory peak RSS / checkpoint before any is measured here (offload_llama1b.md: 1.91)
TIMING_VOCAB = 256  # the timed one-block model's vocabulary (the embedding does not enter the block's time)
DEFAULTS = PruneConfig()

# GPU estimates: NVIDIA H100 SXM5 datasheet peaks (https://www.nvidia.com/en-us/data-center/h100/): dense BF16
# tensor 989 TFLOP/s, FP32 67 TFLOP/s, FP64 tensor 67 TFLOP/s; the achieved shares are assumptions.
GPU_PEAKS = {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12}
GPU_SHARES = {
    "bf16": 0.40,  # the block forwards, weights in bfloat16
    "fp32": 0.50,  # the Grams: float32 matmuls (torch's default: no TF32 for matmul)
    "fp64": 0.30,  # the refit: Cholesky factor and solves in float64
}
GPU_ASSUMED = {
    **{kind: share * GPU_PEAKS[kind] for kind, share in GPU_SHARES.items()},
    "memory_bytes": 80e9,  # one H100's memory
    "disk_bytes_s": 3e9,  # one NVMe SSD, read and write, for the checkpoint and an offloaded run's blocks
}
GPU_COUNT = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="135m,0.5b,1b,3b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--dry-run", action="store_true", help="the tiny 'dry' shape, 2 x 32 tokens, no 8B/70B blocks; "
                                                          "results in the work folder, not bench/results")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--calibration", default=DEFAULTS.calibration)
    p.add_argument("--ratio", type=float, default=DEFAULTS.ratio)
    p.add_argument("--method", default=DEFAULTS.method)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS of the runs")
    p.add_argument("--repeats", type=int, default=3, help="timed block forwards (median), after one untimed")
    p.add_argument("--no-large-blocks", dest="large_blocks", action="store_false",
                   help="do not time one 8B and one 70B block (3.4 GB in float32, about a minute)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llm-bip-scaling",
                   help="checkpoints and outputs, one folder per shape, removed once the shape is done")
    p.add_argument("--keep", action="store_true", help="keep each shape's checkpoint and outputs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shapes, args.samples, args.calib_seqlen, args.large_blocks = "dry", 2, 32, False
        args.work = args.work / "dry-run"
    args.shapes = args.shapes.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    return args


# --- FLOPs and bytes, per block -----------------------------------------------------------------------------


def forward_flops(s: Shape, samples: int, seqlen: int) -> float:
    """One block's forward: its linear maps, and attention's scores and weighted values (full L x L)."""
    return 2 * s.linear_params() * samples * seqlen + 4 * samples * seqlen ** 2 * s.attn_width


def gram_flops(s: Shape, samples: int, seqlen: int) -> float:
    """The reconstruction pass's Grams of o_proj's and down_proj's inputs (with the ones column); none for a
    projection with more columns than tokens, whose rows are kept instead (calibration.ProjectionInputs)."""
    tokens = samples * seqlen
    return sum(2 * tokens * (w + 1) ** 2 for w in (s.attn_width, s.intermediate) if tokens >= w + 1)


def solve_flops(s: Shape, keep: float, tokens: float) -> float:
    """refit_projection for o_proj and down_proj with k = keep x width columns (+ the bias). From the Gram:
    G[K, :] W^T, the Cholesky factor, the solve and the two error comparisons; from the rows, where there are
    fewer tokens than k: the targets X W^T, X_K X_K^T, its factor and solve, the refit and the cut's error
    (``tokens`` = inf: from the Gram)."""
    total = 0.0
    for width in (s.attn_width, s.intermediate):
        k = round(keep * width) + 1
        if tokens < k:
            total += 2 * tokens * (width + 1) * s.hidden + 2 * tokens ** 2 * k + tokens ** 3 / 3 + (
                2 * tokens ** 2 * s.hidden + 4 * tokens * k * s.hidden)
        else:
            total += 2 * k * (width + 1) * s.hidden + k ** 3 / 3 + 6 * k * k * s.hidden
    return total


def refit_bytes(s: Shape, tokens: int, keep: float) -> float:
    """The refit's inputs for both projections (float32 rows below width + 1 tokens, else float64 Grams) and
    the larger of the two solves' float64 working sets (the rows' copies and kernel, or the Gram's gathers)."""
    held, solving = 0.0, 0.0
    for width in (s.attn_width, s.intermediate):
        k = round(keep * width) + 1
        held += 4 * tokens * (width + 1) if tokens < width + 1 else 8 * (width + 1) ** 2
        solving = max(solving, 8 * tokens * (width + 1 + k + s.hidden + tokens) if tokens < k else 8 * 4 * k * k)
    return held + solving


def working_bytes(s: Shape, samples: int, seqlen: int, itemsize: int, keep: float) -> float:
    """What an offloaded run holds beyond the process itself: the input embedding (block 0's inputs), or one
    block, its refit's inputs and working set, and its calibration inputs and outputs, the larger."""
    activations = itemsize * samples * seqlen * s.hidden * 2 + 4 * min(samples, DEFAULTS.batch_size) * seqlen * (
        3 * s.intermediate)
    return max(s.vocab * s.hidden * itemsize,
               s.block_params() * itemsize + refit_bytes(s, samples * seqlen, keep) + activations)


# --- one block, timed here ---------------------------------------------------------------------------------


def seconds(work, repeats: int) -> float:
    """The median wall time of ``repeats`` calls, after one untimed call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_block_model(s: Shape, seqlen: int, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=TIMING_VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=1, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=max(2048, seqlen), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def measure_block(s: Shape, args: argparse.Namespace, solve: bool = True) -> dict:
    """One block of shape ``s`` over ``args.samples`` x ``args.calib_seqlen`` random tokens, in batches of the
    prune's default size: its plain forward (forward_block), and with ``solve`` the refit's solves."""
    model = one_block_model(s, args.calib_seqlen, DTYPES[args.dtype])
    stack = Stack(model)
    view = stack.views[0]
    ids = torch.randint(TIMING_VOCAB, (args.samples, args.calib_seqlen), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, stack.adapter.layers(model), ids, DEFAULTS.batch_size)
    print(f"timing one {s.model} block ({s.block_params() / 1e6:.0f}M parameters)", flush=True)
    out = {"block_forward_s": round(seconds(lambda: forward_block(view, inputs), args.repeats), 3),
           "forward_gflop": round(forward_flops(s, args.samples, args.calib_seqlen) / 1e9, 2)}
    if solve:
        keep = 1 - args.ratio
        as_run, from_gram = refit_seconds(stack, view, inputs, keep)
        out.update(refit_solve_s=round(as_run, 3), gram_solve_s=round(from_gram, 3),
                   solve_gflop=round(solve_flops(s, keep, args.samples * args.calib_seqlen) / 1e9, 2),
                   gram_solve_gflop=round(solve_flops(s, keep, math.inf) / 1e9, 2))
    return out


@torch.no_grad()
def refit_seconds(stack: Stack, view, inputs, keep: float) -> tuple[float, float]:
    """refit_projection of o_proj and down_proj cut to their first ``keep`` columns, on the block's inputs over
    ``inputs``, with the zero output biases the default run adds: seconds for the two, the collection excluded;
    as the run keeps the inputs (rows below width + 1 tokens), and from their Grams (as more tokens would)."""
    stack.adapter.add_output_biases(view)
    grams, _ = collect_block_grams(view, inputs)
    times = [0.0, 0.0]
    for linear, held in ((view.o, grams.attn), (view.down, grams.ffn)):
        cols = torch.arange(round(keep * linear.in_features))
        for form in range(2):
            if form:
                held.gram_sum, held.rows = held.gram(), None
            cut = nn.Linear(cols.numel(), linear.out_features, dtype=linear.weight.dtype)
            cut.weight.copy_(linear.weight[:, cols])
            cut.bias.copy_(linear.bias)
            start = time.perf_counter()
            refit_projection(cut, Projection.of(linear), cols, held)
            times[form] += time.perf_counter() - start
    return times[0], times[1]


# --- the prune runs --------------------------------------------------------------------------------------


def prune_args(s: Shape, args: argparse.Namespace) -> SimpleNamespace:
    """What offload_memory's synthesize and run_prune read."""
    return SimpleNamespace(hidden=s.hidden, layers=s.layers, intermediate=s.intermediate, heads=s.heads,
                           kv_heads=s.kv_heads, vocab=s.vocab, tied=s.tied, dtype=args.dtype, method=args.method,
                           ratio=args.ratio, samples=args.samples, calib_seqlen=args.calib_seqlen,
                           calibration=args.calibration)


def base_row(name: str, mode: str, args: argparse.Namespace) -> dict:
    s = ALL_SHAPES[name]
    return {"shape": name, "model": s.model, "mode": mode, "params_b": round(s.parameters() / 1e9, 3),
            "layers": s.layers, "block_params_m": round(s.block_params() / 1e6, 3), "hidden": s.hidden,
            "intermediate": s.intermediate, "heads": s.heads, "kv_heads": s.kv_heads, "vocab": s.vocab,
            "tied": s.tied, "dtype": args.dtype, "method": args.method, "ratio": args.ratio,
            "calibration": args.calibration, "samples": args.samples, "calib_seqlen": args.calib_seqlen,
            "threads": args.threads}


def prune_row(name: str, mode: str, work: Path, args: argparse.Namespace) -> dict:
    """One prune run of shape ``name`` (``mode``: offload or in_memory) and what it measured."""
    s = SHAPES[name]
    run = run_prune(work / "model", work / mode, prune_args(s, args), offload=mode == "offload")
    phases, checkpoint = run["phases"], folder_size(work / "model")
    per_block = {f"{k}_s_per_block": round(phases[k]["wall_s"] / s.layers, 3) for k in PRUNE_PHASES if k in phases}
    prune_s = sum(phases[k]["wall_s"] for k in PRUNE_PHASES if k in phases) / s.layers
    peak = run["peak_rss_mb"]
    return {**base_row(name, mode, args), "checkpoint_gb": round(checkpoint / 1e9, 3), "wall_s": run["wall_s"],
            "peak_rss_mb": peak, "rss_per_checkpoint": round(peak * 2 ** 20 / checkpoint, 3),
            **per_block, "prune_s_per_block": round(prune_s, 3), "phases": phases, "parameters": run["parameters"]}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def in_memory_skip(rows: list[dict], checkpoint: int) -> str | None:
    """Why the in-memory run would not fit, or None: its peak estimated at the peak / checkpoint of the largest
    in-memory run so far (smaller ones are dominated by the process itself), else IN_MEMORY_RATIO."""
    done = [r for r in rows if r["mode"] == "in_memory" and r.get("rss_per_checkpoint")]
    ratio = max(done, key=lambda r: r["checkpoint_gb"])["rss_per_checkpoint"] if done else IN_MEMORY_RATIO
    estimate, free = ratio * checkpoint, 0.9 * available_bytes()
    if estimate <= free:
        return None
    return (f"skipped: peak estimated at {ratio:.2f} x the {checkpoint / 1e9:.1f} GB checkpoint = {estimate / 1e9:.1f}"
            f" GB, over 90% of the {free / 0.9 / 1e9:.1f} GB available")


def find(rows: list[dict], name: str, mode: str) -> dict | None:
    return next((r for r in rows if r["shape"] == name and r["mode"] == mode), None)


def run_shape(name: str, args: argparse.Namespace, rows: list[dict], save) -> None:
    """The runs of shape ``name`` not in ``rows`` yet, then its block timings, then whether the two outputs
    are equal; ``save()`` after each step. The shape's work folder goes unless ``--keep``."""
    work = args.work / name
    todo = [m for m in MODES if find(rows, name, m) is None]
    if todo and not (work / "model" / "config.json").is_file():
        synthesize(work / "model", prune_args(SHAPES[name], args))
    for mode in todo:
        skip = in_memory_skip(rows, folder_size(work / "model")) if mode == "in_memory" else None
        rows.append({**base_row(name, mode, args), "note": skip} if skip else prune_row(name, mode, work, args))
        save()
    shape_rows = [r for r in rows if r["shape"] == name]
    if any("block_forward_s" not in r for r in shape_rows):
        timed = next((r for r in shape_rows if "block_forward_s" in r), None)  # a resumed shape keeps its timings
        block = {k: timed[k] for k in BLOCK_FIELDS if k in timed} if timed else measure_block(SHAPES[name], args)
        for r in shape_rows:
            r.update(block)
            if r.get("prune_s_per_block"):
                r["prune_per_forward"] = round(r["prune_s_per_block"] / r["block_forward_s"], 2)
        save()
    if all((work / m / "llm_bip_summary.json").is_file() for m in MODES) and "equal" not in shape_rows[0]:
        equal = compare_outputs(work / "in_memory", work / "offload")
        same = equal["same_names"] and not equal["differing"] and equal["config_equal"]
        for r in shape_rows:
            r["equal"] = "yes" if same else f"no ({len(equal['differing'])} tensors differ)"
        save()
    if not args.keep and work.is_dir():
        shutil.rmtree(work)


def time_large_blocks(args: argparse.Namespace, rows: list[dict], save) -> None:
    """One 8B and one 70B block's forward over the calibration tokens (no solves: a 70B refit holds ~20 GB)."""
    for name, s in EXTRAPOLATED.items():
        if find(rows, name, "block") is None:
            rows.append({**base_row(name, "block", args), **measure_block(s, args, solve=False)})
            save()


# --- fit and extrapolation -------------------------------------------------------------------------------


def measured(rows: list[dict], mode: str) -> list[dict]:
    return [r for r in rows if r["mode"] == mode and r.get("prune_s_per_block") and r.get("block_forward_s")]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys on xs; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def time_fit(rows: list[dict], mode: str) -> dict | None:
    """prune s/block = c x forward s + solve s, c by least squares through 0; and the growth exponent
    alpha = d log(prune s/block) / d log(forward s) across shapes (alpha <= 1: grows no faster)."""
    pts = measured(rows, mode)
    if not pts:
        return None
    f = [r["block_forward_s"] for r in pts]
    rest = [r["prune_s_per_block"] - r.get("refit_solve_s", 0.0) for r in pts]
    c = sum(a * b for a, b in zip(f, rest)) / sum(a * a for a in f)
    alpha = slope([math.log(x) for x in f], [math.log(r["prune_s_per_block"]) for r in pts])
    return {"mode": mode, "c_forward": round(c, 3), "alpha": None if alpha is None else round(alpha, 3),
            "shapes": [r["shape"] for r in pts],
            "residuals_s": [round(r["prune_s_per_block"] - c * a - r.get("refit_solve_s", 0.0), 3)
                            for r, a in zip(pts, f)]}


def cpu_rates(rows: list[dict]) -> dict:
    """This CPU's effective FLOP/s: block forwards (float32 or --dtype) and refit solves (float64) as the runs
    solved them and from the Grams, over the shapes timed here (sums, so the larger shapes weigh most)."""
    timed = {r["shape"]: r for r in rows if r.get("block_forward_s")}.values()
    solved = [r for r in timed if r.get("gram_solve_s")]

    def rate(flops: str, secs: str, among) -> float:
        return round(sum(r[flops] for r in among) / max(sum(r[secs] for r in among), 1e-9), 1)

    return {"forward_gflop_s": rate("forward_gflop", "block_forward_s", timed),
            "solve_gflop_s": rate("solve_gflop", "refit_solve_s", solved),
            "gram_solve_gflop_s": rate("gram_solve_gflop", "gram_solve_s", solved)}


def memory_fit(rows: list[dict], keep: float) -> dict | None:
    """Offloaded peak RSS = base + m x working_bytes, by least squares (m = 1 with one shape)."""
    pts = [(working_bytes(ALL_SHAPES[r["shape"]], r["samples"], r["calib_seqlen"], DTYPES[r["dtype"]].itemsize, keep),
            r["peak_rss_mb"] * 2 ** 20) for r in rows if r["mode"] == "offload" and r.get("peak_rss_mb")]
    if not pts:
        return None
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    m = slope(xs, ys) or 1.0
    base = statistics.fmean(ys) - m * statistics.fmean(xs)
    return {"base_mb": round(base / 2 ** 20), "per_working_byte": round(m, 3)}


def forward_seconds(rows: list[dict], name: str, samples: int, seqlen: int, rates: dict) -> tuple[float, str]:
    """A block forward of shape ``name`` over samples x seqlen tokens on this CPU: its own timing scaled by
    FLOPs where it was timed here, else FLOPs / the forward rate."""
    s, row = ALL_SHAPES[name], next((r for r in rows if r["shape"] == name and r.get("block_forward_s")), None)
    flops = forward_flops(s, samples, seqlen)
    if row is not None:
        return row["block_forward_s"] * flops / (row["forward_gflop"] * 1e9), "block timed here"
    return flops / (rates["forward_gflop_s"] * 1e9), "forward from FLOPs"


def cpu_estimate(rows: list[dict], name: str, samples: int, seqlen: int, fits: dict) -> dict:
    """Shape ``name`` pruned offloaded on this CPU: time from the offloaded fit, peak from the memory fit."""
    s, rates, keep, itemsize = ALL_SHAPES[name], fits["rates"], 1 - fits["ratio"], DTYPES[fits["dtype"]].itemsize
    fwd, basis = forward_seconds(rows, name, samples, seqlen, rates)
    rows_solve = samples * seqlen < round(keep * s.intermediate) + 1  # down_proj's refit from the rows
    solve_rate = rates["solve_gflop_s"] if rows_solve else rates["gram_solve_gflop_s"]
    solve = solve_flops(s, keep, samples * seqlen) / (solve_rate * 1e9)
    per_block = fits["time"]["c_forward"] * fwd + solve
    out = {"where": f"this CPU, offloaded, {fits['threads']} thread(s) (fit)", "per_block_s": round(per_block, 1),
           "total_h": round(s.layers * per_block / 3600, 2), "total_min": round(s.layers * per_block / 60, 1),
           "solve_share": round(solve / per_block, 2),
           "basis": f"{fits['time']['c_forward']} x forward ({basis}) + solve FLOPs / {solve_rate} GFLOP/s "
                    f"({'rows' if rows_solve else 'Gram'})"}
    if fits["memory"]:
        peak = fits["memory"]["base_mb"] * 2 ** 20 + fits["memory"]["per_working_byte"] * working_bytes(
            s, samples, seqlen, itemsize, keep)
        out.update(peak_gb=round(peak / 1e9, 1), peak_per_checkpoint=round(peak / (s.parameters() * itemsize), 3))
    return out


def gpu_estimate(name: str, samples: int, seqlen: int, ratio: float, gpus: int) -> dict:
    """Shape ``name`` in bfloat16 on ``gpus`` H100s from FLOPs and GPU_ASSUMED. One GPU: in memory where the
    model fits, else offloaded (each block read twice and written once). Eight: layers split into 8 contiguous
    stages, each pass pipelined with one calibration window per micro-batch, each GPU refitting its own blocks.
    peak_gb: one GPU's memory (its share of the model, or one block offloaded, plus the working set)."""
    s, a, keep = ALL_SHAPES[name], GPU_ASSUMED, 1 - ratio
    passes = 2 * forward_flops(s, samples, seqlen) / a["bf16"] + gram_flops(s, samples, seqlen) / a["fp32"]
    solve = solve_flops(s, keep, samples * seqlen) / a["fp64"]
    model_bytes, work = s.parameters() * 2, working_bytes(s, samples, seqlen, 2, keep)
    fits = model_bytes / gpus + work <= a["memory_bytes"]
    io = model_bytes / a["disk_bytes_s"]
    if not fits:
        io += s.layers * s.block_params() * 2 * (2 + keep) / a["disk_bytes_s"]
    pipeline = 1.0 if gpus == 1 else (samples + gpus - 1) / (gpus * samples)
    compute = s.layers * (passes * pipeline + solve / gpus)
    held = model_bytes / gpus if fits else s.block_params() * 2
    return {"where": f"{gpus} x H100, {'in memory' if fits else 'offloaded'} (FLOP-bound estimate)",
            "per_block_s": round(compute / s.layers, 3), "total_min": round((compute + io) / 60, 2),
            "total_h": round((compute + io) / 3600, 3), "solve_share": round(s.layers * solve / gpus / compute, 2),
            "peak_gb": round((held + work) / 1e9, 1),
            "basis": f"FLOPs / assumed rates; disk {a['disk_bytes_s'] / 1e9:g} GB/s: {io:.0f} s"}


def extrapolate(rows: list[dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The extrapolation rows (8B and 70B, both calibrations, CPU / 1 GPU / 8 GPUs) and the fits behind them."""
    fits = {"time": time_fit(rows, "offload"), "memory": memory_fit(rows, 1 - args.ratio), "rates": cpu_rates(rows),
            "ratio": args.ratio, "dtype": args.dtype, "threads": args.threads}
    out = []
    for name in EXTRAPOLATED:
        for samples, seqlen in ((args.samples, args.calib_seqlen), (DEFAULTS.n_samples, DEFAULTS.seqlen)):
            head = {"model": ALL_SHAPES[name].model, "calibration": f"{samples} x {seqlen}"}
            if fits["time"]:
                out.append({**head, **cpu_estimate(rows, name, samples, seqlen, fits)})
            out += [{**head, **gpu_estimate(name, samples, seqlen, args.ratio, g)} for g in (1, GPU_COUNT)]
    fits["time_in_memory"] = time_fit(rows, "in_memory")
    return out, fits


def notes(rows: list[dict], fits: dict) -> list[str]:
    """The fits, the goals, and the GPU assumptions, as markdown list items."""
    lines = [f"CPU effective rates (timed blocks): forward {fits['rates']['forward_gflop_s']} GFLOP/s, "
             f"refit solves {fits['rates']['solve_gflop_s']} GFLOP/s as run (float64), "
             f"{fits['rates']['gram_solve_gflop_s']} GFLOP/s from the Grams."]
    for mode in MODES:
        fit = time_fit(rows, mode)
        if fit:
            lines.append(f"Fit, {mode}: prune s/block = {fit['c_forward']} x block forward s + refit solve s "
                         f"(shapes {', '.join(fit['shapes'])}; residuals {fit['residuals_s']} s); growth exponent "
                         f"of prune time against forward time: {fit['alpha']} (goal: <= 1).")
    if fits["memory"]:
        lines.append(f"Memory fit, offload: peak RSS = {fits['memory']['base_mb']} MB + "
                     f"{fits['memory']['per_working_byte']} x working bytes (scaling.working_bytes).")
    three = find(rows, "3b", "offload")
    if three and three.get("rss_per_checkpoint"):
        lines.append(f"Goal, offloaded peak at 3B <= 0.25 x checkpoint: {three['rss_per_checkpoint']} "
                     f"({'met' if three['rss_per_checkpoint'] <= 0.25 else 'not met'}).")
    rates = ", ".join(f"{kind} {GPU_ASSUMED[kind] / 1e12:.0f} TFLOP/s ({share:.0%} of {GPU_PEAKS[kind] / 1e12:.0f})"
                      for kind, share in GPU_SHARES.items())
    lines += [f"GPU rows are estimates, not measurements: FLOPs / assumed achieved rates ({rates}; peaks from the "
              f"H100 SXM5 datasheet), {GPU_ASSUMED['memory_bytes'] / 1e9:.0f} GB per GPU, checkpoint and offloaded "
              f"blocks at {GPU_ASSUMED['disk_bytes_s'] / 1e9:g} GB/s. FLOP-bound: no Python, hook or transfer "
              "overhead, so a lower bound on time; peak_gb there is one GPU's memory.",
              "llm-bip prunes on one device: the 8-GPU rows assume a layer split into 8 stages, each pass "
              "pipelined one calibration window at a time, each GPU refitting its own blocks."]
    return lines


# --- output and main -------------------------------------------------------------------------------------

COLUMNS = ["shape", "mode", "params_b", "layers", "block_params_m", "checkpoint_gb", "wall_s", "peak_rss_mb",
           "rss_per_checkpoint", "scoring_s_per_block", "reconstruction_s_per_block", "surgery_s_per_block",
           "prune_s_per_block", "block_forward_s", "refit_solve_s", "prune_per_forward", "equal", "note"]
EXTRAPOLATION_COLUMNS = ["model", "calibration", "where", "per_block_s", "total_min", "total_h", "solve_share",
                         "peak_gb", "peak_per_checkpoint", "basis"]


def load_rows(folder: Path) -> list[dict]:
    path = folder / "scaling.json"
    return json.loads(path.read_text()) if path.is_file() else []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = args.work / "results" if args.dry_run else bench_results.RESULTS  # a dry run leaves bench/results be
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the prune processes'
    rows = load_rows(folder)

    def save() -> None:
        write_rows("scaling", rows, COLUMNS, folder)

    for name in args.shapes:
        run_shape(name, args, rows, save)
    if args.large_blocks:
        time_large_blocks(args, rows, save)
    print(write_rows("scaling", rows, COLUMNS, folder))
    extrapolation, fits = extrapolate(rows, args)
    table = write_rows("scaling_extrapolation", extrapolation, EXTRAPOLATION_COLUMNS, folder)
    (folder / "scaling_fit.json").write_text(json.dumps({**fits, "gpu_assumed": GPU_ASSUMED}, indent=1) + "\n")
    text = "\n".join([table, "", *(f"- {line}" for line in notes(rows, fits))]) + "\n"
    (folder / "scaling_extrapolation.md").write_text(text)
    print(text)
    print(f"results in {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
