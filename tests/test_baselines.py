"""Baseline metrics against hand-computed values, LLM-Pruner gradients against autograd,
bias compensation, rankings and method presets (the kept units against each baseline's reference
arithmetic: test_reference_baselines.py)."""

import copy

import pytest
import torch

from llm_bip import PruneConfig, PruneError, prune
from llm_bip.adapters import Rows, adapter_for
from llm_bip.calibration import accumulate_lm_gradients, capture_block_inputs, collect_block_stats
from llm_bip.metrics import ScoreOptions, UnitScores, make_metric
from llm_bip.ranking import ranking_keys
from llm_bip.testing import random_ids, tiny_model
from llm_bip.units import BlockCosts, block_units


def block_inputs(model, ids):
    """Block 0's view, inputs, stats, and the exact o_proj / down_proj inputs over all tokens."""
    view = adapter_for(model.config).block(model, 0)
    inputs = capture_block_inputs(model, adapter_for(model.config).layers(model), ids, batch_size=2)
    seen = {"o": [], "down": []}
    hooks = [view.o.register_forward_pre_hook(lambda _m, a: seen["o"].append(a[0].flatten(0, 1))),
             view.down.register_forward_pre_hook(lambda _m, a: seen["down"].append(a[0].flatten(0, 1)))]
    stats, outputs = collect_block_stats(view, inputs)
    for h in hooks:
        h.remove()
    return view, inputs, stats, torch.cat(seen["o"]).double(), torch.cat(seen["down"]).double(), outputs


@pytest.fixture
def setup():
    model = tiny_model("llama-gqa", layers=2, scale=5.0).double()
    return model, *block_inputs(model, random_ids())


def test_wanda_sp_by_hand(setup):
    _, view, _, stats, x, a, _ = setup
    s = make_metric("wanda-sp", ScoreOptions()).score(view, stats, 0)
    w_o, w_d = view.o.weight.detach().double(), view.down.weight.detach().double()
    per_col = w_o.abs().sum(0) * x.norm(dim=0)
    assert torch.allclose(s.heads, per_col.view(-1, view.head_dim).sum(1), rtol=1e-6)
    assert torch.allclose(s.channels, w_d.abs().sum(0) * a.norm(dim=0), rtol=1e-6)


def test_flap_fluctuation_by_hand(setup):
    _, view, _, stats, x, a, _ = setup
    s = make_metric("flap", ScoreOptions()).score(view, stats, 0)
    w_o, w_d = view.o.weight.detach().double(), view.down.weight.detach().double()
    per_col = (x.var(0, unbiased=False) * w_o.pow(2).sum(0)) ** 2  # attention: squared once more
    assert torch.allclose(s.attn_channels, per_col, rtol=1e-6)
    assert torch.allclose(s.heads, per_col.view(-1, view.head_dim).sum(1), rtol=1e-6)
    assert torch.allclose(s.channels, a.var(0, unbiased=False) * w_d.pow(2).sum(0), rtol=1e-6)


def test_bip_centred_scores_use_centred_norms(setup):
    _, view, _, stats, x, a, _ = setup
    s = make_metric("bip", ScoreOptions(centred=True)).score(view, stats, 0)
    w_d = view.down.weight.detach().double()
    expected = (a - a.mean(0)).norm(dim=0) * w_d.norm(dim=0)
    assert torch.allclose(s.channels, expected, rtol=1e-6)


def test_llm_pruner_gradients_match_autograd():
    model = tiny_model("llama-gqa", layers=2, scale=3.0).double()
    ids = random_ids(4, 12)
    reference = copy.deepcopy(model)
    reference(ids, labels=ids).loss.backward()  # one full batch: the mean loss over all tokens
    view = adapter_for(model.config).block(model, 1)
    weights = [m.weight for m in view.linears()]
    accumulate_lm_gradients(model, weights, ids, batch_size=2)  # two equal batches
    ref = adapter_for(reference.config).block(reference, 1)
    assert torch.allclose(view.gate.grad, ref.gate.grad, rtol=1e-6, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())
    assert model.model.embed_tokens.weight.grad is None  # only block weights were traced
    s = make_metric("llm-pruner", ScoreOptions()).score(view, None, 1)
    wg = lambda m: (m.weight * (m.grad if isinstance(m, Rows) else m.weight.grad)).abs().detach()  # noqa: E731
    j = 7
    expected = wg(ref.gate)[j].sum() + wg(ref.up)[j].sum() + wg(ref.down)[:, j].sum()
    assert float(s.channels[j]) == pytest.approx(float(expected), rel=1e-6)
    hd = view.head_dim  # head 0 owns q rows 0..hd and o cols 0..hd; K/V head 0 its k and v rows 0..hd
    assert float(s.heads[0]) == pytest.approx(float(wg(ref.q)[:hd].sum() + wg(ref.o)[:, :hd].sum()), rel=1e-6)
    assert float(s.kv_heads[0]) == pytest.approx(float(wg(ref.k)[:hd].sum() + wg(ref.v)[:hd].sum()), rel=1e-6)


