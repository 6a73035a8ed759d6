"""Sharded safetensors I/O (shards.py): a sharded checkpoint's weights read back as saved, by name and shape
without the data, or whole; a file written whole or not at all; a sharded output assembled from block shards and
the checkpoint's other tensors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from llm_bip import shards
from llm_bip.errors import PruneError
from llm_bip.loading import empty_model
from llm_bip.outputs import SCORES_FILE, write_atomically
from llm_bip.shards import (
    INDEX_FILE,
    read_tensors,
    read_weights,
    save_sharded,
    stored_tensors,
    weight_files,
    write_tensors,
)
from llm_bip.testing import random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa", layers=2, scale=5.0)


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory) -> Path:
    """``model`` saved in many small shards, with a scores file beside them (not a weight)."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    model.save_pretrained(folder, max_shard_size="40KB")
    save_file({"layer1.heads": torch.ones(6)}, str(folder / SCORES_FILE))
    return folder


def test_weight_files_are_the_index_s_shards(sharded):
    listed = sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))
    assert len(listed) > 2
    assert weight_files(sharded) == [sharded / name for name in listed]


def test_weight_files_of_one_file_and_of_none(model, tmp_path):
    model.save_pretrained(tmp_path / "single")
    assert weight_files(tmp_path / "single") == [tmp_path / "single" / "model.safetensors"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruneError, match="no model.safetensors or model.safetensors.index.json"):
        weight_files(tmp_path / "empty")


def test_read_weights_round_trips_a_sharded_folder(model, sharded):
    state, read = model.state_dict(), read_weights(sharded)
    assert read.keys() == state.keys()
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_stored_tensors_and_read_tensors(model, sharded):
    """Each tensor's shard and shape from the headers; chosen tensors read in the dtype asked, and one no shard
    holds (a bias the engine added) as zeros."""
    stored = stored_tensors(sharded)
    state = model.state_dict()
    assert {name: shape for name, (_, shape) in stored.items()} == {name: t.shape for name, t in state.items()}
    assert {shard for shard, _ in stored.values()} == set(weight_files(sharded))
    wanted = {"model.layers.1.mlp.down_proj.weight": torch.empty(48, 64, dtype=torch.float64),
              "model.layers.1.mlp.down_proj.bias": torch.empty(48)}
    values = read_tensors(wanted, {name: shard for name, (shard, _) in stored.items()}, torch.device("cpu"))
    assert torch.equal(values["model.layers.1.mlp.down_proj.weight"],
                       state["model.layers.1.mlp.down_proj.weight"].double())
    assert torch.equal(values["model.layers.1.mlp.down_proj.bias"], torch.zeros(48))


def test_a_truncated_shard_is_named(sharded, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for path in sharded.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    broken = weight_files(copy)[1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(PruneError, match=f"{broken.name}: corrupted or truncated"):
        read_weights(copy)
    with pytest.raises(PruneError, match=f"{broken.name}: missing, corrupted or truncated"):
        stored_tensors(copy)


def test_write_tensors_round_trips_with_metadata(tmp_path):
    path = tmp_path / "block.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}  # "a" not contiguous
    write_tensors(path, tensors, {"next_block": "3"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"next_block": "3"}
        assert all(torch.equal(f.get_tensor(name), t) and f.get_tensor(name).dtype == t.dtype
                   for name, t in tensors.items())


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
def test_a_failed_write_leaves_the_earlier_file_and_no_partial_one(tmp_path, monkeypatch, failure):
    path = tmp_path / "block.safetensors"
    write_tensors(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def fails_midway(_tensors, filename, _metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(shards, "save_file", fails_midway)
    with pytest.raises(PruneError if isinstance(failure, OSError) else KeyboardInterrupt) as raised:
        write_tensors(path, {"w": torch.zeros(3)})
    if isinstance(failure, OSError):
        assert "cannot write" in str(raised.value) and "No space left on device" in str(raised.value)
    with pytest.raises(type(raised.value)):
        write_tensors(tmp_path / "new.safetensors", {"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["block.safetensors"]


def test_write_atomically_passes_other_errors_on_and_leaves_nothing(tmp_path):
    def fails(path: str) -> None:
        Path(path).write_text("partial")
        raise ValueError("not a tensor")

    with pytest.raises(ValueError, match="not a tensor"):
        write_atomically(tmp_path / "file.bin", fails)
    assert list(tmp_path.iterdir()) == []


def test_save_sharded_assembles_block_shards_and_the_checkpoint_s_other_tensors(model, sharded, tmp_path):
    """As an offloaded run writes its output: a skeleton (no weights in memory), each block from its own shard
    (hard-linked), everything else copied from the checkpoint. The folder loads as the model it came from."""
    skeleton = empty_model(model.config)
    stored = {name: shard for name, (shard, _) in stored_tensors(sharded).items()}
    (tmp_path / "work").mkdir()
    block_shards = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        block_shards[prefix] = tmp_path / "work" / f"{prefix}.safetensors"
        write_tensors(block_shards[prefix], layer.state_dict(prefix=f"{prefix}."))
    out = save_sharded(skeleton, None, tmp_path / "out", False, block_shards, stored)
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    for prefix, block_file in block_shards.items():
        names = {name for name in weight_map if name.startswith(f"{prefix}.")}
        assert names and {weight_map[name] for name in names} == {f"{prefix}.safetensors"}
        assert os.path.samefile(out / f"{prefix}.safetensors", block_file)
    state, read = model.state_dict(), read_weights(out)
    assert read.keys() == state.keys() and all(torch.equal(read[name], t) for name, t in state.items())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
