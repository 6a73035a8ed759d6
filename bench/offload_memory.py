"""Peak memory and time of ``llm-bip prune --offload`` against the in-memory prune, on a random
LLaMA-style checkpoint of any size, and whether the two outputs are equal tensor for tensor.

The checkpoint is synthesised one shard (one block, or one module outside the blocks) at a time,
so a model larger than memory can be made too; its tokenizer is SmolLM2's (the embedded default
model's), which sets the vocabulary. Each prune runs in its own subprocess; its peak resident
memory is the kernel's (``wait4``). Results: ``bench/results/offload_NAME.{json,md}``.

    python bench/offload_memory.py --name tiny --hidden 256 --layers 4 --intermediate 688 --heads 8 --kv-heads 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from llm_bip.devices import DTYPES
from llm_bip.loading import empty_model
from llm_bip.shards import INDEX_FILE, SHARD_METADATA, stored_tensors
from llm_bip.sources import resolve_source

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="names the results files and the work folder")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="stored and pruned in this dtype")
    p.add_argument("--samples", type=int, default=8, help="calibration windows (PTB train)")
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--method", default="bip")
    p.add_argument("--work", type=Path, help="checkpoint and outputs (default: TMPDIR/llm-bip-offload-NAME); "
                                             "an existing checkpoint there is reused")
    p.add_argument("--skip-in-memory", action="store_true", help="offloaded run only (model larger than memory)")
    return p.parse_args(argv)


def shard_of(name: str, layers: int) -> str:
    """One shard per block, and one per module outside the blocks."""
    owner = next((f"model.layers.{i}" for i in range(layers) if name.startswith(f"model.layers.{i}.")),
                 name.rpartition(".")[0])
    return f"{owner}.safetensors"


def random_tensor(shape: torch.Size, name: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Norm gains 1; weights N(0, 1/fan_in), so activations keep their scale through the blocks."""
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)


def synthesize(folder: Path, args: argparse.Namespace) -> None:
    """A random checkpoint written shard by shard (never more than one shard in memory), with config and tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2"))
    tied = getattr(args, "tied", False)  # optional (bench/scaling.py): a vocabulary and tied LM head as a real model's
    config = LlamaConfig(
        vocab_size=getattr(args, "vocab", None) or len(tokenizer), hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.calib_seqlen),
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    dtype = DTYPES[args.dtype]
    shapes = {name: t.shape for name, t in empty_model(config, dtype).state_dict().items()
              if not (tied and name.startswith("lm_head."))}  # a tied head is stored once, as the embedding
    weight_map = {name: shard_of(name, args.layers) for name in shapes}
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in dict.fromkeys(weight_map.values()):
        tensors = {name: random_tensor(shapes[name], name, dtype, gen) for name, s in weight_map.items() if s == shard}
        save_file(tensors, str(folder / shard), SHARD_METADATA)
    size = sum(s.numel() * dtype.itemsize for s in shapes.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    tokenizer.save_pretrained(folder)
    config.dtype = args.dtype
    config.save_pretrained(folder)  # last: a folder with config.json is complete


def run_prune(model: Path, out: Path, args: argparse.Namespace, offload: bool) -> dict:
    """One ``llm-bip prune`` in a subprocess: its wall time, peak RSS and the run's own phases."""
    cmd = [sys.executable, "-m", "llm_bip.cli", "prune", str(model), "--out", str(out), "--overwrite",
           "--dtype", args.dtype, "--method", args.method, "--ratio", str(args.ratio), "--samples", str(args.samples),
           "--calib-seqlen", str(args.calib_seqlen), "--eval", "none", *(["--offload"] if offload else []),
           *(["--calibration", args.calibration] if getattr(args, "calibration", None) else [])]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(cmd)
    status, sampled = _wait_sampling_peak(process.pid)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prune failed ({'offloaded' if offload else 'in memory'}), exit {status}")
    summary = json.loads((out / "llm_bip_summary.json").read_text())
    phases = summary["phases"]
    per_block = {k: round(phases[k]["wall_s"] / args.layers, 3) for k in ("scoring", "surgery") if k in phases}
    peak = max([sampled] + [p["peak_rss_mb"] for p in phases.values()])
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "s_per_block": per_block,
            "phases": phases, "parameters": summary["parameters"]}


