"""The evidence tables of docs/results.md (issue 22), every cell from one resumable script.

Models: each row's method at 20% and 50% of SmolLM2's block parameters, pruned from the dense model in
memory (a scoring shared by two rows or ratios is computed once: re-pruning from scores is exact). Cells:
perplexity of PTB test and `sherlock` test (out of domain for every method), on the whole split or its first
32,768 tokens, at L = 128 or 512.

- headline: the default with its own calibration and with PTB's (the paper's protocol), `flap` as
  published and with the refit, the refit-aware selection; whole test splits at L = 128, slices at L = 512;
- others: every other faithful baseline and `bip-paper`, on the slices at both window lengths;
- table (b): every scoring x {no refit, refit, refit-aware selection}, on the slices at L = 128.

Baselines calibrate on PTB train (FLAP's own protocol: in-domain for PTB). A finished cell is kept
(bench/results/evidence.json), so an interrupted run resumes at the first missing one; `--table` prints the
markdown tables from the results alone.

    python bench/evidence.py [--only headline|others|b] [--ratios 0.2,0.5]
    python bench/evidence.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from bench_results import RESULTS
from llm_bip.checkpoint import load_model
from llm_bip.compare import parse_method
from llm_bip.config import PruneConfig
from llm_bip.evaluation import perplexity
from llm_bip.pruner import Pruner
from llm_bip.selfcalib import calibration_batch
from llm_bip.tables import markdown_table

RESULTS_FILE = RESULTS / "evidence.json"
TEXTS = ("ptb", "sherlock")
SLICE = 32768
WHOLE_128 = tuple((text, None, 128) for text in TEXTS)
SLICES = {seqlen: tuple((text, SLICE, seqlen) for text in TEXTS) for seqlen in (128, 512)}
PTB = "calibration=ptb"
HEADLINE = {
    "bip (default, mix calibration)": "bip",
    "bip, PTB calibration": f"bip:{PTB}",
    "flap (as published)": f"flap:{PTB}",
    "flap + refit": f"flap:{PTB},reconstruct=true",
    "bip-refit (refit-aware selection, mix)": "bip-refit",
    "bip-refit, PTB calibration": f"bip-refit:{PTB}",
}
OTHERS = {name: f"{name}:{PTB}" for name in ("wanda-sp", "llm-pruner", "magnitude", "bip-paper")}
SELECTIONS = {"no refit": "reconstruct=false", "refit": "reconstruct=true", "refit-aware": "selection=refit"}
SCORINGS = ("bip", "flap", "wanda-sp", "llm-pruner", "magnitude", "bip-paper")
TABLE_B = {f"{scoring} / {how}": f"{scoring}:{PTB},{option}" for scoring in SCORINGS
           for how, option in SELECTIONS.items()}
TABLES = {  # name -> (rows, cells of every row)
    "headline": (HEADLINE, WHOLE_128 + SLICES[512]),
    "others": (OTHERS, SLICES[128] + SLICES[512]),
    "b": (TABLE_B, SLICES[128]),
}


def cell_key(spec: str, ratio: float, cell: tuple) -> str:
    text, tokens, seqlen = cell
    return f"{spec}@{ratio}|{text}/test|{'whole' if tokens is None else tokens}|L{seqlen}"


def todo(ratios: list[float], tables: list[str], done: dict) -> dict[tuple[str, float], list[tuple]]:
    """(spec, ratio) -> the cells of that model not measured yet, in the order the tables list them."""
    missing: dict[tuple[str, float], list[tuple]] = {}
    for name in tables:
        rows, cells = TABLES[name]
        for spec in rows.values():
            for ratio in ratios:
                wanted = [c for c in cells if cell_key(spec, ratio, c) not in done]
                if wanted:
                    missing.setdefault((spec, ratio), [])
                    missing[(spec, ratio)] += [c for c in wanted if c not in missing[(spec, ratio)]]
    return missing


def scoring_key(config: PruneConfig) -> str:
    return json.dumps(config.resolved().scoring_settings(), sort_keys=True)


def measure(model, tokenizer, cells: list[tuple], spec: str, ratio: float, done: dict) -> None:
    for cell in cells:
        text, tokens, seqlen = cell
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, "test", seqlen, tokens, progress=False, cache=True)
        done[cell_key(spec, ratio, cell)] = {"ppl": ppl.ppl, "tokens": ppl.tokens,
                                             "eval_s": round(time.perf_counter() - start, 1)}
        RESULTS_FILE.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
        print(f"{cell_key(spec, ratio, cell)}: {ppl.ppl:.2f}", flush=True)


def run(ratios: list[float], tables: list[str]) -> None:
    done = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else {}
    model, tokenizer = load_model()
    dense_cells = sorted({c for name in tables for c in TABLES[name][1]}, key=str)
    measure(model, tokenizer, [c for c in dense_cells if cell_key("dense", 0.0, c) not in done], "dense", 0.0, done)
    records = {}
    for (spec, ratio), cells in todo(ratios, tables, done).items():
        _, config = parse_method(spec, PruneConfig(ratio=ratio))
        pruned, start = copy.deepcopy(model), time.perf_counter()
        result = Pruner(pruned, config, records.get(scoring_key(config))).run(
            calibration_batch(model, tokenizer, config))
        if not result.config.sequential:
            records.setdefault(scoring_key(config), result.record)
        done[f"{spec}@{ratio}|prune"] = {"wall_s": round(time.perf_counter() - start, 1),
                                         "block_ratio": round(result.block_ratio, 6),
                                         "phases": result.phases}
        measure(pruned, tokenizer, cells, spec, ratio, done)


def tables_markdown(done: dict, ratios: list[float]) -> str:
    """Every table: rows x (ratio, cell), perplexity and the dense row first; 'not measured' where a cell is missing."""
    parts = []
    for name, (rows, cells) in TABLES.items():
        head = ["row", *[f"{int(r * 100)}% {text} {'whole' if n is None else f'{n // 1024}k'} L{s}"
                         for r in ratios for text, n, s in cells]]
        body = [["dense", *[_ppl(done, cell_key("dense", 0.0, c)) for _ in ratios for c in cells]]]
        body += [[label, *[_ppl(done, cell_key(spec, r, c)) for r in ratios for c in cells]]
                 for label, spec in rows.items()]
        parts.append(f"### {name}\n\n{markdown_table(head, body)}")
    return "\n\n".join(parts) + "\n"


def _ppl(done: dict, key: str) -> str:
    return f"{done[key]['ppl']:.2f}" if key in done else "not measured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(TABLES), action="append", help="these tables (default: all)")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--table", action="store_true", help="print the tables of what is measured")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if not args.table:
        run(ratios, args.only or list(TABLES))
    done = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else {}
    markdown = tables_markdown(done, ratios)
    (RESULTS / "evidence.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
