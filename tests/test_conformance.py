"""The conformance suite every architecture adapter passes, over tiny random models of every family built
in-process (llm_bip.testing.VARIANTS: MHA, GQA and MQA where the family has them, with and without biases,
Gemma's 256-wide heads over one KV head, Qwen3's 128-wide heads, sliding-window layers next to global ones).

Each block is fed the keyword arguments the model gives it; pruned equals masked; the FFN score is the
exact change (a bound through an output norm) and the certified head score bounds the change, against
brute force over every unit; save and reload give the same logits; offload equals in-memory bit for bit;
compensation keeps the mean output where the family can hold biases; the ratio asked is obtained; every
method prunes or refuses in one line; every family has a llama.cpp layout, and per-layer widths are refused
where that layout holds one width.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_same_output, prune_args
from transformers import AutoModelForCausalLM

from llm_bip import PruneConfig, PruneError, load_pruned, prune, run_export, save_model
from llm_bip.adapters import adapter_for, supported_model_types
from llm_bip.calibration import capture_block_inputs, forward_block
from llm_bip.cli import main
from llm_bip.gguf_layouts import LAYOUTS
from llm_bip.methods import METHODS
from llm_bip.metrics import ScoreOptions, make_metric
from llm_bip.pruner import note_heads_kept
from llm_bip.surgery import head_channels
from llm_bip.testing import ARCHITECTURES, VARIANTS, build_tokenizer, output_change, random_ids, tiny_model
from llm_bip.testing import block_setup as scored_block

ALL = sorted(VARIANTS)
ONE_PER_FAMILY = sorted({architecture: name for name, (architecture, _) in reversed(VARIANTS.items())}.values())


def test_every_supported_family_is_tested():
    assert sorted(ARCHITECTURES) == supported_model_types()
    assert {VARIANTS[v][0] for v in ONE_PER_FAMILY} == set(ARCHITECTURES)


# --------------------------------------------------------------------------- calibration inputs


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_blocks_run_alone_reproduce_the_model(variant):
    """Block by block from the captured inputs, each with its own keyword arguments (sliding-window and
    global layers differ in mask and rotary table), the stack computes what the model computes."""
    model = tiny_model(variant, layers=3, scale=3.0)
    adapter, ids = adapter_for(model.config), random_ids(4, 16)
    layers = adapter.layers(model)
    seen = []
    handle = layers[-1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    inputs = capture_block_inputs(model, layers, ids, batch_size=2)
    for i in range(len(layers)):
        inputs = forward_block(adapter.block(model, i), inputs)
    assert torch.equal(torch.cat([h for h, _ in inputs]), seen[0])


# --------------------------------------------------------------------------- scores against brute force


def block_setup(variant: str):
    """Block 2 of a 3-block float64 model (testing.block_setup): a sliding-window block in the mixed families."""
    return scored_block(variant, layer=2, layers=3)


@pytest.mark.parametrize("variant", ALL)
def test_ffn_channel_score_against_brute_force(variant):
    """Every channel: the score is the block output's exact change, or (through an FFN output norm) bounds it."""
    view, inputs, stats, y = block_setup(variant)
    scores = make_metric("bip", ScoreOptions()).score(view, stats, view.index).channels
    changes = torch.tensor([output_change(view, inputs, y, view.down.weight, [j])
                            for j in range(view.widths.intermediate_size)], dtype=torch.float64)
    assert (changes > 0).all()
    if view.ffn_out_norm is None:
        assert torch.allclose(scores, changes, rtol=1e-6)
    else:
        assert (changes <= scores).all()


@pytest.mark.parametrize("variant", [v for v in ALL if VARIANTS[v][0] != "olmo2"])
def test_certified_head_score_bounds_removal(variant):
    view, inputs, stats, y = block_setup(variant)
    bounds = make_metric("bip", ScoreOptions(lipschitz="certified")).score(view, stats, view.index).heads
    for h in range(view.widths.num_heads):
        change = output_change(view, inputs, y, view.o.weight, head_channels([h], view.head_dim))
        assert 0 < change <= float(bounds[h])


@pytest.mark.parametrize("variant", [v for v in ALL if VARIANTS[v][0] in ("gemma2", "gemma3_text")])
def test_attention_channel_bounds_bound_the_residual_change(variant):
    """Through Gemma's attention output norm: a head's channel bounds add up to a bound on the change of the
    residual the FFN reads."""
    view, inputs, stats, _ = block_setup(variant)
    bounds = make_metric("bip", ScoreOptions(lipschitz="none")).score(view, stats, view.index).heads
    seen = []
    handle = view.attn_out_norm.module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        forward_block(view, inputs)
        for h in range(view.widths.num_heads):
            cols = head_channels([h], view.head_dim)
            saved = view.o.weight.data.clone()
            view.o.weight.data[:, cols] = 0
            forward_block(view, inputs)
            view.o.weight.data.copy_(saved)
    handle.remove()
    batches = len(inputs)
    dense = torch.cat(seen[:batches])
    for h in range(view.widths.num_heads):
        change = float((torch.cat(seen[batches * (h + 1):batches * (h + 2)]) - dense).norm())
        assert 0 < change <= float(bounds[h])


