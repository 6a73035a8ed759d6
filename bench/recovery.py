"""Recovery benchmark (issue 21): the default 20% and 50% SmolLM2 models recovered by `finetune` (LM loss) and
`distill` variants at equal training-token budgets, beside the references: the dense model (the teacher) and
the dense model trained the same way. Each row trains on `warpeace` train (never evaluated), records
perplexity on slices of the valid splits (PTB, warpeace: where defaults are chosen) and of the test splits
(PTB, sherlock) at the `--curve` steps, and at the end the whole test splits, the mean KL to the teacher and
top-1 agreement, the training wall time and peak memory. Rows run one after another; a finished row is kept.

    python bench/recovery.py RUNS kd-lora-20 lm-lora-20 ... [--curve 60,240] [--whole]
    python bench/recovery.py RUNS --table      # the markdown tables of every row measured so far

RUNS holds bip-20 and bip-50 (`llm-bip prune --ratio 0.2 --out RUNS/bip-20 --eval none`, then
`llm-bip prune --scores RUNS/bip-20 --ratio 0.5 --out RUNS/bip-50 --eval none`). Results:
bench/results/recovery.json (every field), recovery.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

from bench_results import RESULTS
from llm_bip.checkpoint import load_model
from llm_bip.evaluation import agreement, perplexity
from llm_bip.recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune
from llm_bip.tables import markdown_table

SLICE_TOKENS = 16384
VALID = (("ptb", "valid"), ("warpeace", "valid"))
TEST = (("ptb", "test"), ("sherlock", "test"))
RESULTS_FILE = RESULTS / "recovery.json"
COMMON = dict(data="warpeace", batch_size=4, seqlen=256, eval="none")
LM = FinetuneConfig(**COMMON, lr=1e-3)
KD = DistillConfig(**COMMON)
# name -> (command, model: "dense" or a pruned ratio, config)
ROWS = {
    "dense": ("none", "dense", None),
    "none-20": ("none", "20", None),
    "none-50": ("none", "50", None),
    "lm-lora-dense": ("finetune", "dense", LM),
    "lm-lora-20": ("finetune", "20", LM),
    "lm-lora-50": ("finetune", "50", LM),
    "kd-lora-20": ("distill", "20", KD),
    "kd-lora-50": ("distill", "50", KD),
    "kd-full-20": ("distill", "20", replace(KD, full=True, lr=1e-4)),
    "kd-full-50": ("distill", "50", replace(KD, full=True, lr=1e-4)),
    "kd-lm-20": ("distill", "20", replace(KD, lm_weight=1.0)),
    "kd-hidden-20": ("distill", "20", replace(KD, hidden_weight=1.0)),
    "kd-self-20": ("distill", "20", replace(KD, data="self")),
    "kd-cache-20": ("distill", "20", replace(KD, teacher_cache="teacher-cache")),
    # learning rates, chosen on the valid slices at 100 steps
    **{f"tune-lm-lora-{lr}": ("finetune", "20", replace(LM, lr=float(lr))) for lr in ("2e-4", "1e-3")},
    **{f"tune-kd-lora-{lr}": ("distill", "20", replace(KD, lr=float(lr))) for lr in ("3e-4", "1e-3", "3e-3")},
    **{f"tune-kd-full-{lr}": ("distill", "20", replace(KD, full=True, lr=float(lr)))
       for lr in ("3e-5", "1e-4", "3e-4")},
    "tune-kd-lora-t2": ("distill", "20", replace(KD, temperature=2.0)),
}


def model_path(runs: Path, model: str) -> str:
    return "smollm2" if model == "dense" else str(runs / f"bip-{model}")


def slices(model, tokenizer, texts) -> dict[str, float]:
    return {f"{d}/{s}": perplexity(model, tokenizer, d, s, 128, SLICE_TOKENS, progress=False).ppl for d, s in texts}


def final_measures(model, tokenizer, teacher, whole: bool) -> dict[str, float]:
    """Valid and test slices, KL and top-1 agreement on the test slices, and (``whole``) the whole test splits."""
    found = slices(model, tokenizer, VALID + TEST)
    for d, s in TEST:
        a = agreement(model, teacher, tokenizer, d, s, 128, SLICE_TOKENS, progress=False)
        found.update({f"kl {d}/{s}": a.kl, f"top1 {d}/{s}": a.top1})
        if whole:
            found[f"{d}/{s} whole"] = perplexity(model, tokenizer, d, s, 128, None, progress=False, cache=True).ppl
    return found


class Curve(TrainerCallback):
    """Perplexity on the valid and test slices at chosen steps, in the training process; its time is kept
    apart from the training's."""

    def __init__(self, steps: set[int], tokenizer):
        self.steps, self.tokenizer, self.points, self.seconds = steps, tokenizer, {}, 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            start = time.perf_counter()
            model.eval()
            self.points[state.global_step] = slices(model, self.tokenizer, VALID + TEST)
            model.train()
            self.seconds += time.perf_counter() - start
            print(f"step {state.global_step}: {self.points[state.global_step]}", flush=True)


