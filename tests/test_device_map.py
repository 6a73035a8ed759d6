"""--device-map: a model dispatched by accelerate prunes to exactly the units, weights, scores and logits of the
single-device run; clear one-line refusals. On a CPU-only machine the one real split is memory and disk (blocks
mapped to "disk" wait on the meta device and are read for each forward); CPU offloading beside a GPU is emulated
with accelerate's own hooks; maps over GPUs run where there are GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.hooks import attach_align_device_hook_on_blocks
from accelerate.utils import OffloadedWeightsLoader
from helpers import assert_fails_cleanly, prune_args, snapshot
from safetensors.torch import load_file

from llm_bip import PruneConfig, load_model, load_pruned, prune
from llm_bip.cli import main
from llm_bip.evaluation import model_digest
from llm_bip.outputs import SCORES_FILE, SUMMARY_FILE
from llm_bip.shards import read_weights
from llm_bip.testing import build_tokenizer, random_ids, tiny_model

OUTSIDE = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu"}
# memory and disk: blocks 1 and 3 and the LM head offloaded to the disk
SPLIT = {**OUTSIDE, "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.layers.3": "disk", "lm_head": "disk"}
CONFIGS = {
    "bip": [],  # llama: bias compensation into zero biases added to disk blocks, refit
    "global-sequential": ["--allocation", "global", "--normalize", "output", "--sequential", "--keep-dense", "0"],
    "wanda-sp": ["--method", "wanda-sp", "--ratio", "0.4"],
    "flap": ["--method", "flap"],
    "refit-selection": ["--selection", "refit"],
    "self-calibration": ["--calibration", "self"],  # the model samples its calibration text through the hooks
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random 4-block LLaMA (weights large enough that heads get cut) with a tokenizer."""
    folder = tmp_path_factory.mktemp("device-map") / "model"
    tiny_model("llama-gqa", layers=4, scale=5.0).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single(model_dir, calib_text_file, tmp_path_factory):
    """The single-device run's output for a config, computed once."""
    root, done = tmp_path_factory.mktemp("single"), {}

    def run(config: str, *extra: str) -> Path:
        if (config, extra) not in done:
            out = root / f"{config}-{len(done)}"
            assert main(prune_args(model_dir, out, calib_text_file, *CONFIGS[config], *extra)) == 0
            done[config, extra] = out
        return done[config, extra]

    return run


def assert_same_prune(expected: Path, got: Path) -> None:
    """``got`` holds what ``expected`` holds, bit for bit: weights, config, scores, the summary's units and
    parameter counts, and the reloaded model's logits."""
    want, have = read_weights(expected), read_weights(got)
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert have[name].dtype == tensor.dtype and torch.equal(have[name], tensor), name
    assert (got / "config.json").read_text() == (expected / "config.json").read_text()
    scores_want, scores_have = load_file(str(expected / SCORES_FILE)), load_file(str(got / SCORES_FILE))
    assert scores_have.keys() == scores_want.keys()
    assert all(torch.equal(scores_have[k], v) for k, v in scores_want.items())
    summary_want, summary_have = (json.loads((d / SUMMARY_FILE).read_text()) for d in (expected, got))
    for key in ("layers", "parameters", "perplexity"):
        assert summary_have[key] == summary_want[key], key
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(load_pruned(got)(ids).logits, load_pruned(expected)(ids).logits)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_memory_and_disk_split_prunes_as_one_device(monkeypatch, tmp_path_factory, model_dir, single, calib_text_file,
                                                    tmp_path, config):
    out, source = tmp_path / "out", snapshot(model_dir)
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path_factory.mktemp("cache")))  # each run samples "self" itself
    assert main(prune_args(model_dir, out, calib_text_file, *CONFIGS[config], "--device-map", json.dumps(SPLIT))) == 0
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path_factory.mktemp("cache")))
    assert_same_prune(single(config), out)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["device_map"] == {"requested": SPLIT, "placement": SPLIT}
    assert json.loads((single(config) / SUMMARY_FILE).read_text())["device_map"] is None
    assert snapshot(model_dir) == source, "the input model changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the offload folder outlived the run"
    if config == "wanda-sp":  # heads and K/V heads of the disk blocks are cut too (rows of q, k, v)
        assert all(layer["after"]["num_kv_heads"] < layer["before"]["num_kv_heads"] for layer in summary["layers"])