# --------------------------------------------------------------------------- surgery, reload, offload


def masked_copy(model, result):
    """The dense model with the removed units' output columns zeroed (o_proj / down_proj)."""
    masked = copy.deepcopy(model)
    adapter = adapter_for(masked.config)
    with torch.no_grad():
        for i, plan in result.plans.items():
            view = adapter.block(masked, i)
            before = result.widths_before[i]
            drop_heads = sorted(set(range(before.num_heads)) - set(plan.keep_heads))
            drop_ch = sorted(set(range(before.intermediate_size)) - set(plan.keep_channels))
            view.o.weight[:, head_channels(drop_heads, view.head_dim)] = 0
            view.down.weight[:, drop_ch] = 0
    return masked


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("allocation,gqa", [("uniform", "groups"), ("uniform", "heads"), ("global", "heads")])
def test_pruned_equals_masked(variant, allocation, gqa):
    model = tiny_model(variant, scale=5.0)
    dense = copy.deepcopy(model)
    ids = random_ids()
    _, result = prune(model, None, PruneConfig(ratio=0.4, method="random", allocation=allocation, gqa=gqa), calib=ids)
    assert result.params["blocks_after"] < result.params["blocks_before"]
    expected = masked_copy(dense, result)(ids).logits
    scale = max(1.0, float(expected.detach().abs().max()))  # float32 sums over 1024-wide heads round at ~1e-6 of it
    assert torch.allclose(model(ids).logits, expected, atol=1e-5 * scale)
    # and the masking really changed something, so the comparison is not vacuous
    assert not torch.allclose(dense(ids).logits, expected, atol=1e-3)


@pytest.mark.parametrize("variant", ALL)
def test_shapes_after_surgery(variant):
    model = tiny_model(variant)
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", gqa="heads"))
    adapter = adapter_for(model.config)
    for i, widths in enumerate(result.widths_after):
        view = adapter.block(model, i)
        hd, d = view.head_dim, view.hidden_size
        assert view.widths == widths
        assert view.q.weight.shape == (widths.num_heads * hd, d)
        assert view.k.weight.shape == view.v.weight.shape == (widths.num_kv_heads * hd, d)
        assert view.o.weight.shape == (d, widths.num_heads * hd)
        assert view.gate.weight.shape == view.up.weight.shape == (widths.intermediate_size, d)
        assert view.down.weight.shape == (d, widths.intermediate_size)
        assert widths.num_heads % widths.num_kv_heads == 0
        assert view.attention.num_key_value_groups == widths.num_heads // widths.num_kv_heads
        if view.q.bias is not None:
            assert view.q.bias.shape == (widths.num_heads * hd,)
            assert view.k.bias.shape == (widths.num_kv_heads * hd,)
    params = sum(adapter.block(model, i).prunable_parameters() for i in range(len(result.widths_after)))
    assert params == result.params["blocks_after"]


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_save_and_reload_give_the_same_logits(variant, allocation, tmp_path):
    """Uniform widths reload with stock ``from_pretrained``; per-layer ones with ``load_pruned``."""
    model = tiny_model(variant, scale=5.0)
    prune(model, None, PruneConfig(ratio=0.35, allocation=allocation, gqa="heads"), calib=random_ids())
    save_model(model, None, tmp_path / "out", overwrite=False)
    per_layer = bool(json.loads((tmp_path / "out" / "config.json").read_text()).get("per_layer_config"))
    assert per_layer == model.config.is_heterogeneous
    if per_layer:
        reloaded = load_pruned(tmp_path / "out")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_offload_equals_in_memory(variant, calib_text_file, tmp_path):
    """The default method (global, reconstruction, compensation where the family allows) offloaded and in
    memory: the same output bit for bit."""
    source = tmp_path / "model"
    tiny_model(variant, layers=3, scale=5.0).save_pretrained(source, max_shard_size="40KB")
    build_tokenizer().save_pretrained(source)
    for out, extra in (("memory", []), ("offload", ["--offload"])):
        assert main(prune_args(source, tmp_path / out, calib_text_file, "--ratio", "0.3", *extra)) == 0
    assert_same_output(tmp_path / "memory", tmp_path / "offload")


