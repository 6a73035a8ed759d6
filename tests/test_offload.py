"""--offload: one block in memory at a time, the same output as an in-memory run bit for bit;
--resume after an interruption anywhere gives that output too; clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_fails_cleanly, assert_same_output, prune_args, snapshot

from llm_bip import PruneConfig, load_pruned, progress, run_prune, shards
from llm_bip.cli import main
from llm_bip.testing import build_tokenizer, random_ids, tiny_model

CONFIGS = {
    "bip": [],  # llama: bias compensation on, exact head scores
    "global": ["--allocation", "global", "--normalize", "output", "--keep-dense", "0"],
    "flap": ["--method", "flap"],
    "sequential": ["--sequential", "--allocation", "global"],
    "bf16": ["--dtype", "bfloat16", "--method", "wanda-sp", "--ratio", "0.3"],
    "reconstruct": ["--reconstruct"],
    "reconstruct-sequential": ["--reconstruct", "--sequential", "--allocation", "global", "--method", "wanda-sp"],
}


def save_sharded(folder: Path, variant: str, tied: bool = False) -> Path:
    """A tiny random 4-block model in many small shards (model.safetensors.index.json), with a tokenizer."""
    model = tiny_model(variant, layers=4, scale=5.0)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(folder, max_shard_size="40KB")
    build_tokenizer().save_pretrained(folder)
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 4
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    return {"gqa": save_sharded(root / "gqa", "llama-gqa"), "tied": save_sharded(root / "tied", "llama-mha", True),
            "bias": save_sharded(root / "bias", "llama-gqa-bias")}


@pytest.fixture(scope="module")
def in_memory(models, calib_text_file, tmp_path_factory):
    """The in-memory run's output for (model, config), computed once."""
    root, done = tmp_path_factory.mktemp("in-memory"), {}

    def run(model: str, config: str) -> Path:
        if (model, config) not in done:
            out = root / f"{model}-{config}"
            assert main(prune_args(models[model], out, calib_text_file, *CONFIGS[config])) == 0
            done[model, config] = out
        return done[model, config]

    return run


def offloaded(models, model: str, out: Path, calib: Path, config: str, *extra: str) -> list[str]:
    return prune_args(models[model], out, calib, *CONFIGS[config], "--offload", *extra)


@pytest.mark.parametrize("model,config", [("gqa", "bip"), ("gqa", "global"), ("gqa", "flap"),
                                          ("tied", "sequential"), ("tied", "bf16"), ("bias", "bip"),
                                          ("gqa", "reconstruct"), ("tied", "reconstruct-sequential")])
