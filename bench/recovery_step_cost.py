"""What a recovery step costs (issue 21): seconds per training step and peak memory of `finetune` (the LM loss),
`distill` with the teacher online, and `distill` from a `--teacher-cache`, at the same shape (batch x seqlen),
LoRA and `--full`; each mode in a fresh process, the modes interleaved over several rounds so that a slow spell
of the machine hits all of them; medians and ratios to `finetune` side by side.

    python bench/recovery_step_cost.py RUNS/bip-20 [--steps 6] [--rounds 3]

Results: bench/results/recovery_step_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_results import write_rows
from transformers import TrainerCallback

from llm_bip.loading import load_model
from llm_bip.recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune

SHAPE = dict(data="warpeace", batch_size=4, seqlen=256, eval="none", save_steps=10_000)
MODES = {
    "finetune LoRA": ("finetune", {}),
    "distill LoRA, teacher online": ("distill", {}),
    "distill LoRA, teacher cache": ("distill", {"teacher_cache": "CACHE"}),
    "finetune full": ("finetune", {"full": True}),
    "distill full, teacher online": ("distill", {"full": True}),
    "distill full, teacher cache": ("distill", {"full": True, "teacher_cache": "CACHE"}),
}


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def measure_one(student: str, mode: str, steps: int, cache: str) -> dict:
    """One mode in this process: ``steps`` timed steps after one untimed; the train phase's peak memory."""
    command, options = MODES[mode]
    options = {k: cache if v == "CACHE" else v for k, v in options.items()}
    config_type, job = (FinetuneConfig, run_finetune) if command == "finetune" else (DistillConfig, run_distill)
    config = config_type(**SHAPE, **options, max_steps=steps + 1)
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        section = job(student, Path(out) / "model", config, callbacks=[times])[command]
    return {"step_s": statistics.median(times.times[1:]),
            "train_peak_rss_mb": section["phases"]["train"]["peak_rss_mb"]}


def weights_mb(source: str) -> float:
    model = load_model(source)[0]
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single mode, in a child process
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.student, args.one, args.steps, args.cache)))
        return
    found = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as work:
        cache = str(Path(work) / "cache")
        measure_one(args.student, "distill LoRA, teacher cache", args.steps, cache)  # builds the cache once
        for _ in range(args.rounds):
            for mode in MODES:
                child = subprocess.run([sys.executable, __file__, args.student, "--one", mode, "--steps",
                                        str(args.steps), "--cache", cache], capture_output=True, text=True, check=True)
                found[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = {kind: statistics.median(r["step_s"] for r in found[f"finetune {kind}"]) for kind in ("LoRA", "full")}
    rows = []
    for mode, runs in found.items():
        step = statistics.median(r["step_s"] for r in runs)
        rows.append({"mode": mode, "step_s": step, "step_s_min": min(r["step_s"] for r in runs),
                     "step_s_max": max(r["step_s"] for r in runs),
                     "vs_finetune": step / base["full" if "full" in mode else "LoRA"],
                     "train_peak_rss_mb": max(r["train_peak_rss_mb"] for r in runs)})
    print(f"student weights {weights_mb(args.student):.0f} MB, teacher weights {weights_mb('smollm2'):.0f} MB")
    print(write_rows("recovery_step_cost", rows, ["mode", "step_s", "step_s_min", "step_s_max", "vs_finetune",
                                                  "train_peak_rss_mb"]))


if __name__ == "__main__":
    main()