# --------------------------------------------------------------------------- compensation, ratio, methods


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_compensation_keeps_the_mean_output_or_is_refused(variant):
    """FFN channels only (too small a ratio for an attention unit): the compensated block's mean output is the
    dense one's, where the family can hold output biases; elsewhere a one-line refusal."""
    dense = tiny_model(variant, layers=2, scale=5.0).double()
    adapter, ids = adapter_for(dense.config), random_ids()
    config = PruneConfig(ratio=0.04, compensate=True, keep_dense=[1], reconstruct=False)
    if not adapter.bias_flags:
        with pytest.raises(PruneError, match="--no-compensate"):
            prune(copy.deepcopy(dense), None, config, calib=ids)
        return
    inputs = capture_block_inputs(dense, adapter.layers(dense), ids, batch_size=2)
    target = torch.cat([o for o, _ in forward_block(adapter.block(dense, 0), inputs)]).flatten(0, 1).mean(0)
    model = copy.deepcopy(dense)
    _, result = prune(model, None, config, calib=ids)
    assert result.widths_after[0].num_heads == result.widths_before[0].num_heads
    assert result.widths_after[0].intermediate_size < result.widths_before[0].intermediate_size
    kept = torch.cat([o for o, _ in forward_block(adapter.block(model, 0), inputs)]).flatten(0, 1).mean(0)
    assert torch.allclose(kept, target, atol=1e-10)


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("allocation", ["uniform", "block", "global"])
def test_the_ratio_asked_is_obtained(variant, allocation):
    """Within one FFN channel per block (with its biases: compensation adds them)."""
    model = tiny_model(variant, layers=3, scale=5.0)
    channel = 3 * model.config.hidden_size + 3  # gate and up rows, a down column, their biases
    _, result = prune(model, None, PruneConfig(ratio=0.3, allocation=allocation), calib=random_ids())
    assert abs(result.block_ratio - 0.3) * result.params["blocks_before"] <= 3 * channel


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_or_refuses_clearly(variant, method):
    model = tiny_model(variant, layers=3, scale=5.0)
    adapter = adapter_for(model.config)
    config = PruneConfig(ratio=0.3, method=method)
    if config.resolved().compensate is True and not adapter.bias_flags:
        with pytest.raises(PruneError, match="bias compensation needs output biases.*--no-compensate"):
            prune(model, None, config, calib=random_ids())
        return
    _, result = prune(model, None, config, calib=random_ids())
    assert abs(result.block_ratio - 0.3) < 0.03
    assert model(random_ids()).logits.isfinite().all()


def test_heads_stay_where_a_norm_spans_them(capsys):
    """OLMo 2's q/k norms span every head: all heads stay, FFN channels make the whole ratio, and a note says so."""
    model = tiny_model("olmo2-gqa", layers=3, scale=5.0)
    note_heads_kept.cache_clear()  # noted once per process: maybe by an earlier test
    _, result = prune(model, None, PruneConfig(ratio=0.3, allocation="uniform"), calib=random_ids())
    assert all(a.num_heads == b.num_heads and a.num_kv_heads == b.num_kv_heads
               for a, b in zip(result.widths_after, result.widths_before))
    assert abs(result.block_ratio - 0.3) < 0.03
    assert "keep every attention head" in capsys.readouterr().err
    with pytest.raises(PruneError, match="certified.*OLMo 2"):
        prune(tiny_model("olmo2-gqa"), None, PruneConfig(lipschitz="certified"), calib=random_ids())


# --------------------------------------------------------------------------- export


def test_every_family_has_a_gguf_layout():
    """Which llama.cpp layout each family exports to; the logits llama.cpp computes are tested in
    test_gguf_export.py for every family."""
    assert sorted(LAYOUTS) == supported_model_types()


@pytest.mark.parametrize("variant", [v for v in ONE_PER_FAMILY if LAYOUTS[VARIANTS[v][0]][1] is None])
def test_gguf_export_refuses_per_layer_widths_where_llama_cpp_holds_one(variant, tmp_path):
    model = tiny_model(variant, scale=5.0)
    config = PruneConfig(ratio=0.35, allocation="global", gqa="heads", compensate=False, reconstruct=False)
    prune(model, None, config, calib=random_ids())
    assert model.config.is_heterogeneous
    save_model(model, build_tokenizer(), tmp_path / "model", overwrite=False)
    with pytest.raises(PruneError, match="one head count and one FFN width.*--allocation uniform"):
        run_export(str(tmp_path / "model"), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("variant,targets", [
    ("phi3-gqa", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("gemma2-gqa", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_lora_targets_are_the_family_s_projections(variant, targets):
    from llm_bip.training import lora_targets

    assert lora_targets(tiny_model(variant)) == targets