def test_compensation_keeps_mean_block_output():
    """FFN channels only (the ratio is too small to take a KV group): the compensated block's
    output has the dense block's mean over the calibration tokens; uncompensated it does not."""
    ids = random_ids()
    dense = tiny_model("llama-gqa-bias", layers=2, scale=5.0).double()
    view, inputs, *_, dense_out = block_inputs(dense, ids)
    means = {}
    for compensate in (True, False):
        model = copy.deepcopy(dense)
        config = PruneConfig(ratio=0.04, compensate=compensate, keep_dense=[1], reconstruct=False)
        _, result = prune(model, None, config, calib=ids)
        assert result.widths_after[0].num_heads == 6 and result.widths_after[0].intermediate_size < 64
        layer = adapter_for(model.config).block(model, 0).layer
        with torch.no_grad():
            means[compensate] = torch.cat([layer(h, **kw[0]) for h, kw in inputs]).flatten(0, 1).mean(0)
    target = torch.cat([o for o, _ in dense_out]).flatten(0, 1).mean(0)
    assert torch.allclose(means[True], target, atol=1e-10)
    assert not torch.allclose(means[False], target, atol=1e-4)


def test_compensation_adds_biases_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_bip import save_model

    model = tiny_model("llama-gqa", scale=5.0)
    ids = random_ids()
    prune(model, None, PruneConfig(ratio=0.3, method="flap", allocation="uniform"), calib=ids)
    assert model.config.attention_bias and model.config.mlp_bias
    assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    save_model(model, None, tmp_path / "out", overwrite=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert (reloaded(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_compensation_refused_where_biases_cannot_exist():
    with pytest.raises(PruneError, match="output biases"):
        prune(tiny_model("qwen2-gqa"), None, PruneConfig(ratio=0.2, method="flap"))


def test_zscore_keys_are_standardised_per_module():
    scores = UnitScores(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), torch.arange(64, dtype=torch.float64) * 10)
    model = tiny_model("llama-gqa")
    view = adapter_for(model.config).block(model, 0)
    u = block_units(view.widths, BlockCosts.of(view), scores, "groups")
    attn, channels = ranking_keys(u, "zscore")
    assert torch.allclose(attn.mean(), torch.tensor(0.0, dtype=attn.dtype), atol=1e-12)
    assert float(channels.std()) == pytest.approx(1.0)
    per_param_attn, _ = ranking_keys(u, "none")
    assert float(per_param_attn[0]) == pytest.approx((1 + 2 + 3) / u.attn_cost)


def test_method_presets_and_overrides():
    flap = PruneConfig(method="flap").resolved()
    assert (flap.allocation, flap.normalize, flap.compensate, flap.sequential) == ("global", "channels", True, False)
    assert PruneConfig(method="flap", allocation="uniform").resolved().allocation == "uniform"
    assert PruneConfig(method="wanda-sp").resolved().sequential is True
    assert PruneConfig(method="wanda-sp", sequential=False).resolved().sequential is False
    assert PruneConfig(method="bip").dense_layers(30) == []
    with pytest.raises(PruneError, match="unknown method"):
        PruneConfig(method="nope").resolved()


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "llm-pruner", "bip-paper", "magnitude"])
def test_every_method_prunes_to_the_ratio(method):
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=0.3, method=method), calib=random_ids())
    assert abs(result.block_ratio - 0.3) < 0.02
    assert model(random_ids()).logits.isfinite().all()


def three_group_block(group_channels: list[float]) -> UnitScores:
    """Scores of a tiny GQA block (3 KV groups of 2 heads, head_dim 8) whose attention channels are
    ``group_channels`` per group, next to FFN channels valued 1..64."""
    attn = torch.tensor(group_channels, dtype=torch.float64).repeat_interleave(16)
    return UnitScores(attn.view(-1, 8).sum(1), torch.arange(1, 65, dtype=torch.float64), attn_channels=attn)


def test_channel_standardised_ranking_sees_how_weak_a_group_is():
    """With 3 KV groups, z-scores over units put the weakest group between -1.155 and -0.577 whatever
    the scores; standardised over channels, a group's key follows its scores against the layer's."""
    from llm_bip.ranking import standardised

    model = tiny_model("llama-gqa-bias")
    view = adapter_for(model.config).block(model, 0)
    keys = {}
    for name, groups in (("near", [0.9, 1.0, 1.1]), ("far", [0.01, 1.0, 1.1])):
        for normalize in ("zscore", "channels"):
            scores = three_group_block(groups)
            if normalize == "channels":
                scores = standardised(scores, view.head_dim)
            u = block_units(view.widths, BlockCosts.of(view), scores, "groups")
            keys[name, normalize] = float(ranking_keys(u, normalize)[0][0])
    assert -1.155 <= keys["near", "zscore"] <= -0.577 and -1.155 <= keys["far", "zscore"] <= -0.577
    assert keys["far", "channels"] < keys["near", "channels"] - 0.1  # the weaker group ranks lower
    assert keys["far", "channels"] < -1.155  # below anything three unit z-scores can say
