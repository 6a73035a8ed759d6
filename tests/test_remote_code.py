"""Folders with per-layer widths load in stock transformers without llm-bip: they carry a modelling file named
in config.json's auto_map, ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them in
a fresh process where llm_bip cannot be imported, to logits equal to ``load_pruned``'s; uniform folders stay
stock, and llm-bip's own loading never runs the file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import prune_args
from transformers import AutoModelForCausalLM

from llm_bip import PruneConfig, load_pruned, prune, save_model
from llm_bip.cli import main
from llm_bip.remote_code import AUTO_MAP, MODELING_FILE, add_remote_code
from llm_bip.testing import ARCHITECTURES, SAVED_VOCAB, VARIANTS, random_ids, tiny_model

# every family, and in some the shapes that differ: MQA, biases, wide heads, fused projections
PER_LAYER = ["llama-mqa", "llama-gqa-bias", "mistral-gqa", "qwen2-gqa", "qwen3-wide", "smollm3-gqa-bias",
             "gemma2-mqa", "gemma3-gqa", "phi3-mha", "olmo2-gqa"]
OFFLOADED = "offloaded"  # `llm-bip prune --offload` of the tiny Llama: the sharded writer (shards.save_sharded)
IDS = random_ids(2, 12, seed=5) % SAVED_VOCAB  # inside every model's vocabulary, the saved tiny Llama's too
LOADER = Path(__file__).with_name("stock_loader.py")


def pruned_globally(variant: str):
    """A tiny model of ``variant`` pruned with global allocation: its layers' widths differ."""
    model = tiny_model(variant, scale=5.0)
    prune(model, None, PruneConfig(ratio=0.35, allocation="global", gqa="heads"), calib=random_ids())
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_model_dir, calib_text_file) -> Path:
    """The per-layer folders (``PER_LAYER`` and ``OFFLOADED``, by name) under the returned folder, and
    ``logits/<name>.pt``: each one's logits on ``IDS`` from stock transformers in one fresh process."""
    root = tmp_path_factory.mktemp("per-layer")
    for variant in PER_LAYER:
        save_model(pruned_globally(variant), None, root / variant, overwrite=False)
    assert main(prune_args(tiny_model_dir, root / OFFLOADED, calib_text_file, "--offload")) == 0
    (root / "logits").mkdir()
    torch.save(IDS, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no llm-bip source tree on the path
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1")  # where transformers copies the file
    folders = [str(root / name) for name in [*PER_LAYER, OFFLOADED]]
    run = subprocess.run([sys.executable, str(LOADER), str(root / "ids.pt"), str(root / "logits"), *folders],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return root


def test_every_family_is_covered():
    assert {VARIANTS[v][0] for v in PER_LAYER} == set(ARCHITECTURES)


@pytest.mark.parametrize("name", [*PER_LAYER, OFFLOADED])
def test_stock_transformers_loads_per_layer_folders(name, loaded):
    """Bit for bit: the same modules, built to the same shapes, with the same float32 weights, run on the same CPU
    kernels, so any difference at all would mean a different model (it is not a tolerance question)."""
    folder = loaded / name
    config = json.loads((folder / "config.json").read_text())
    assert config["per_layer_config"] and config["auto_map"] == AUTO_MAP
    stock_class = config["architectures"][0]
    assert f"from transformers import {stock_class} as StockForCausalLM" in (folder / MODELING_FILE).read_text()
    model = load_pruned(folder)
    assert type(model).__name__ == stock_class and type(model).__module__.startswith("transformers.models.")
    with torch.no_grad():
        expected = model(IDS).logits
    got = torch.load(loaded / "logits" / f"{name}.pt")
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)


def test_without_trust_remote_code_transformers_refuses(loaded):
    """auto_map does not make transformers run the file uninvited: it builds the family's own class, at the
    global widths, and refuses the weights of other shapes (it never loads wrong weights)."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(loaded / "llama-mqa")


def test_resaving_a_per_layer_folder_keeps_the_file(loaded, tmp_path):
    model = load_pruned(loaded / "gemma2-mqa")
    save_model(model, None, tmp_path / "again", overwrite=False)
    for name in ("config.json", MODELING_FILE):
        assert (tmp_path / "again" / name).read_text() == (loaded / "gemma2-mqa" / name).read_text()


def test_uniform_folders_stay_stock(tmp_path):
    model = tiny_model("qwen3-gqa", scale=5.0)
    prune(model, None, PruneConfig(ratio=0.35, allocation="uniform", gqa="heads"), calib=random_ids())
    save_model(model, None, tmp_path / "out", overwrite=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "per_layer_config" not in config and "auto_map" not in config
    assert not (tmp_path / "out" / MODELING_FILE).exists()


def test_a_stock_config_loses_only_our_auto_map_entry(tmp_path):
    """A config read from a per-layer folder keeps its auto_map; written again with uniform widths, the entry
    naming our file goes (the folder holds no such file), any other stays."""
    other = {"AutoTokenizer": "tokenization_x.XTokenizer"}
    for before, after in ((AUTO_MAP, None), ({**AUTO_MAP, **other}, other)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": before}))
        add_remote_code(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text()).get("auto_map") == after
        assert not (tmp_path / MODELING_FILE).exists()