def run_row(name: str, runs: Path, curve: set[int], whole: bool, teacher, teacher_tokenizer) -> dict:
    command, model, config = ROWS[name]
    source = model_path(runs, model)
    record = {"row": name, "command": command, "model": model}
    if command == "none":
        student, tokenizer = load_model(source)
        return {**record, "final": final_measures(student, tokenizer, teacher, whole)}
    max_steps = 100 if name.startswith("tune-") else max(curve) if curve else 480
    config = replace(config, max_steps=max_steps)
    if config.teacher_cache is not None and isinstance(config, DistillConfig):
        config = replace(config, teacher_cache=str(runs / config.teacher_cache))
    out = runs / "rows" / name
    points = Curve({s for s in curve if s < max_steps}, teacher_tokenizer)
    job = run_finetune if command == "finetune" else run_distill
    summary = job(source, out, config, overwrite=True, callbacks=[points], echo=print)[command]
    student, tokenizer = load_model(str(out))
    train = summary["phases"]["train"]
    return {**record, "config": summary["config"], "steps": summary["steps"],
            "training_tokens": summary["training_tokens"], "train_wall_s": round(train["wall_s"] - points.seconds, 1),
            "train_peak_rss_mb": train["peak_rss_mb"], "phases": summary["phases"],
            "last_loss": summary["loss_history"][-1], "curve": points.points,
            "final": final_measures(student, tokenizer, teacher, whole and not name.startswith("tune-"))}


def load_results() -> dict[str, dict]:
    return {r["row"]: r for r in json.loads(RESULTS_FILE.read_text())} if RESULTS_FILE.is_file() else {}


def save_results(results: dict[str, dict]) -> None:
    RESULTS_FILE.write_text(json.dumps(list(results.values()), indent=1) + "\n")


def table(results: dict[str, dict]) -> str:
    columns = ["row", "steps", "training_tokens", "train_wall_s", "ptb/valid", "warpeace/valid", "ptb/test",
               "sherlock/test", "ptb/test whole", "sherlock/test whole", "kl ptb/test", "top1 ptb/test",
               "kl sherlock/test", "top1 sherlock/test"]
    rows = [[r.get(c, r["final"].get(c)) for c in columns] for r in results.values()]
    return markdown_table(columns, [[f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v) for v in row]
                                    for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("rows", nargs="*", metavar="ROW", help=f"rows to measure: {', '.join(ROWS)}")
    parser.add_argument("--curve", default="", help="steps at which to measure the slices during training; the "
                        "largest is the run's length (default 480)")
    parser.add_argument("--whole", action="store_true", help="also measure the whole test splits at the end")
    parser.add_argument("--rerun", action="store_true", help="measure rows again that the results file holds")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    results = load_results()
    if args.table:
        print(table(results))
        return
    teacher, tokenizer = load_model("smollm2")
    curve = {int(s) for s in args.curve.split(",") if s}
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)}")
    for name in args.rows:
        if name in results and not args.rerun:
            continue
        start = time.perf_counter()
        results[name] = {**run_row(name, args.runs, curve, args.whole, teacher, tokenizer),
                         "row_wall_s": round(time.perf_counter() - start, 1)}
        save_results(results)
        print(f"{name}: {results[name]['final']}", flush=True)
    (RESULTS / "recovery.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
