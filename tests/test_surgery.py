"""Surgery is exact: a physically pruned model computes what the masked dense model computes."""

import copy

import pytest
import torch

from llm_bip import PruneConfig, prune
from llm_bip.adapters import adapter_for
from llm_bip.surgery import head_channels
from tiny_models import VARIANTS, random_ids, tiny_model

ALL = sorted(VARIANTS)


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
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)
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


def test_heads_mode_keeps_kv_heads_and_removes_evenly():
    model = tiny_model("llama-gqa")  # 6 query heads over 2 KV heads
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", gqa="heads"))
    for plan in result.plans.values():
        assert plan.keep_kv_heads == [0, 1]
        per_group = [sum(h // 3 == g for h in plan.keep_heads) for g in range(2)]
        assert per_group[0] == per_group[1] >= 1


def test_groups_mode_removes_whole_kv_groups():
    model = tiny_model("llama-gqa-bias")  # 6 query heads over 3 KV heads
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", gqa="groups"))
    for plan in result.plans.values():
        kept_groups = sorted({h // 2 for h in plan.keep_heads})
        assert kept_groups == plan.keep_kv_heads
        assert len(plan.keep_heads) == 2 * len(plan.keep_kv_heads)


def test_pruned_model_generates_with_cache():
    model = tiny_model("llama-gqa", scale=3.0)
    prune(model, None, PruneConfig(ratio=0.3, method="random", allocation="global", gqa="heads"), calib=random_ids())
    assert model.config.is_heterogeneous
    out = model.generate(random_ids(1, 5), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # cached greedy decoding agrees with a full forward pass over the generated sequence
    full = model(out[:, :-1]).logits[:, 4:].argmax(-1)
    assert torch.equal(full, out[:, 5:])