def _wait_sampling_peak(pid: int, every_s: float = 0.1) -> tuple[int, float]:
    """Wait for process ``pid``; returns (its wait status, the largest VmHWM read from /proc meanwhile, MB).

    Not wait4's ru_maxrss: the kernel carries the spawning process's resident size into the child's (at exec),
    so a bench that synthesized a checkpoint in its own process reported its own size; and the run resets its
    high-water mark as each phase starts. Sampling the child's VmHWM, with the phases' own peaks, gives its peak."""
    peak = 0.0
    while True:
        done, status, _ = os.wait4(pid, os.WNOHANG)
        if done:
            return status, peak
        try:
            status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            peak = max([peak] + [int(line.split()[1]) / 1024 for line in status_lines if line.startswith("VmHWM:")])
        except (OSError, ValueError):
            pass
        time.sleep(every_s)


def compare_outputs(a: Path, b: Path) -> dict:
    """Every tensor of two outputs compared with torch.equal, one tensor in memory at a time."""
    left, right = stored_tensors(a), stored_tensors(b)
    differing = [name for name in sorted(left.keys() & right.keys()) if not torch.equal(read(left[name][0], name),
                                                                                         read(right[name][0], name))]
    return {"tensors": len(left), "same_names": left.keys() == right.keys(), "differing": differing,
            "config_equal": (a / "config.json").read_text() == (b / "config.json").read_text()}


def read(shard: Path, name: str) -> torch.Tensor:
    with safe_open(str(shard), "pt") as f:
        return f.get_tensor(name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def markdown(result: dict) -> str:
    m, size = result["model"], result["checkpoint_bytes"]
    lines = [
        f"# Offloaded vs in-memory prune: {result['name']}", "",
        f"Random LLaMA-style checkpoint: hidden {m['hidden']}, {m['layers']} layers, FFN {m['intermediate']}, "
        f"{m['heads']} heads / {m['kv_heads']} KV heads, vocab {m['vocab']}, {m['dtype']}; "
        f"{size / 2**30:.2f} GiB of weights on disk. `--method {m['method']} --ratio {m['ratio']}`, "
        f"calibration PTB {m['samples']} x {m['calib_seqlen']}.", "",
        "| run | wall s | peak RSS MB | peak RSS / checkpoint | scoring s/block | surgery s/block |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, run in result["runs"].items():
        per_block = run["s_per_block"]
        lines.append(f"| {mode} | {run['wall_s']} | {run['peak_rss_mb']:.0f} | "
                     f"{run['peak_rss_mb'] * 2**20 / size:.2f} | {per_block.get('scoring', '-')} | "
                     f"{per_block.get('surgery', '-')} |")
    equal = result.get("equal")
    if equal is not None:
        same = equal["same_names"] and not equal["differing"] and equal["config_equal"]
        lines += ["", f"Outputs equal bit for bit: **{'yes' if same else 'no'}** ({equal['tensors']} tensors"
                      f"{'' if same else ', differing: ' + ', '.join(equal['differing'][:5])})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.gettempdir()) / f"llm-bip-offload-{args.name}"
    model = work / "model"
    if not (model / "config.json").is_file():
        synthesize(model, args)
    else:
        print(f"reusing the checkpoint in {model}")
    runs = {"offload": run_prune(model, work / "offload", args, offload=True)}
    if not args.skip_in_memory:
        runs["in_memory"] = run_prune(model, work / "in-memory", args, offload=False)
    config = json.loads((model / "config.json").read_text())
    result = {
        "name": args.name, "checkpoint_bytes": folder_size(model),
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": config["vocab_size"], "dtype": args.dtype,
                  "method": args.method, "ratio": args.ratio, "samples": args.samples,
                  "calib_seqlen": args.calib_seqlen},
        "runs": runs,
        "equal": None if args.skip_in_memory else compare_outputs(work / "in-memory", work / "offload"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"offload_{args.name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"offload_{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