def test_offloaded_prune_equals_in_memory(models, in_memory, calib_text_file, tmp_path, model, config):
    out, source = tmp_path / "out", snapshot(models[model])
    assert main(offloaded(models, model, out, calib_text_file, config)) == 0
    assert_same_output(in_memory(model, config), out)
    assert snapshot(models[model]) == source, "the input model changed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) >= {f"model.layers.{i}.safetensors" for i in range(4)}
    assert not (tmp_path / "out.partial").exists(), "the work folder outlived the run"
    ids = random_ids(2, 12)
    with torch.no_grad():
        got, want = load_pruned(out).eval()(ids).logits, load_pruned(in_memory(model, config)).eval()(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("source,extra", [
    ("per-layer", ["--ratio", "0.3", "--allocation", "global"]),  # a pruned folder, one model.safetensors
    ("scores", ["--ratio", "0.3"]),  # pruning again from an earlier run's scores
])
def test_offloaded_reprune_equals_in_memory(models, in_memory, calib_text_file, tmp_path, source, extra):
    model = in_memory("gqa", "global") if source == "per-layer" else models["gqa"]
    assert source != "per-layer" or json.loads((model / "config.json").read_text())["per_layer_config"]
    if source == "scores":
        extra = [*extra, "--scores", str(in_memory("gqa", "bip"))]
    assert main(prune_args(model, tmp_path / "memory", calib_text_file, *extra)) == 0
    assert main(prune_args(model, tmp_path / "offload", calib_text_file, *extra, "--offload")) == 0
    assert_same_output(tmp_path / "memory", tmp_path / "offload")


def test_tied_embeddings_stay_tied(models, calib_text_file, tmp_path):
    out = tmp_path / "out"
    assert main(offloaded(models, "tied", out, calib_text_file, "bf16")) == 0
    assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    model = load_pruned(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


class Interrupt:
    """Ctrl-C at the n-th file the offloaded run writes (progress, cut blocks, output shards)."""

    def __init__(self, monkeypatch, n: int):
        self.left, self.save_file = n, shards.save_file
        monkeypatch.setattr(shards, "save_file", self)

    def __call__(self, *args, **kwargs):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.save_file(*args, **kwargs)


# writes of a 4-block run: 4 progress markers, 4 cut blocks, 3 output shards; sequential or reconstruct: 4
# markers of the dense scoring pass, then a cut block and a marker per block (6, 8: a block written, its marker not)
@pytest.mark.parametrize("config,n", [("bip", 2), ("bip", 6), ("bip", 10), ("sequential", 8), ("reconstruct", 6),
                                      ("reconstruct", 7), ("reconstruct-sequential", 8)],
                         ids=["scoring", "surgery", "output", "sequential", "reconstruct-marker", "reconstruct-block",
                              "reconstruct-sequential"])
def test_resume_after_interruption_equals_uninterrupted(monkeypatch, models, in_memory, calib_text_file, tmp_path,
                                                        config, n):
    out = tmp_path / "out"
    interrupt = Interrupt(monkeypatch, n)
    assert main(offloaded(models, "gqa", out, calib_text_file, config)) == 130
    assert interrupt.left == 0 and not out.exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.undo()
    assert main(offloaded(models, "gqa", out, calib_text_file, config, "--resume")) == 0
    assert_same_output(in_memory("gqa", config), out)
    assert not (tmp_path / "out.partial").exists()


def test_python_api_offloads_and_resumes(monkeypatch, models, in_memory, calib_text_file, tmp_path):
    out, config = tmp_path / "out", PruneConfig(calibration=str(calib_text_file), n_samples=4, seqlen=16)
    Interrupt(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run_prune(str(models["gqa"]), out, config, offload=True)
    monkeypatch.undo()
    summary = run_prune(str(models["gqa"]), out, config, offload=True, resume=True)
    assert summary["offload"] and summary["perplexity"] == {}
    assert_same_output(in_memory("gqa", "bip"), out)


@pytest.mark.parametrize("config", ["bip", "sequential"])
def test_in_memory_runs_keep_no_progress(monkeypatch, models, calib_text_file, tmp_path, config):
    def refuse(*_args, **_kwargs):
        raise AssertionError("an in-memory run kept progress")

    monkeypatch.setattr(progress.ProgressStore, "__init__", refuse)
    monkeypatch.setattr(shards, "save_file", refuse)
    assert main(prune_args(models["gqa"], tmp_path / "out", calib_text_file, *CONFIGS[config])) == 0
    assert not (tmp_path / "out.partial").exists()


@pytest.fixture
def interrupted(monkeypatch, models, calib_text_file, tmp_path) -> Path:
    """--out of an offloaded run interrupted during scoring; its work is in out.partial."""
    out = tmp_path / "work" / "out"
    Interrupt(monkeypatch, 3)
    assert main(offloaded(models, "gqa", out, calib_text_file, "bip")) == 130
    monkeypatch.undo()
    return out


def test_stale_work_is_refused_without_resume(capsys, models, calib_text_file, interrupted):
    argv = offloaded(models, "gqa", interrupted, calib_text_file, "bip")
    assert_fails_cleanly(capsys, argv, interrupted, [models["gqa"]], "out.partial", "--resume", "--overwrite")


def test_overwrite_starts_over(models, in_memory, calib_text_file, interrupted):
    assert main(offloaded(models, "gqa", interrupted, calib_text_file, "bip", "--overwrite")) == 0
    assert_same_output(in_memory("gqa", "bip"), interrupted)


@pytest.mark.parametrize("extra,words", [
    (["--ratio", "0.3"], ["other settings", "ratio 0.2 (asked: 0.3)"]),
    (["--samples", "5"], ["other settings", "n_samples"]),
    (["--dtype", "bfloat16"], ["other settings", "dtype"]),
])
def test_resume_with_other_settings_is_refused(capsys, models, calib_text_file, interrupted, extra, words):
    argv = offloaded(models, "gqa", interrupted, calib_text_file, "bip", "--resume", *extra)
    assert_fails_cleanly(capsys, argv, interrupted, [models["gqa"]], "--resume", *words)


@pytest.mark.parametrize("extra,words", [
    (["--offload", "--method", "llm-pruner"], ["llm-pruner", "gradients", "--offload"]),
    (["--offload", "--calibration", "self"], ["--calibration self", "whole model", "--offload"]),
    (["--offload", "--resume"], ["--resume", "no unfinished offloaded run"]),
    (["--resume"], ["--resume", "--offload"]),
    (["--offload", "--eval", "ptb"], ["--offload", "perplexity", "llm-bip eval"]),
])
def test_refusals(capsys, models, calib_text_file, work, extra, words):
    out = work / "out"  # --eval ptb overrides the --eval none of prune_args
    assert_fails_cleanly(capsys, prune_args(models["gqa"], out, calib_text_file, *extra), out, [models["gqa"]], *words)
