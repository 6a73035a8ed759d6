"""The GPU check (issue 24): a Llama-3.2-1B-shaped model pruned on CUDA in bfloat16, in memory and with
``--offload``, against the same model pruned on the CPU in float32.

The model has random weights (seeded; no checkpoint installs offline) at Llama-3.2-1B's real shape: 16 blocks,
hidden 2048, 32 query heads over 8 KV heads of width 64, FFN 8192, vocabulary 128,256, tied LM head. It is
saved as a sharded safetensors folder with a word-level tokenizer over the whole vocabulary, and calibrated on a
text of random vocabulary words (8 windows of 128 tokens by default). Each run is ``llm_bip.run_prune`` with the
default ``bip`` at 20% (scoring, cut, least-squares refit), no perplexity. For each run it records:

- the kept units: which query heads, KV heads and FFN channels every block of the written model holds, found by
  matching the written q_proj/k_proj/gate_proj rows to the dense model's (bfloat16 fingerprints), as shares of the
  reference's kept units; and the layers whose kept widths equal the reference's;
- the pruned model's logits on fixed token ids against the reference's (CPU, float32): the largest difference
  relative to the largest reference logit, and top-1 agreement. Where a run kept other units than the reference,
  that difference is mostly the other units', so each run is also compared with its float32 twin: the model
  pruned on the CPU in float32 from the run's own scores (``--scores``), which keeps the run's units; that
  difference is the precision's alone. The dense model's own bfloat16-vs-float32 difference is beside them, for
  scale;
- the scoring and refit phases' wall time, and as multiples of one plain forward pass of the calibration batch
  through the dense blocks on the same device and dtype;
- peak GPU memory (``torch.cuda.max_memory_allocated``, the largest over the job's phases) and peak RSS.

A run passes when it keeps at least ``KEPT_SHARE_MIN`` of the reference's query heads and FFN channels and its
logits agree with its twin's within ``LOGIT_REL_TOL`` and ``TOP1_MIN``; exit status 1 where one fails. Results:
``bench/results/gpu_check.{json,md}``. Meant to take under 10 minutes on one GPU machine (the CPU float32 runs are
most of it; estimated, not yet run on a GPU):

    bash bench/gpu_check.sh               # checks for CUDA first; exits 0 with "skipped: no CUDA" without one
    python bench/gpu_check.py --dry-run   # the same logic on a tiny model, every run on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_results import RESULTS, write_rows
from safetensors import safe_open

from llm_bip import PruneConfig, load_model, load_pruned, run_prune
from llm_bip.data import calibration_ids
from llm_bip.shards import weight_files
from llm_bip.testing import SPECIAL, build_model

# pass thresholds (set before any GPU run; the dry run in bfloat16 on the CPU: 1 of 122 kept channels other, 1.6%
# from its twin): bfloat16 scores may reorder near-ties at the cut, so a few units may differ from the float32
# reference; a model in bfloat16 differs from the same model in float32 by about a percent of the largest logit
KEPT_SHARE_MIN = 0.98  # of the reference's kept query heads, and of its kept FFN channels, over all blocks
LOGIT_REL_TOL = 0.05  # max |logit - twin's| / max |twin's logit|
TOP1_MIN = 0.90  # share of positions with the twin's most likely next token
FINGERPRINT = 32  # leading entries of a weight row that identify it (bfloat16 bits)

LLAMA_3_2_1B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    intermediate_size=8192, num_hidden_layers=16, vocab_size=128256, tie_word_embeddings=True,
                    rope_theta=500000.0, max_position_embeddings=2048)
TINY = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=64,
            num_hidden_layers=3, vocab_size=96, tie_word_embeddings=True, max_position_embeddings=256)
REFERENCE = ("cpu", "float32", False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="a tiny model (on the CPU unless --device says otherwise); "
                                                          "results written to the work folder, not bench/results")
    p.add_argument("--device", help="the device of the checked runs (default cuda; --dry-run: cpu)")
    p.add_argument("--dtype", default="bfloat16", help="their dtype")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--work", type=Path, help="model and outputs (default: a temporary folder, removed after)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.samples, args.calib_seqlen = min(args.samples, 8), min(args.calib_seqlen, 32)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    return args


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words "w3" ... fill the vocabulary after the special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"w{i}" for i in range(len(SPECIAL), vocab_size)])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def write_model(folder: Path, sizes: dict) -> None:
    """The random model (seed 0; weights N(0, 1/fan_in), so activations keep their scale), saved in float32
    shards with its tokenizer."""
    model = build_model("llama", 0, bos_token_id=1, eos_token_id=2, pad_token_id=None, **sizes)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.02 ** -1 * p.shape[-1] ** -0.5)  # transformers' init draws N(0, 0.02^2)
    model.save_pretrained(folder, max_shard_size="1GB")
    word_tokenizer(sizes["vocab_size"]).save_pretrained(folder)


def write_text(path: Path, vocab_size: int, words: int) -> Path:
    """Random vocabulary words (seed 0), 16 to a line: calibration windows of uniformly random tokens."""
    ids = torch.randint(len(SPECIAL), vocab_size, (words,), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_text("\n".join(" ".join(f"w{i}" for i in ids[k:k + 16]) for k in range(0, words, 16)) + "\n")
    return path


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits.float().cpu()


@torch.no_grad()
def dense_measures(folder: Path, device: str, dtype: str, calib: torch.Tensor, ids: torch.Tensor,
                   batch_size: int) -> dict:
    """The dense model on ``device`` in ``dtype``: its logits on ``ids``, and the wall time of one forward pass of
    the calibration batch through its blocks (no LM head, batches of the run's size, after a warm-up)."""
    model, _ = load_model(str(folder), dtype, device)
    blocks = model.base_model
    blocks(calib[:1, :8].to(device), use_cache=False)  # kernels and allocator warmed up
    synchronize(device)
    start = time.perf_counter()
    for batch in calib.split(batch_size):
        blocks(batch.to(device), use_cache=False)
    synchronize(device)
    forward_s = time.perf_counter() - start
    logits = logits_of(model, ids)
    del model, blocks
    free_memory()
    return {"forward_s": forward_s, "logits": logits}


# the weight whose rows a unit owns: a query head's (first row of its block of rows), a KV head's, an FFN channel's
UNIT_ROWS = {"heads": "self_attn.q_proj", "kv_heads": "self_attn.k_proj", "channels": "mlp.gate_proj"}


def fingerprints(folder: Path, layers: int, head_dim: int) -> list[dict[str, list[tuple]]]:
    """Every block's units as fingerprints of their rows (the leading entries' bfloat16 bits), in row order."""
    shard_of = {}
    for shard in weight_files(folder):
        with safe_open(str(shard), "pt") as f:
            shard_of.update(dict.fromkeys(f.keys(), shard))
    blocks = []
    for i in range(layers):
        rows = {}
        for kind, module in UNIT_ROWS.items():
            name = f"model.layers.{i}.{module}.weight"
            with safe_open(str(shard_of[name]), "pt") as f:
                weight = f.get_tensor(name)[::1 if kind == "channels" else head_dim, :FINGERPRINT]
            rows[kind] = [tuple(r) for r in weight.to(torch.bfloat16).contiguous().view(torch.int16).tolist()]
        blocks.append(rows)
    return blocks


def kept_units(dense: list[dict[str, list[tuple]]], pruned: list[dict[str, list[tuple]]]) -> list[dict[str, set]]:
    """The indices (in the dense model) of the units each written block holds."""
    kept = []
    for i, (d, p) in enumerate(zip(dense, pruned)):
        layer = {}
        for kind, rows in d.items():
            index = {row: j for j, row in enumerate(rows)}
            if len(index) < len(rows):
                raise ValueError(f"block {i}: two dense {kind} share a fingerprint; raise FINGERPRINT")
            unknown = [row for row in p[kind] if row not in index]
            if unknown:
                raise ValueError(f"block {i}: {len(unknown)} written {kind} match no dense row")
            layer[kind] = {index[row] for row in p[kind]}
        kept.append(layer)
    return kept


def unit_agreement(kept: list[dict[str, set]], ref: list[dict[str, set]]) -> dict:
    """Shares of the reference's kept units that a run keeps too (over all blocks, and per block for channels),
    and the blocks whose kept widths, and kept units, equal the reference's."""
    row = {f"{kind}_same": sum(len(k[kind] & r[kind]) for k, r in zip(kept, ref)) / sum(len(r[kind]) for r in ref)
           for kind in UNIT_ROWS}
    row["channels_same_by_layer"] = [round(len(k["channels"] & r["channels"]) / len(r["channels"]), 4)
                                     for k, r in zip(kept, ref)]
    widths = sum(all(len(k[kind]) == len(r[kind]) for kind in UNIT_ROWS) for k, r in zip(kept, ref))
    same = sum(k == r for k, r in zip(kept, ref))
    row.update(widths_same=f"{widths}/{len(ref)}", layers_same=f"{same}/{len(ref)}")
    return row


def logit_agreement(logits: torch.Tensor, ref: torch.Tensor, prefix: str = "") -> dict:
    """The largest logit difference relative to the largest reference logit, and top-1 agreement."""
    return {f"{prefix}logit_rel_diff": float((logits - ref).abs().max() / ref.abs().max()),
            f"{prefix}top1": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def cost_row(summary: dict, forward_s: float, device: str) -> dict:
    """Scoring and refit wall time, alone and as multiples of one forward pass; the job's peak memory (the largest
    over its phases: each resets the peak counters)."""
    phases = summary["phases"]
    scoring = phases.get("scoring", {}).get("wall_s")
    refit = phases.get("reconstruction", {}).get("wall_s")
    cuda = [p["peak_cuda_mb"] for p in phases.values() if "peak_cuda_mb" in p]
    return {"forward_s": round(forward_s, 3), "scoring_s": scoring, "refit_s": refit,
            "scoring_x_forward": scoring / forward_s if scoring else None,
            "refit_x_forward": refit / forward_s if refit else None, "prune_s": summary["prune_wall_s"],
            "peak_cuda_mb": max(cuda) if cuda and device.startswith("cuda") else None,
            "peak_rss_mb": max(p["peak_rss_mb"] for p in phases.values()), "phases": phases}


def passes(row: dict) -> bool:
    return (row["heads_same"] >= KEPT_SHARE_MIN and row["channels_same"] >= KEPT_SHARE_MIN and row["twin_units_equal"]
            and row["twin_logit_rel_diff"] <= LOGIT_REL_TOL and row["twin_top1"] >= TOP1_MIN)


class Check:
    """The runs of one check: the first one given is the reference (CPU, float32) the others are compared with.
    A run whose kept units differ from the reference's also gets its float32 twin: the model pruned on the CPU in
    float32 from the run's own scores (``--scores``), so with the same units; its logits against the twin's are
    the precision's own difference, apart from which units were chosen."""

    def __init__(self, folder: Path, work: Path, config: PruneConfig, calib: torch.Tensor, ids: torch.Tensor):
        self.folder, self.work, self.config, self.calib, self.ids = folder, work, config, calib, ids
        cfg = load_model_config(folder)
        self.layers, self.head_dim = cfg.num_hidden_layers, cfg.head_dim
        self.dense_rows = fingerprints(folder, self.layers, self.head_dim)
        self.dense: dict[tuple[str, str], dict] = {}
        self.twins: list[dict] = []  # {"for": kept units, "kept": the twin's, "logits", "source"}

    def dense_on(self, device: str, dtype: str) -> dict:
        if (device, dtype) not in self.dense:
            self.dense[device, dtype] = dense_measures(self.folder, device, dtype, self.calib, self.ids,
                                                       self.config.batch_size)
        return self.dense[device, dtype]

    def prune(self, out: Path, device: str, dtype: str, offload: bool, scores: Path | None = None) -> dict:
        free_memory()
        summary = run_prune(str(self.folder), out, self.config, offload=offload, overwrite=True, eval_dataset="none",
                            device=device, dtype=dtype, scores=scores)
        free_memory()
        return summary

    def outcome(self, out: Path, device: str, dtype: str) -> tuple[list[dict[str, set]], torch.Tensor]:
        """The written model's kept units and its logits on the check's token ids (on ``device`` in ``dtype``)."""
        logits = logits_of(load_pruned(out, dtype).to(device), self.ids)
        free_memory()
        return kept_units(self.dense_rows, fingerprints(out, self.layers, self.head_dim)), logits

    def twin(self, out: Path, kept: list[dict[str, set]]) -> dict:
        """The float32 CPU model with the units ``kept``: the reference or an earlier twin where it keeps them, else
        pruned from the scores in ``out``."""
        known = next((twin for twin in self.twins if twin["for"] == kept), None)
        if known is not None:
            return known
        twin_out = out.with_name(out.name + "_float32_twin")
        self.prune(twin_out, *REFERENCE, scores=out)
        twin_kept, logits = self.outcome(twin_out, *REFERENCE[:2])
        self.twins.append({"for": kept, "kept": twin_kept, "logits": logits, "source": f"--scores {out.name}"})
        return self.twins[-1]

    def run(self, label: str, device: str, dtype: str, offload: bool) -> dict:
        dense = self.dense_on(device, dtype)
        out = self.work / label.replace(" ", "_").replace(":", "").replace("--", "")
        summary = self.prune(out, device, dtype, offload)
        kept, logits = self.outcome(out, device, dtype)
        if not self.twins:
            self.twins.append({"for": kept, "kept": kept, "logits": logits, "source": "reference",
                               "dense_logits": dense["logits"]})
        ref, twin = self.twins[0], self.twin(out, kept)
        row = {"run": label, "device": device, "dtype": dtype, "offload": offload,
               "ratio": summary["parameters"]["block_ratio_removed"], **unit_agreement(kept, ref["kept"]),
               **logit_agreement(logits, ref["logits"]), "twin": twin["source"],
               "twin_units_equal": twin["kept"] == kept, **logit_agreement(logits, twin["logits"], "twin_"),
               **logit_agreement(dense["logits"], ref["dense_logits"], "dense_"),
               **cost_row(summary, dense["forward_s"], device)}
        row["pass"] = passes(row)
        print({k: v for k, v in row.items() if k not in ("phases", "channels_same_by_layer")}, flush=True)
        return row


def load_model_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def machine() -> dict:
    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads()}


def run_all(args: argparse.Namespace, work: Path) -> list[dict]:
    """Write the model and the calibration text, then the reference run and the two checked ones."""
    from transformers import AutoTokenizer

    sizes = TINY if args.dry_run else LLAMA_3_2_1B
    folder = work / "dense"
    write_model(folder, sizes)
    text = write_text(work / "calibration.txt", sizes["vocab_size"], 4 * args.samples * args.calib_seqlen)
    config = PruneConfig(ratio=args.ratio, calibration=str(text), n_samples=args.samples, seqlen=args.calib_seqlen)
    calib = calibration_ids(AutoTokenizer.from_pretrained(folder), str(text), args.samples, args.calib_seqlen, 0)
    ids_shape = (2, 16) if args.dry_run else (4, 128)
    ids = torch.randint(len(SPECIAL), sizes["vocab_size"], ids_shape, generator=torch.Generator().manual_seed(1))
    check = Check(folder, work, config, calib, ids)
    runs = {"reference: cpu float32": REFERENCE, f"{args.device} {args.dtype}": (args.device, args.dtype, False),
            f"{args.device} {args.dtype} --offload": (args.device, args.dtype, True)}
    return [{**check.run(label, *setting), **machine()} for label, setting in runs.items()]


COLUMNS = ["run", "ratio", "widths_same", "heads_same", "channels_same", "logit_rel_diff", "top1", "twin",
           "twin_logit_rel_diff", "twin_top1", "dense_logit_rel_diff", "dense_top1", "forward_s", "scoring_s",
           "scoring_x_forward", "refit_s", "refit_x_forward", "peak_cuda_mb", "peak_rss_mb", "pass"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llm-bip-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_all(args, work)
        # a dry run's rows go to the work folder, never over the GPU results
        print(write_rows("gpu_check", rows, COLUMNS, work if args.dry_run else RESULTS))
    failed = [row["run"] for row in rows if not row["pass"]]
    thresholds = (f"kept heads and channels >= {KEPT_SHARE_MIN:.0%} of the reference's; against the float32 model "
                  f"with the same units, logits within {LOGIT_REL_TOL:.0%} of its largest and top-1 >= {TOP1_MIN:.0%}")
    print(f"FAILED: {', '.join(failed)} ({thresholds})" if failed else f"passed: {thresholds}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
