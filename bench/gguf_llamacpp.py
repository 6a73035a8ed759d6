"""Dense vs pruned SmolLM2 served by llama.cpp, side by side in one run: GGUF file size, prompt processing
(tokens/s over a 512-token prompt), generation (tokens/s, one token per step), PTB test perplexity from
llama.cpp's logits next to PyTorch's float32 one on the same windows, and the MAC ratios (dense over
pruned) that bound the speedups. Results:
``bench/results/gguf_llamacpp.{json,md}``.

The pruned models are the default ``bip`` (per-layer widths: llama.cpp's deci layout) and its uniform
allocation (the llama layout), at 20% and 50%, with ``--round-to 32`` so that every row fits a
quantization block; the 50% and uniform ones are cut from the first run's scores. They are written
into WORK and reused when present.

    python bench/gguf_llamacpp.py /tmp/gguf-bench --types f16,q8_0,q4_k_m --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import ExitStack
from pathlib import Path

from llm_bip import PruneConfig, load_model, perplexity
from llm_bip.gguf_export import run_export
from llm_bip.job import run_prune
from llm_bip.llamacpp import generation_seconds, gguf_perplexity, open_gguf, prompt_seconds
from llm_bip.outputs import SCORES_FILE
from llm_bip.speed_macs import decode_context, macs_per_token, prefill_context
from llm_bip.tables import markdown_table

RESULTS = Path(__file__).parent / "results"
PROMPT = 512
GENERATED = 64


def pruned_models(work: Path) -> dict[str, str]:
    """name -> model source: the dense default and the four pruned folders (made when missing)."""
    models = {"dense": "smollm2"}
    first = work / "bip-0.2"
    for name, ratio, allocation in (("bip-0.2", 0.2, None), ("bip-0.5", 0.5, None),
                                    ("uniform-0.2", 0.2, "uniform"), ("uniform-0.5", 0.5, "uniform")):
        folder = work / name
        if not folder.is_dir():
            scores = None if folder == first else first / SCORES_FILE
            config = PruneConfig(ratio=ratio, allocation=allocation, round_to=32)
            run_prune("smollm2", folder, config, scores=scores, eval_dataset="none")
        models[name] = str(folder)
    return models


def mac_counts(model) -> dict[str, float]:
    """MACs per token of llama.cpp's work: a prompt computes the LM head for its last token only (so it is
    left out); a generated token goes through the LM head."""
    prompt = macs_per_token(model, prefill_context(PROMPT))
    generation = macs_per_token(model, decode_context(16, GENERATED))
    return {"prompt_macs_per_token": prompt["total"] - prompt["lm_head"],
            "generation_macs_per_token": generation["total"]}


def rate(tokens: int, seconds: list[float]) -> dict:
    """Tokens/s of the median run, and of the slowest and fastest."""
    return {"median": tokens / statistics.median(seconds), "min": tokens / max(seconds), "max": tokens / min(seconds)}


def measure(paths: dict[str, Path], threads: int, repeats: int, flash_attn: bool) -> dict[str, dict]:
    """Prompt-processing and generation tokens/s of each model, all loaded at once and timed in turn in each
    of ``repeats`` rounds (after one warm-up round), so that a slow spell of the machine hits every model."""
    prompt = [(17 * i) % 49152 for i in range(PROMPT)]
    timings = {name: {"prompt": [], "generation": []} for name in paths}
    with ExitStack() as stack:
        models = {name: stack.enter_context(open_gguf(path, context=PROMPT + GENERATED, logits_all=False,
                                                       threads=threads, flash_attn=flash_attn))
                  for name, path in paths.items()}
        for round_ in range(repeats + 1):
            for name, model in models.items():
                pp = prompt_seconds(model, prompt)
                tg = generation_seconds(model, prompt[:16], prompt[16:16 + GENERATED])
                if round_:
                    timings[name]["prompt"].append(pp)
                    timings[name]["generation"].append(tg)
    return {name: {"prompt_tokens_per_s": rate(PROMPT, t["prompt"]),
                   "generation_tokens_per_s": rate(GENERATED, t["generation"])} for name, t in timings.items()}


def bench(work: Path, types: list[str], threads: int, repeats: int, max_tokens: int | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = pruned_models(work)
    rows = {}
    for name, source in models.items():
        model, tokenizer = load_model(source)
        macs = mac_counts(model)
        pytorch_ppl = perplexity(model, tokenizer, "ptb", "test", 128, max_tokens, progress=False, cache=True).ppl
        del model
        for file_type in types:
            path = work / f"{name}-{file_type}.gguf"
            if not path.is_file():
                run_export(source, path, file_type)
            ppl = gguf_perplexity(path, tokenizer, "ptb", "test", 128, max_tokens, threads).ppl
            rows[name, file_type] = {"model": name, "type": file_type, "bytes": path.stat().st_size, **macs,
                                     "pytorch_f32_ppl": pytorch_ppl, "ptb_test_ppl": ppl}
            print(json.dumps(rows[name, file_type]), flush=True)
    for file_type in types:
        for flash_attn in (False, True):
            paths = {name: work / f"{name}-{file_type}.gguf" for name in models}
            for name, speed in measure(paths, threads, repeats, flash_attn).items():
                rows[name, file_type]["flash_attn" if flash_attn else "plain"] = speed
    add_ratios(list(rows.values()))
    return {"threads": threads, "repeats": repeats, "prompt_tokens": PROMPT, "generated_tokens": GENERATED,
            "ppl": {"dataset": "ptb", "split": "test", "seqlen": 128, "max_tokens": max_tokens},
            "rows": list(rows.values())}


def add_ratios(rows: list[dict]) -> None:
    """Speedups over the dense model of the same type, and the MAC ratios that bound them."""
    dense = {row["type"]: row for row in rows if row["model"] == "dense"}
    for row in rows:
        base = dense[row["type"]]
        for kind in ("prompt", "generation"):
            row[f"{kind}_mac_ratio"] = base[f"{kind}_macs_per_token"] / row[f"{kind}_macs_per_token"]
            for key in ("plain", "flash_attn"):
                row[key][f"{kind}_speedup"] = (row[key][f"{kind}_tokens_per_s"]["median"]
                                               / base[key][f"{kind}_tokens_per_s"]["median"])
        row["best_prompt_speedup"] = best_prompt_rate(row) / best_prompt_rate(base)
        row["prompt_speedup_of_ceiling"] = row["best_prompt_speedup"] / row["prompt_mac_ratio"]


def best_prompt_rate(row: dict) -> float:
    """Prompt tokens/s with or without flash attention, whichever is faster."""
    return max(row[key]["prompt_tokens_per_s"]["median"] for key in ("plain", "flash_attn"))


def table(results: dict) -> str:
    head = ["model", "type", "MiB", "prompt MAC ratio", "prompt tok/s (speedup)", "prompt, flash attn",
            "best prompt speedup (of MAC ratio)", "generation MAC ratio", "generation tok/s (speedup)",
            "generation, flash attn", "PTB test ppl", "PyTorch f32 ppl"]

    def cell(measured: dict, kind: str) -> str:
        return f"{measured[kind + '_tokens_per_s']['median']:.0f} ({measured[kind + '_speedup']:.2f}x)"

    rows = [[r["model"], r["type"], f"{r['bytes'] / 2**20:.1f}", f"{r['prompt_mac_ratio']:.2f}",
             cell(r["plain"], "prompt"), cell(r["flash_attn"], "prompt"),
             f"{r['best_prompt_speedup']:.2f}x ({r['prompt_speedup_of_ceiling']:.2f})",
             f"{r['generation_mac_ratio']:.2f}", cell(r["plain"], "generation"),
             cell(r["flash_attn"], "generation"), f"{r['ptb_test_ppl']:.2f}", f"{r['pytorch_f32_ppl']:.2f}"]
            for r in results["rows"]]
    return markdown_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="folder for the pruned models and GGUF files (reused)")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, help="score only the first N PTB test tokens")
    args = parser.parse_args()
    results = bench(args.work, args.types.split(","), args.threads, args.repeats, args.max_tokens)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_llamacpp.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "gguf_llamacpp.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
