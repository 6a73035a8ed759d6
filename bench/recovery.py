"""Recovery benchmark (issue 21): the default 20% and 50% SmolLM2 models recovered by `finetune` (LM loss) and
`distill` variants at equal training-token budgets, beside the references: the dense model (the teacher) and
the dense model trained the same way. Each row trains on `warpeace` train (never evaluated), records
perplexity on slices of the valid splits (PTB, warpeace: where defaults are chosen) and of the test splits
(PTB, sherlock) at the `--curve` steps, and at the end the whole test splits, the mean KL to the teacher and
top-1 agreement, the training wall time and peak memory. Rows run one after another; a finished row is kept.

    python bench/recovery.py RUNS kd-lora-20 "kd-lora-20:lm_weight=1" lm-lora-20 ... [--steps 480] [--curve 100,240]
        [--whole]
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

from bench_results import RESULTS
from transformers import TrainerCallback

from llm_bip.evaluation import agreement, perplexity
from llm_bip.loading import load_model
from llm_bip.logs import console_output
from llm_bip.recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune
from llm_bip.tables import markdown_table

SLICE_TOKENS = 16384
VALID = (("ptb", "valid"), ("warpeace", "valid"))
TEST = (("ptb", "test"), ("sherlock", "test"))
RESULTS_FILE = RESULTS / "recovery.json"
COMMON = dict(data="warpeace", batch_size=4, seqlen=256, eval="none")
LM = FinetuneConfig(**COMMON)
KD = DistillConfig(**COMMON)
# name -> (command, model: "dense" or a pruned ratio, config); a row may override config fields: "kd-lora-20:lr=3e-3"
ROWS = {
    "dense": ("none", "dense", None),
    "none-20": ("none", "20", None),
    "none-50": ("none", "50", None),
    "lm-lora-dense": ("finetune", "dense", LM),
    "lm-lora-20": ("finetune", "20", LM),
    "lm-lora-50": ("finetune", "50", LM),
    "kd-lora-20": ("distill", "20", replace(KD, full=False)),
    "kd-lora-50": ("distill", "50", replace(KD, full=False)),
    "kd-full-20": ("distill", "20", replace(KD, full=True, lr=1e-4)),
    "kd-full-50": ("distill", "50", replace(KD, full=True, lr=1e-4)),
    "kd-default-20": ("distill", "20", KD),  # distill's defaults as shipped
    "kd-default-50": ("distill", "50", KD),
    # the first learning-rate round (100 steps), under its names of then
    **{f"tune-lm-lora-{lr}": ("finetune", "20", replace(LM, lr=float(lr))) for lr in ("2e-4", "1e-3")},
    **{f"tune-kd-lora-{lr}": ("distill", "20", replace(KD, full=False, lr=float(lr)))
       for lr in ("3e-4", "1e-3", "3e-3")},
    **{f"tune-kd-full-{lr}": ("distill", "20", replace(KD, full=True, lr=float(lr)))
       for lr in ("3e-5", "1e-4", "3e-4")},
    "tune-kd-lora-t2": ("distill", "20", replace(KD, full=False, temperature=2.0)),
}


def parse_row(spec: str) -> tuple[str, str, object]:
    """(command, model, config) of "NAME[:field=value,...]"."""
    name, _, overrides = spec.partition(":")
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    command, model, config = ROWS[name]
    fields = dict(item.split("=", 1) for item in overrides.split(",") if item)
    if fields and config is None:
        raise SystemExit(f"{name} trains nothing; it takes no options")
    if not fields:
        return command, model, config
    return command, model, replace(config, **{k: field_value(getattr(config, k), v) for k, v in fields.items()})


def field_value(default, text: str):
    """``text`` as the type of the field's default; a field that defaults to None takes a number or a string."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if default is not None:
        return type(default)(text)
    try:
        return float(text)
    except ValueError:
        return text


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


def row_key(spec: str, steps: int) -> str:
    """The results file's key of a row: its spec, and for a trained row the steps."""
    return spec if ROWS[spec.partition(":")[0]][0] == "none" else f"{spec}@{steps}"


