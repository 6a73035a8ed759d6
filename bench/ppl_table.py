"""Perplexity table for issue-2 style runs: dense and LLM-BIP at several ratios and allocations.

    python bench/ppl_table.py --ratios 0.2,0.5 --allocations uniform,global --out bench/results/ppl_smollm2.json

Loads the model once; each row prunes a fresh copy with the package's defaults (unless
overridden) and scores the whole PTB test split (or --max-tokens of it). Writes JSON and a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from llm_bip import PruneConfig, load_model, perplexity, prune
from llm_bip.pruner import library_versions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--allocations", default="uniform,global")
    p.add_argument("--method", default="bip")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/ppl_smollm2.json"))
    args = p.parse_args()

    model, tokenizer = load_model(args.model)
    rows = []

    def evaluate(m) -> dict:
        return perplexity(m, tokenizer, "ptb", "test", args.seqlen, args.max_tokens).as_dict()

    rows.append({"method": "dense", "ratio": 0.0, "allocation": "-", "ppl": evaluate(model),
                 "params": sum(p.numel() for p in model.parameters())})
    print(rows[-1], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for allocation in args.allocations.split(","):
            config = PruneConfig(ratio=ratio, allocation=allocation, method=args.method)
            start = time.perf_counter()
            pruned, result = prune(copy.deepcopy(model), tokenizer, config)
            wall = time.perf_counter() - start
            rows.append({
                "method": args.method, "ratio": ratio, "allocation": allocation, "ppl": evaluate(pruned),
                "params": result.params["model_after"], "block_ratio": result.block_ratio,
                "prune_wall_s": round(wall, 1), "phases": result.phases, "config": result.summary()["config"],
            })
            print({k: rows[-1][k] for k in ("ratio", "allocation", "ppl", "prune_wall_s")}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "versions": library_versions(), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | allocation | block ratio | params | PTB test ppl | L | tokens | prune s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = max((ph["peak_rss_mb"] for ph in r.get("phases", {}).values()), default=0)
        lines.append(
            f"| {r['method']} | {r['allocation']} | {r.get('block_ratio', 0):.4f} | {r['params']:,} | "
            f"{r['ppl']['ppl']:.2f} | {r['ppl']['seqlen']} | {r['ppl']['tokens']:,} | "
            f"{r.get('prune_wall_s', '-')} | {peak or '-'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
