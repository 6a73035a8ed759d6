"""Tuning round on valid splits: variants of a method at one ratio, scores reused.

Every variant prunes a fresh copy of the model with its calibration (by default --calibration's
64 x 512 train windows, seed 0; a spec may name another, e.g. "bip:calibration=ptb"); variants
that differ only in allocation options reuse the first one's scores (exactly what a full run
computes, see --scores). Perplexity: the valid split of every text in --texts (default PTB),
L = 128, every token unless --max-tokens.

    python bench/tune_valid.py OUT.json 0.5 "bip" "flap" "bip:allocation=global,normalize=zscore" --dense
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial

from llm_bip.compare import parse_method
from llm_bip.config import PruneConfig
from llm_bip.data import calibration_ids
from llm_bip.evaluation import perplexity
from llm_bip.loading import load_model
from llm_bip.options import SCORING_FIELDS
from llm_bip.pruner import Pruner


def valid_ppl(model, tokenizer, texts: list[str], max_tokens: int | None) -> dict[str, float]:
    return {text: perplexity(model, tokenizer, text, "valid", 128, max_tokens=max_tokens, progress=False).ppl
            for text in texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("ratio", type=float)
    parser.add_argument("specs", nargs="+", help="compare-style method specs, e.g. bip:allocation=global")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--texts", default="ptb", help="comma-separated corpora whose valid split is scored")
    parser.add_argument("--max-tokens", type=int, help="score the first N tokens of each valid split")
    parser.add_argument("--calibration", default=PruneConfig.calibration)
    args = parser.parse_args()
    texts = args.texts.split(",")
    model, tokenizer = load_model()
    base = PruneConfig(ratio=args.ratio, calibration=args.calibration)
    measure = partial(valid_ppl, texts=texts, max_tokens=args.max_tokens)
    rows = [{"spec": "dense", "ppl": measure(model, tokenizer)}] if args.dense else []
    records = {}
    for spec in args.specs:
        _, config = parse_method(spec, base)
        key = json.dumps({k: getattr(config.resolved(), k) for k in SCORING_FIELDS})
        pruned, start = copy.deepcopy(model), time.perf_counter()
        calib = calibration_ids(tokenizer, config.calibration, config.n_samples, config.seqlen, config.seed)
        result = Pruner(pruned, config, records.get(key)).run(calib)
        records.setdefault(key, result.record)
        rows.append({"spec": spec, "ratio": args.ratio, "block_ratio": round(result.block_ratio, 6),
                     "ppl": measure(pruned, tokenizer), "wall_s": round(time.perf_counter() - start, 1),
                     "widths": [[w.num_heads, w.intermediate_size] for w in result.widths_after]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "widths"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
