"""Loading and saving models: head counts a config class refuses, pruned-folder dispatch, atomic saves
(reload round trips for every family are in test_conformance.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_bip import PruneConfig, PruneError, load_pruned, prune, save_model
from llm_bip.loading import load_model
from llm_bip.outputs import OUTPUT_MARKER
from llm_bip.testing import VOCAB, build_model, random_ids, tiny_model


def pruned(variant, allocation):
    model = tiny_model(variant, scale=5.0)
    prune(model, None, PruneConfig(ratio=0.35, allocation=allocation, gqa="heads"), calib=random_ids())
    return model


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "gemma2", "phi3"])
def test_uniform_head_count_that_does_not_divide_hidden_size(architecture, tmp_path):
    """3 of 4 heads, hidden 32: LlamaConfig and Gemma2Config refuse 3 as their global head count, so such a
    folder holds per-layer widths (global fields valid); the other classes accept it and keep the stock fields."""
    model = build_model(architecture, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64)
    _, result = prune(model, None, PruneConfig(ratio=0.25, method="magnitude", allocation="uniform"))
    assert {w.num_heads for w in result.widths_after} == {3}
    save_model(model, None, tmp_path / "out", overwrite=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    stock = architecture not in ("llama", "gemma2")
    assert bool(config.get("per_layer_config")) != stock
    assert config["num_attention_heads"] == (3 if stock else 4)
    if stock:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    else:
        reloaded = load_pruned(tmp_path / "out")
    ids = random_ids(2, 12, seed=5)
    assert (reloaded(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_load_model_dispatches_pruned_folders(tmp_path):
    model = pruned("llama-gqa", "global")
    save_model(model, None, tmp_path / "out", overwrite=False)
    with pytest.raises(PruneError, match="cannot load model"):  # no tokenizer: load_model needs one, load_pruned not
        load_model(str(tmp_path / "out"))
    assert load_pruned(tmp_path / "out").config.is_heterogeneous


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = pruned("llama-gqa", "uniform")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    def failing_extras(_tmp):
        raise RuntimeError("disk full")

    with pytest.raises(PruneError, match="already exists"):
        save_model(model, None, out, overwrite=False)
    with pytest.raises(PruneError, match="not written by llm-bip"):  # overwrite replaces llm-bip's own outputs only
        save_model(model, None, out, overwrite=True)
    (out / OUTPUT_MARKER).write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, out, overwrite=True, extras=failing_extras)
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_model(model, None, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
