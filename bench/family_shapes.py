"""Every family at the block shapes of a real checkpoint: prune, save, reload, export, run in llama.cpp.

Random weights (no checkpoint of these families installs offline), two blocks of the real model's sizes
(hidden, heads, KV heads, head width, FFN width, query scale, sliding windows), a small vocabulary. For
each: the default ``bip`` at 20%, the same for llama.cpp (``--target llamacpp``: the same scores and refit,
per-layer widths where its ``deci`` graph serves the family, else one width) and the uniform allocation at 50%
(no compensation, no refit), on 16 random windows of 128 tokens; the pruned model saved and reloaded (stock
``from_pretrained`` or ``load_pruned``, as the folder says) with its logits compared; what llama.cpp serves
exported to GGUF (f32) and run by llama.cpp, logits compared. What the served allocation costs: each pruned
model's KL to the dense one and its top-1 agreement with it, on 4 other random windows (random weights: a
measure of how far each allocation moves the model, not of language quality).
Writes bench/results/family_shapes.{json,md}. The models are built with the tests' builder (llm_bip.testing):

    python bench/family_shapes.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from bench_results import write_rows

from llm_bip import PruneConfig, PruneError, load_pruned, prune, save_model
from llm_bip.gguf_export import write_file
from llm_bip.llamacpp import open_gguf, window_logits
from llm_bip.testing import TOKEN_IDS_ONLY, build_model

VOCAB = 512
TWO_KINDS = dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"])
# the block sizes of public checkpoints (their config.json)
SHAPES = {
    "Llama-3.2-1B": ("llama", dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   intermediate_size=8192)),
    "Qwen3-0.6B": ("qwen3", dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 intermediate_size=3072)),
    "SmolLM3-3B": ("smollm3", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                                   intermediate_size=11008)),
    "gemma-2-2b": ("gemma2", dict(hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  intermediate_size=9216, query_pre_attn_scalar=256, tie_word_embeddings=True,
                                  **TWO_KINDS)),
    "gemma-3-1b": ("gemma3_text", dict(hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                       intermediate_size=6912, query_pre_attn_scalar=256, tie_word_embeddings=True,
                                       **TWO_KINDS)),
    "Phi-3-mini": ("phi3", dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, head_dim=96,
                                intermediate_size=8192)),
    "OLMo-2-1B": ("olmo2", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                                intermediate_size=8192)),
}
# the default; the default for llama.cpp; then uniform widths with no bias added (SmolLM3's graph has no place
# for one) and no refit
PLAIN = dict(allocation="uniform", compensate=False, reconstruct=False)
RUNS = {"bip 20%": PruneConfig(ratio=0.2), "llamacpp 20%": PruneConfig(ratio=0.2, target="llamacpp"),
        "uniform 50%": PruneConfig(ratio=0.5, **PLAIN)}


def model_of(architecture: str, sizes: dict):
    model = build_model(architecture, 0, vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256,
                        **{"tie_word_embeddings": False, **sizes})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.02 ** -1 * p.shape[-1] ** -0.5)  # unit-variance activations, as in trained models
    return model


def run(name: str, label: str, config: PruneConfig, folder: Path) -> dict:
    architecture, sizes = SHAPES[name]
    model = model_of(architecture, sizes)
    calib = torch.randint(0, VOCAB, (16, 128), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(held_out).logits
    start = time.perf_counter()
    _, result = prune(model, None, config, calib=calib)
    seconds = time.perf_counter() - start
    save_model(model, None, folder / "model", overwrite=True)
    reloaded = load_pruned(folder / "model")  # stock from_pretrained where the folder holds no per-layer widths
    with torch.no_grad():
        logits = model(ids).logits
        reload_diff = float((reloaded(ids).logits - logits).abs().max())
        pruned = model(held_out).logits
    row = {"model": name, "run": label, "widths": sorted({str(w) for w in result.widths_after}),
           "ratio": round(result.block_ratio, 4), "per_layer_config": model.config.is_heterogeneous,
           "prune_s": round(seconds, 1), "reload_max_diff": reload_diff, **distance(dense, pruned)}
    if config.target == "llamacpp" or len(set(result.widths_after)) == 1:
        try:
            row.update(llama_cpp_agreement(model, logits, ids, folder))
        except PruneError as err:
            row["export_refused"] = str(err)
    return row


def distance(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """Mean per-token KL(dense || pruned) of the next-token distributions, and top-1 agreement."""
    kl = torch.nn.functional.kl_div(pruned.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none")
    return {"kl_to_dense": float(kl.sum(-1).mean()), "top1_vs_dense": float((pruned.argmax(-1) == dense.argmax(-1))
                                                                            .float().mean())}


def served_cost(rows: list[dict]) -> list[dict]:
    """Per model, the llama.cpp result's KL to the dense model over the default's (1: no cost)."""
    out = []
    for row in rows:
        if row["run"] == "llamacpp 20%":
            default = next(r for r in rows if r["model"] == row["model"] and r["run"] == "bip 20%")
            out.append({"model": row["model"], "served_widths": "per-layer" if row["per_layer_config"] else "uniform",
                        "ratio_default": default["ratio"], "ratio_served": row["ratio"],
                        "kl_default": default["kl_to_dense"], "kl_served": row["kl_to_dense"],
                        "kl_served_over_default": row["kl_to_dense"] / default["kl_to_dense"],
                        "top1_default": default["top1_vs_dense"], "top1_served": row["top1_vs_dense"],
                        "llama_cpp_top1": row.get("llama_cpp_top1")})
    return out


def llama_cpp_agreement(model, logits: torch.Tensor, ids: torch.Tensor, folder: Path) -> dict:
    path = folder / "model.gguf"
    write_file(model, TOKEN_IDS_ONLY, path, "f32")
    with open_gguf(path, context=ids.shape[1], f32_cache=True) as runner:
        theirs = window_logits(runner, ids)
    return {"llama_cpp_max_rel_diff": float((theirs - logits).abs().max() / logits.abs().max()),
            "llama_cpp_top1": float((theirs.argmax(-1) == logits.argmax(-1)).float().mean())}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            for label, config in RUNS.items():
                rows.append(run(name, label, config, Path(tmp)))
                print(rows[-1], flush=True)
    columns = ["model", "run", "ratio", "per_layer_config", "reload_max_diff", "kl_to_dense", "top1_vs_dense",
               "llama_cpp_max_rel_diff", "llama_cpp_top1", "export_refused", "prune_s"]
    print(write_rows("family_shapes", rows, columns))
    cost = served_cost(rows)
    print(write_rows("family_served_cost", cost, list(cost[0])))


if __name__ == "__main__":
    main()
