"""The ``llm-bip`` command: prune, eval, compare, bench-speed, report, finetune, distill, export. Errors are one
line on stderr and a non-zero exit.

Each command parses its options (cli_parser.py), runs the library's job for it and prints the result; the
jobs' progress lines and notes come through the ``llm_bip`` logger (logs.py)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path

from .cli_parser import build_parser
from .compare import CompareSpec, results_table, run_compare
from .config import PruneConfig
from .errors import PruneError
from .eval_job import EvalConfig, run_eval
from .evaluation import perplexity
from .gguf_export import run_export
from .job import run_prune
from .logs import console_output
from .pipeline import run_prune_and_recover
from .recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune
from .report import run_report
from .speed import SpeedSettings, parse_sizes, run_bench_speed, speed_table
from .zeroshot import zero_shot_table


def config_from_args(args) -> PruneConfig:
    return PruneConfig(
        ratio=args.ratio, method=args.method, allocation=args.allocation, gqa=args.gqa, normalize=args.normalize,
        compensate=args.compensate, lipschitz=args.lipschitz, head_score=args.head_score, sequential=args.sequential,
        reconstruct=args.reconstruct, selection=args.selection, calibration=args.calibration, n_samples=args.samples,
        seqlen=args.calib_seqlen,
        batch_size=args.batch_size, keep_dense=args.keep_dense, min_channels=args.min_channels, round_to=args.round_to,
        seed=args.seed, target=args.target,
    )


def cmd_prune(args) -> None:
    if args.recover is not None:
        cmd_prune_and_recover(args)
        return
    summary = run_prune(
        args.model, args.out, config_from_args(args), offload=args.offload, resume=args.resume,
        overwrite=args.overwrite, scores=args.scores, eval_dataset=args.eval, eval_seqlen=args.eval_seqlen,
        eval_max_tokens=args.eval_max_tokens, device=args.device, dtype=args.dtype, device_map=args.device_map,
        measure=partial(perplexity, cache=args.cache),
    )
    print_prune_report(summary, args.out)


def cmd_prune_and_recover(args) -> None:
    if args.offload or args.device_map is not None:
        option = "--offload" if args.offload else "--device-map"
        raise PruneError(f"--recover trains the whole model in memory; prune with {option} first, then run "
                         "llm-bip distill where the model fits (or under accelerate launch)")
    recovery = DistillConfig(data=args.recover_data, max_steps=args.recover, seed=args.seed)
    summary = run_prune_and_recover(
        args.model, args.out, config_from_args(args), recovery, resume=args.resume, overwrite=args.overwrite,
        eval_dataset=args.eval, eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens,
        device=args.device, dtype=args.dtype)
    print_prune_report(summary, args.out)


def print_prune_report(summary: dict, out: Path) -> None:
    p = summary["parameters"]
    print(f"blocks: {p['blocks_before']:,} -> {p['blocks_after']:,} parameters "
          f"({100 * p['block_ratio_removed']:.2f}% removed)")
    print(f"model:  {p['model_before']:,} -> {p['model_after']:,} parameters")
    print(f"pruning took {summary['prune_wall_s']:.1f} s; wrote {out}")


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError as err:
        raise PruneError(f"--ratios takes comma-separated fractions, e.g. 0.2,0.5; got {text!r}") from err


def cmd_compare(args) -> None:
    base = PruneConfig(calibration=args.calibration, n_samples=args.samples, seqlen=args.calib_seqlen,
                       batch_size=args.batch_size, seed=args.seed)
    spec = CompareSpec(
        methods=[m.replace(";", ",") for m in args.methods.split(",") if m], base=base,
        ratios=_ratios(args.ratios), seqlens=parse_sizes(args.seqlens, "--seqlens"),
        datasets=[d for d in args.ppl.split(",") if d], split=args.split, max_tokens=args.max_tokens,
    )
    results = run_compare(args.model, args.out, spec, overwrite=args.overwrite, device=args.device, dtype=args.dtype)
    print(results_table(results))
    print(f"wrote {args.out}")


def cmd_eval(args) -> None:
    config = EvalConfig(
        corpora=[] if args.ppl == "none" else [d for d in args.ppl.split(",") if d], split=args.split,
        seqlen=args.seqlen, max_tokens=args.max_tokens, cache=args.cache, teacher=args.teacher,
        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()], include_path=args.include_path or [],
        limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
    )
    summary = run_eval(args.model, config, out=args.out, overwrite=args.overwrite, device=args.device,
                       dtype=args.dtype)
    if summary["zeroshot"]:
        print(zero_shot_table(summary["zeroshot"]))
    if args.out:
        print(f"wrote {args.out}")


def cmd_bench_speed(args) -> None:
    settings = SpeedSettings(
        batch_sizes=parse_sizes(args.batch_sizes, "--batch-sizes"), lengths=parse_sizes(args.lengths, "--lengths"),
        decode_tokens=args.decode_tokens, prompt_length=args.prompt_length, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, device=args.device, dtype=args.dtype, seed=args.seed,
    )
    results = run_bench_speed(args.models, args.out, settings, overwrite=args.overwrite)
    print(speed_table(results))
    print(f"wrote {Path(args.out)}")


def cmd_report(args) -> None:
    out = run_report(args.run, args.out, args.speed, args.evals, args.overwrite)
    print(f"wrote {out} (report.md, report.html)")


def cmd_export(args) -> None:
    print(run_export(args.model, args.out, args.type, args.overwrite, args.allow_f16_rows))


def options_of(args, config_type):
    """The config dataclass ``config_type`` from the parsed options of the same names."""
    names = {f.name for f in fields(config_type)}
    return config_type(**{k: v for k, v in vars(args).items() if k in names})


def cmd_finetune(args) -> None:
    run_finetune(args.model, args.out, options_of(args, FinetuneConfig), device=args.device, dtype=args.dtype,
                 overwrite=args.overwrite, resume=args.resume)


def cmd_distill(args) -> None:
    run_distill(args.model, args.out, options_of(args, DistillConfig), device=args.device, dtype=args.dtype,
                overwrite=args.overwrite, resume=args.resume)


def one_line(err: BaseException) -> str:
    """Messages wrapped from other libraries may span lines; the CLI prints one."""
    return " ".join(str(err).split())


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "compare": cmd_compare, "bench-speed": cmd_bench_speed,
            "report": cmd_report, "finetune": cmd_finetune, "distill": cmd_distill, "export": cmd_export}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that unfinished output is removed."""


def _raise_terminated(_signum, _frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with console_output():  # the jobs' progress lines on stdout, their notes on stderr
            COMMANDS[args.command](args)
    except PruneError as err:
        if os.environ.get("LLM_BIP_DEBUG"):  # the whole story: where it failed and the error behind it
            raise
        print(f"llm-bip: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"llm-bip: {'terminated' if terminated else 'interrupted'}; nothing was written", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as err:  # unexpected: one line unless LLM_BIP_DEBUG asks for the traceback
        if os.environ.get("LLM_BIP_DEBUG"):
            raise
        print(f"llm-bip: error: {type(err).__name__}: {one_line(err)} (set LLM_BIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