def run_row(spec: str, runs: Path, steps: int, curve: set[int], whole: bool, teacher, teacher_tokenizer) -> dict:
    command, model, config = parse_row(spec)
    source = model_path(runs, model)
    record = {"row": spec, "command": command, "model": model}
    if command == "none":
        student, tokenizer = load_model(source)
        return {**record, "key": row_key(spec, steps), "final": final_measures(student, tokenizer, teacher, whole)}
    config = replace(config, max_steps=steps)
    if isinstance(config, DistillConfig) and config.teacher_cache is not None:
        config = replace(config, teacher_cache=str(runs / config.teacher_cache))
    out = runs / "rows" / row_key(spec, steps)
    points = Curve({s for s in curve if s < steps}, teacher_tokenizer)
    job = run_finetune if command == "finetune" else run_distill
    with console_output():
        summary = job(source, out, config, overwrite=True, callbacks=[points])[command]
    student, tokenizer = load_model(str(out))
    train = summary["phases"]["train"]
    return {**record, "key": row_key(spec, steps), "config": summary["config"], "steps": summary["steps"],
            "training_tokens": summary["training_tokens"], "train_wall_s": round(train["wall_s"] - points.seconds, 1),
            "train_peak_rss_mb": train["peak_rss_mb"], "phases": summary["phases"],
            "last_loss": summary["loss_history"][-1], "curve": points.points,
            "final": final_measures(student, tokenizer, teacher, whole)}


def load_results() -> dict[str, dict]:
    records = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else []
    return {r.get("key", r["row"]): r for r in records}


def save_results(results: dict[str, dict]) -> None:
    RESULTS_FILE.write_text(json.dumps(list(results.values()), indent=1) + "\n")


def learning_rate(record: dict) -> float | None:
    return record.get("learning_rate", record.get("config", {}).get("lr"))


def reference(record: dict, results: dict[str, dict]) -> str | None:
    """The row a recovered model is measured against: the teacher for distillation; for the LM loss, the dense
    model trained the same way (same steps and learning rate), so that adaptation to the text is not counted."""
    if record["command"] == "distill" or (record["command"] == "none" and record["model"] != "dense"):
        return "dense"
    if record["command"] == "finetune" and record["model"] != "dense":
        return next((k for k, r in results.items() if r["command"] == "finetune" and r["model"] == "dense"
                     and r.get("steps") == record.get("steps") and learning_rate(r) == learning_rate(record)), None)
    return None


def measure(record: dict, text: str) -> tuple[float | None, str]:
    """A test text's perplexity: the whole split where measured, else the slice."""
    final = record["final"]
    return (final[f"{text} whole"], "whole") if f"{text} whole" in final else (final.get(text), "slice")


def table(results: dict[str, dict], keys: list[str]) -> str:
    """One row per key: budget, time, valid slices, test perplexities and their multiple of the reference
    (both whole splits, else both slices), closeness to the teacher."""
    columns = ["row", "tokens", "train min", "ptb valid", "warpeace valid", "reference", "ptb test", "x ref",
               "sherlock test", "x ref ", "KL ptb", "KL sherlock", "top-1 ptb", "top-1 sherlock"]
    rows = []
    for key in keys:
        record, ref = results[key], reference(results[key], results)
        row = [key, record.get("training_tokens"), record["train_wall_s"] / 60 if "train_wall_s" in record else None,
               record["final"]["ptb/valid"], record["final"]["warpeace/valid"], ref]
        for text in ("ptb/test", "sherlock/test"):
            value, kind = measure(record, text)
            ref_value, ref_kind = measure(results[ref], text) if ref in results else (None, kind)
            if ref_kind != kind:  # compare like with like: both slices
                value, ref_value = record["final"].get(text), results[ref]["final"].get(text)
            row += [value, value / ref_value if value and ref_value else None]
        final = record["final"]
        row += [final.get("kl ptb/test"), final.get("kl sherlock/test"), final.get("top1 ptb/test"),
                final.get("top1 sherlock/test")]
        rows.append(row)
    return markdown_table(columns, [[f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v) for v in row]
                                    for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("rows", nargs="*", metavar="ROW",
                        help=f"NAME[:field=value,...]; names: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=480, help="training steps of each row (4 x 256 tokens each)")
    parser.add_argument("--curve", default="", help="earlier steps at which to measure the slices during training")
    parser.add_argument("--whole", action="store_true", help="also measure the whole test splits at the end")
    parser.add_argument("--rerun", action="store_true", help="measure rows again that the results file holds")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_intermixed_args()
    results = load_results()
    if args.table:
        print(table(results, list(results)))
        return
    for spec in args.rows:
        parse_row(spec)  # a bad row fails before any work
    teacher, tokenizer = load_model("smollm2")
    curve = {int(s) for s in args.curve.split(",") if s}
    for spec in args.rows:
        key = row_key(spec, args.steps)
        if key in results and not args.rerun:
            continue
        start = time.perf_counter()
        results[key] = {**run_row(spec, args.runs, args.steps, curve, args.whole, teacher, tokenizer),
                        "row_wall_s": round(time.perf_counter() - start, 1)}
        save_results(results)
        print(f"{key}: {results[key]['final']}", flush=True)
    (RESULTS / "recovery.md").write_text(table(results, list(results)) + "\n")


if __name__ == "__main__":
    main()
