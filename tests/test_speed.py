"""bench-speed on tiny models: MAC counts checked by hand and against counted operations, the greedy
decode loop against generate(), the CLI's JSON and table, and its errors. Timings are recorded,
never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_fails_cleanly
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from llm_bip.cli import main
from llm_bip.loading import load_model
from llm_bip.outputs import SPEED_FILE, save_model
from llm_bip.pruner import PruneConfig, prune
from llm_bip.speed_macs import decode_context, macs_per_token, prefill_context
from llm_bip.speed_measure import decode_steps, start_decode
from llm_bip.testing import build_tokenizer, random_ids, tiny_model

TINY_MAX_POSITIONS = 64  # conftest's tiny model
FAST = ["--batch-sizes", "1,2", "--lengths", "8,16", "--decode-tokens", "3", "--prompt-length", "4",
        "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def model_dirs(calib_text_file, tmp_path_factory) -> tuple[Path, Path]:
    """Folders of a tiny model and of its pruned copy whose layers differ in heads and FFN channels."""
    root = tmp_path_factory.mktemp("speed")
    model, tokenizer = tiny_model("llama-mha", layers=3, scale=5.0), build_tokenizer()
    dense = save_model(model, tokenizer, root / "dense", overwrite=False)
    config = PruneConfig(ratio=0.3, allocation="global", normalize="none", calibration=str(calib_text_file),
                         n_samples=4, seqlen=16)
    _, result = prune(model, tokenizer, config)
    assert len({w.num_heads for w in result.widths_after}) > 1, "pruned layers should differ in head count"
    return dense, save_model(model, tokenizer, root / "pruned", overwrite=False)


def hooked_linear_macs(model, ids: torch.Tensor) -> float:
    """in * out per token of every nn.Linear call in one forward, counted by hooks."""
    count = 0

    def hook(module, inputs, output):
        nonlocal count
        count += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return count / ids.numel()


def decode_step_flops(model, prompt_length: int) -> int:
    """FLOPs torch counts for one eager-attention decode step at position prompt_length + 1."""
    model.set_attn_implementation("eager")  # attention as matmuls, which FlopCounterMode counts
    for layer in model.model.layers:  # a pruned folder's layers hold their own configs
        layer.self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        cache, token = start_decode(model, random_ids(1, prompt_length))
        with FlopCounterMode(display=False) as counter:
            model(token, cache=cache, use_cache=True)
    return counter.get_total_flops()


def test_macs_hand_count():
    model = tiny_model("llama-gqa", layers=3)  # hidden 48, 6 query / 2 KV heads of 8, FFN 64, vocab 96
    macs = macs_per_token(model, prefill_context(16))
    assert macs["context"] == 8.5
    assert macs["attention_linear"] == 3 * (48 * 48 + 48 * 16 + 48 * 16 + 48 * 48)
    assert macs["attention_products"] == 3 * 2 * 6 * 8 * 8.5  # scores and values, 6 heads of 8, 8.5 keys
    assert macs["ffn"] == 3 * 3 * 48 * 64
    assert macs["lm_head"] == 48 * 96
    assert macs["total"] == 18432 + 2448 + 27648 + 4608
    assert decode_context(prompt_length=4, steps=3) == 6  # steps at positions 5, 6, 7


def test_linear_macs_equal_hooked_count(model_dirs):
    for folder in model_dirs:
        model, _ = load_model(str(folder))
        macs = macs_per_token(model, 5)
        hooked = hooked_linear_macs(model, random_ids(2, 7, seed=1))
        assert hooked == macs["attention_linear"] + macs["ffn"] + macs["lm_head"] == macs_per_token(model, 0)["total"]


def test_macs_equal_counted_flops_of_a_decode_step(model_dirs):
    """Attention products included: one decode step after P prompt tokens attends to P + 1 keys."""
    dense, pruned = (load_model(str(folder))[0] for folder in model_dirs)
    for model in (dense, pruned):
        assert decode_step_flops(model, 6) == 2 * macs_per_token(model, 7)["total"]
    assert macs_per_token(pruned, 7)["total"] < macs_per_token(dense, 7)["total"]


def test_decode_loop_is_greedy_generation():
    model = tiny_model("llama-gqa", layers=2, scale=5)  # scaled: distinct logits, no argmax ties
    prompt = random_ids(2, 5)
    with torch.no_grad():
        cache, first = start_decode(model, prompt)
        tokens = torch.cat([first, decode_steps(model, cache, first, 6)], dim=1)
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7,
                                  min_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected[:, prompt.shape[1]:])


def test_cli_end_to_end(model_dirs, tmp_path, capsys):
    dense_dir, pruned_dir = model_dirs
    threads = torch.get_num_threads()
    out = tmp_path / "speed"
    try:
        rc = main(["bench-speed", str(dense_dir), str(pruned_dir), "--out", str(out), "--threads", "1", *FAST])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0
    results = json.loads((out / SPEED_FILE).read_text())
    assert results["torch_threads"] == 1 and results["settings"]["repeats"] == 1
    assert set(results["versions"]) >= {"torch", "transformers"} and results["cpu"]["logical_cores"] >= 1
    dense, pruned = results["models"]
    loaded = [load_model(str(f))[0] for f in model_dirs]
    params = [sum(p.numel() for p in m.parameters()) for m in loaded]
    assert [dense["params"], pruned["params"]] == params
    assert pruned["ratios"]["params"] == params[1] / params[0] < 1
    assert dense["ratios"] == {"params": 1.0, "linear_macs_per_token": 1.0, "peak_memory_mb": 1.0}
    assert pruned["ratios"]["linear_macs_per_token"] == pruned["linear_macs_per_token"] / dense["linear_macs_per_token"]
    assert [(e["batch"], e["length"]) for e in pruned["prefill"]] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    assert [e["batch"] for e in pruned["decode"]] == [1, 2]
    contexts = {"prefill": lambda e: prefill_context(e["length"]), "decode": lambda e: decode_context(4, 3)}
    for kind, context in contexts.items():
        for d, p in zip(dense[kind], pruned[kind]):
            assert d["mac_ratio"] == d["speedup"] == 1.0
            assert p["macs_per_token"] == macs_per_token(loaded[1], context(p))
            assert p["mac_ratio"] == p["macs_per_token"]["total"] / d["macs_per_token"]["total"] < 1
            assert p["speedup"] == p["tokens_per_s"] / d["tokens_per_s"]
            assert len(p["ms"]["runs"]) == 1 and p["ms"]["min"] == p["ms"]["median"] == p["ms"]["max"] > 0
    entry = pruned["prefill"][3]
    assert entry["tokens_per_s"] == pytest.approx(2 * 16 / (entry["ms"]["median"] / 1e3), rel=1e-4)  # ms rounded
    assert pruned["peak_memory_mb"] > 0 and pruned["weights_mb"] < dense["weights_mb"]
    table = (out / "speed.md").read_text()
    assert table in stdout
    assert table.count(f"| {pruned_dir} |") == 1 + 4 + 2  # sizes, 4 prefill settings, 2 decode batches


@pytest.mark.parametrize("extra,words", [
    (["--batch-sizes", "1,x"], ["--batch-sizes", "positive integers", "1,x"]),
    (["--lengths", "0,8"], ["--lengths", "positive integers"]),
    (["--lengths", "-8"], ["--lengths"]),
    (["--batch-sizes", ""], ["--batch-sizes"]),
    (["--decode-tokens", "0"], ["--decode-tokens", "positive"]),
    (["--repeats", "-1"], ["--repeats", "positive"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--threads", "0"], ["--threads"]),
    (["--lengths", str(TINY_MAX_POSITIONS + 1)], ["65 positions", "max_position_embeddings 64"]),
    (["--prompt-length", "60", "--decode-tokens", "8"], ["68 positions", "--prompt-length"]),
], ids=["bad-int", "zero", "negative", "empty", "decode-zero", "repeats", "warmup", "threads", "too-long",
        "decode-too-long"])
def test_cli_errors(capsys, tiny_model_dir, tmp_path, extra, words):
    out = tmp_path / "speed"
    assert_fails_cleanly(capsys, ["bench-speed", str(tiny_model_dir), "--out", str(out), *FAST, *extra], out,
                         [tiny_model_dir], *words)


def test_cli_missing_model_and_existing_output(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "speed"
    assert_fails_cleanly(capsys, ["bench-speed", str(tiny_model_dir), str(tmp_path / "nope"), "--out", str(out),
                                  *FAST], out, [tiny_model_dir], "nope", "no such file")
    out.mkdir()
    assert_fails_cleanly(capsys, ["bench-speed", str(tiny_model_dir), "--out", str(out), *FAST], out,
                         [tiny_model_dir], "already exists", "--overwrite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_cuda_without_gpu(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "speed"
    assert_fails_cleanly(capsys, ["bench-speed", str(tiny_model_dir), "--out", str(out), "--device", "cuda"], out,
                         [tiny_model_dir], "--device cuda", "no cuda device")
