"""Tuning round on the whole PTB valid split: variants of a method at one ratio, scores reused.

Every variant prunes a fresh copy of the model with the default calibration (64 x 512 PTB train
windows, seed 0); variants that differ only in allocation options reuse the first one's scores
(exactly what a full run computes, see --scores). Perplexity: PTB valid, L = 128, every token.

    python bench/tune_valid.py OUT.json 0.5 "bip" "flap" "bip:allocation=global,normalize=zscore" --dense
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from llm_bip.checkpoint import load_model
from llm_bip.compare import parse_method
from llm_bip.data import calibration_ids
from llm_bip.evaluation import perplexity
from llm_bip.config import PruneConfig
from llm_bip.pruner import Pruner
from llm_bip.scores import SCORING_FIELDS


def valid_ppl(model, tokenizer) -> float:
    return perplexity(model, tokenizer, "ptb", "valid", 128, progress=False).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("ratio", type=float)
    parser.add_argument("specs", nargs="+", help="compare-style method specs, e.g. bip:allocation=global")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    args = parser.parse_args()
    model, tokenizer = load_model()
    base = PruneConfig(ratio=args.ratio)
    calib = calibration_ids(tokenizer, base.calibration, base.n_samples, base.seqlen, base.seed)
    rows = [{"spec": "dense", "ppl": valid_ppl(model, tokenizer)}] if args.dense else []
    records = {}
    for spec in args.specs:
        _, config = parse_method(spec, base)
        key = json.dumps({k: getattr(config.resolved(), k) for k in SCORING_FIELDS})
        pruned, start = copy.deepcopy(model), time.perf_counter()
        result = Pruner(pruned, config, records.get(key)).run(calib)
        records.setdefault(key, result.record)
        rows.append({"spec": spec, "ratio": args.ratio, "block_ratio": round(result.block_ratio, 6),
                     "ppl": valid_ppl(pruned, tokenizer), "wall_s": round(time.perf_counter() - start, 1),
                     "widths": [[w.num_heads, w.intermediate_size] for w in result.widths_after]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "widths"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