def test_perplexity_map_file_and_scores(model_dir, single, calib_text_file, tmp_path):
    """Perplexity before and after through the hooks (the cache digest reads the disk blocks); the map from a
    .json file; pruning from an earlier run's scores."""
    measured = ["--eval", str(calib_text_file), "--eval-max-tokens", "400", "--eval-seqlen", "32", "--no-cache"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    out = tmp_path / "out"
    assert main(prune_args(model_dir, out, calib_text_file, "--device-map", str(map_file), *measured)) == 0
    want = single("bip", *measured)  # the later --eval wins over prune_args' "--eval none"
    assert_same_prune(want, out)
    assert json.loads((out / SUMMARY_FILE).read_text())["perplexity"]["pruned"]["ppl"] > 1
    rescored = tmp_path / "rescored"
    assert main(prune_args(model_dir, rescored, calib_text_file, "--scores", str(want), "--ratio", "0.3",
                           "--device-map", json.dumps(SPLIT))) == 0
    assert_same_prune(single("bip", "--scores", str(want), "--ratio", "0.3"), rescored)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny random 4-block LLaMA whose LM head is its embedding, with a tokenizer."""
    folder = tmp_path_factory.mktemp("tied") / "model"
    model = tiny_model("llama-mha", layers=4, scale=5.0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_tied_embeddings_stay_tied(tied_dir, calib_text_file, tmp_path):
    """The LM head shares the embedding's weight, both on the disk; a hook that drops an offloaded tied weight
    after a forward unties it, and the output holds it once, as the single-device run's does."""
    model_dir, tied_on_disk = tied_dir, {**SPLIT, "model.embed_tokens": "disk"}
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    options = ["--method", "wanda-sp", "--eval", str(calib_text_file), "--eval-max-tokens", "200", "--eval-seqlen",
               "32", "--no-cache"]  # the LM head runs before the parameters are counted
    assert main(prune_args(model_dir, plain, calib_text_file, *options)) == 0
    argv = prune_args(model_dir, mapped, calib_text_file, *options, "--device-map", json.dumps(tied_on_disk))
    assert main(argv) == 0
    assert_same_prune(plain, mapped)
    assert "lm_head.weight" not in read_weights(mapped)


@pytest.mark.parametrize("apart", [{"lm_head": "disk"}, {"model.embed_tokens": "disk", "lm_head": "cpu"}])
def test_tied_weights_apart_with_the_disk_are_refused(capsys, tied_dir, calib_text_file, work, apart):
    out = work / "out"
    argv = prune_args(tied_dir, out, calib_text_file, "--device-map", json.dumps({**SPLIT, **apart}))
    assert_fails_cleanly(capsys, argv, out, [tied_dir], "--device-map", "lm_head.weight", "disk", "share one weight",
                         mid_write=True)


def test_cache_digest_reads_the_disk_blocks(model_dir, tmp_path):
    """A dispatched model's perplexity and self-calibration cache key is the single-device model's: the same
    weights, those on the disk read from it."""
    dispatched, _ = load_model(str(model_dir), device_map=SPLIT, offload_folder=tmp_path)
    assert dispatched.model.layers[1].self_attn.q_proj.weight.is_meta
    plain, _ = load_model(str(model_dir))
    assert model_digest(dispatched, {}).hexdigest() == model_digest(plain, {}).hexdigest()


def test_per_layer_folder_reprunes_as_one_device(single, calib_text_file, tmp_path):
    """A folder with per-layer widths is loaded whole, then dispatched by accelerate (dispatch_model)."""
    first = single("wanda-sp")
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    assert main(prune_args(first, plain, calib_text_file, "--ratio", "0.2")) == 0
    assert main(prune_args(first, mapped, calib_text_file, "--ratio", "0.2", "--device-map", json.dumps(SPLIT))) == 0
    assert_same_prune(plain, mapped)


def offload_to_cpu_memory(model, blocks: tuple[int, ...]) -> OffloadedWeightsLoader:
    """Hook ``model`` as accelerate's dispatch_model does for blocks mapped to "cpu" beside a GPU: their weights
    on the meta device, read from a CPU state dict for each forward (here the execution device is the CPU too).
    Returns the state dict's loader."""
    prefixes = [f"model.layers.{i}" for i in blocks]
    loader = OffloadedWeightsLoader(state_dict={k: v for k, v in model.state_dict().items()
                                                if any(k.startswith(f"{p}.") for p in prefixes)})
    names = [*OUTSIDE, "lm_head", *(f"model.layers.{i}" for i in range(model.config.num_hidden_layers))]
    attach_align_device_hook_on_blocks(model, execution_device={"": "cpu", **dict.fromkeys(names, "cpu")},
                                       offload={"": False, **{n: n in prefixes for n in names}}, weights_map=loader)
    return loader


def test_blocks_offloaded_to_cpu_memory_prune_as_in_memory():
    config = PruneConfig(reconstruct=True, n_samples=4, seqlen=16)
    calib, ids = random_ids(4, 16, seed=1), random_ids(2, 12)
    plain, dispatched = tiny_model("llama-gqa-bias", layers=4, scale=5.0), tiny_model("llama-gqa-bias", 4, scale=5.0)
    loader = offload_to_cpu_memory(dispatched, (1, 2))
    assert dispatched.model.layers[1].mlp.down_proj.weight.is_meta
    _, want = prune(plain, None, config, calib)
    _, got = prune(dispatched, None, config, calib)
    assert got.widths_after == want.widths_after and got.plans == want.plans
    assert all(torch.equal(got.record.scores[i].channels, want.record.scores[i].channels) for i in range(4))
    assert loader.state_dict["model.layers.1.mlp.down_proj.weight"].shape[1] == want.widths_after[1].intermediate_size
    with torch.no_grad():
        assert torch.equal(dispatched(ids).logits, plain(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_in_the_map_without_cuda_is_refused(capsys, model_dir, calib_text_file, work):
    out = work / "out"
    argv = prune_args(model_dir, out, calib_text_file, "--device-map", json.dumps({**SPLIT, "model.layers.1": 0}))
    assert_fails_cleanly(capsys, argv, out, [model_dir], "--device-map 'model.layers.1'", "no CUDA device")


@pytest.mark.parametrize("given,words", [
    ('{"model.layers.0": "cpu",', ["--device-map", "not valid JSON"]),
    ('["cpu"]', ["--device-map", "JSON object"]),
    ("{}", ["--device-map", "empty"]),
    ("everywhere", ["--device-map 'everywhere'", "auto", "JSON object"]),
    ('{"": "gpu"}', ["unknown --device-map", "gpu"]),
    ('{"": true}', ["--device-map", "no device"]),
    ('{"": "meta"}', ["--device-map", "cpu, cuda or mps"]),
])
def test_malformed_maps_are_refused(capsys, model_dir, calib_text_file, work, given, words):
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(model_dir, out, calib_text_file, "--device-map", given), out,
                         [model_dir], *words)


@pytest.mark.parametrize("extra,words", [
    (["--offload"], ["--device-map", "--offload", "one block at a time", "disk"]),
    (["--recover", "2"], ["--recover", "--device-map"]),
    (["--method", "llm-pruner"], ["llm-pruner", "gradients", "--device-map", "offloads"]),
])
def test_combinations_are_refused(capsys, model_dir, calib_text_file, work, extra, words):
    out = work / "out"
    argv = prune_args(model_dir, out, calib_text_file, "--device-map", json.dumps(SPLIT), *extra)
    assert_fails_cleanly(capsys, argv, out, [model_dir], *words, mid_write="--method" in extra)


def test_a_map_that_splits_a_block_is_refused(capsys, model_dir, calib_text_file, work):
    split_block = {**OUTSIDE, "lm_head": "cpu", "model.layers.0.self_attn": "cpu", "model.layers.0.mlp": "disk",
                   "model.layers.0.input_layernorm": "cpu", "model.layers.0.post_attention_layernorm": "cpu",
                   **{f"model.layers.{i}": "cpu" for i in (1, 2, 3)}}
    out = work / "out"
    argv = prune_args(model_dir, out, calib_text_file, "--device-map", json.dumps(split_block))
    assert_fails_cleanly(capsys, argv, out, [model_dir], "--device-map", "model.layers.0", "as a whole",
                         mid_write=True)


def test_cpu_only_maps_and_auto_load_on_one_device(model_dir):
    """A map onto one device needs no hooks (transformers then loads onto it); auto on a CPU-only machine too."""
    for device_map in ({"": "cpu"}, "auto"):
        model, _ = load_model(str(model_dir), device_map=device_map)
        assert not any(hasattr(m, "_hf_hook") for m in model.modules()) or torch.cuda.is_available()


CUDA_MAPS = {
    "gpu-and-cpu-memory": {"model.rotary_emb": 0, "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                           "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": 0, "lm_head": 0},
    "two-gpus": {"model.rotary_emb": 0, "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                 "model.layers.2": 0, "model.layers.3": 1, "model.norm": 1, "lm_head": 1},
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CUDA_MAPS))
def test_gpu_maps_prune_to_the_single_gpu_units(model_dir, calib_text_file, tmp_path, name):
    if name == "two-gpus" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    one, mapped = tmp_path / "one", tmp_path / "mapped"
    assert main(prune_args(model_dir, one, calib_text_file, "--device", "cuda:0")) == 0
    assert main(prune_args(model_dir, mapped, calib_text_file, "--device-map", json.dumps(CUDA_MAPS[name]))) == 0
    summaries = [json.loads((d / SUMMARY_FILE).read_text()) for d in (one, mapped)]
    assert summaries[1]["layers"] == summaries[0]["layers"] and summaries[1]["parameters"] == summaries[0]["parameters"]
    want, have = read_weights(one), read_weights(mapped)
    assert have.keys() == want.keys()
    assert all(torch.allclose(have[k], v, rtol=1e-4, atol=1e-5) for k, v in want.items())
