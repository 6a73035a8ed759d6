"""--calibration self: windows the model samples itself, deterministic for a seed, kept in the cache."""

from __future__ import annotations

import pytest
import torch

from llm_bip import PruneConfig, selfcalib
from llm_bip.errors import PruneError
from llm_bip.pruner import Pruner
from llm_bip.selfcalib import self_calibration_ids, start_token, windows_at_once
from llm_bip.testing import build_tokenizer, tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path))
    return tmp_path / "calibration"


@pytest.fixture(scope="module")
def model():
    return tiny_model(scale=5.0)


def test_windows_start_with_bos_and_depend_on_the_seed(cache, model):
    tokenizer = build_tokenizer()
    ids = self_calibration_ids(model, tokenizer, 5, 12, seed=0, batch_size=2)
    assert ids.shape == (5, 12) and ids.dtype == torch.int64
    assert (ids[:, 0] == tokenizer.bos_token_id).all() and (ids < len(tokenizer)).all()
    assert len(set(map(tuple, ids[:, 1:].tolist()))) == 5  # the windows differ from each other
    assert not torch.equal(ids, self_calibration_ids(model, tokenizer, 5, 12, seed=1, batch_size=2))
    for entry in cache.iterdir():
        entry.unlink()
    assert torch.equal(ids, self_calibration_ids(model, tokenizer, 5, 12, seed=0, batch_size=2))  # sampled again


def test_second_call_reads_the_cache(cache, model, monkeypatch):
    tokenizer = build_tokenizer()
    ids = self_calibration_ids(model, tokenizer, 3, 8, seed=0, batch_size=8)
    assert len(list(cache.glob("*.safetensors"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(selfcalib, "sample_windows", no_sampling)
    assert torch.equal(ids, self_calibration_ids(model, tokenizer, 3, 8, seed=0, batch_size=8))
    with pytest.raises(AssertionError, match="sampled again"):  # other weights: another entry
        self_calibration_ids(tiny_model(scale=5.0, seed=1), tokenizer, 3, 8, seed=0, batch_size=8)


def test_pruner_calibrates_on_the_models_own_text(cache, model):
    config = PruneConfig(calibration="self", n_samples=4, seqlen=10, batch_size=2)
    calib = Pruner(model, config).calibration(build_tokenizer())
    assert calib.shape == (4, 10)
    assert torch.equal(calib, self_calibration_ids(model, build_tokenizer(), 4, 10, seed=0, batch_size=2))


def test_start_token_without_bos_is_the_chat_templates_first():
    tokenizer = build_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(PruneError, match="neither"):
        start_token(tokenizer)
    tokenizer.chat_template = "</s>{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert start_token(tokenizer) == tokenizer.convert_tokens_to_ids("</s>")


def test_windows_at_once_keeps_the_kv_cache_within_the_weights(model):
    assert windows_at_once(model, seqlen=10**9, batch_size=3) == 3
    assert windows_at_once(model, seqlen=4, batch_size=3) > 3
