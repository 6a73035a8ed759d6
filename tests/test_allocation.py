"""Allocation: the ratio asked is the ratio obtained; limits, rounding and dense layers hold."""

import pytest

from llm_bip import PruneConfig, PruneError, prune
from tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("allocation", ["uniform", "block", "global"])
@pytest.mark.parametrize("gqa", ["groups", "heads"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_ratio_obtained_is_ratio_asked(allocation, gqa, ratio):
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=ratio, allocation=allocation, gqa=gqa), calib=random_ids())
    channel_params = 3 * 48  # one FFN channel: gate row, up row, down column
    assert abs(result.block_ratio - ratio) * result.params["blocks_before"] <= 4 * channel_params
    removed_model = result.params["model_before"] - result.params["model_after"]
    assert removed_model == result.params["blocks_before"] - result.params["blocks_after"]


def test_uniform_gives_identical_layers_and_stock_config():
    model = tiny_model("llama-gqa", layers=4)
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude"))
    assert len(set(result.widths_after)) == 1
    assert model.config.intermediate_size == result.widths_after[0].intermediate_size
    assert model.config.num_attention_heads == result.widths_after[0].num_heads


def test_block_allocation_takes_the_same_share_of_every_block_by_joint_rank():
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    config = PruneConfig(ratio=0.4, allocation="block", normalize="none", lipschitz="none", head_score="exact",
                         compensate=False)
    _, result = prune(model, None, config, calib=random_ids())
    before = [block_params(w) for w in result.widths_before]
    after = [block_params(w) for w in result.widths_after]
    for b, a in zip(before, after):
        assert abs((b - a) - 0.4 * b) <= 3 * 48  # within one FFN channel of 40% of this block
    heads_kept = {w.num_heads for w in result.widths_after}
    assert len(heads_kept) > 1 or len({w.intermediate_size for w in result.widths_after}) > 1, "came out uniform"


def block_params(w) -> int:
    """Prunable parameters of a tiny_model block (hidden 48, head_dim 8) with widths ``w``."""
    return 2 * 48 * 8 * (w.num_heads + w.num_kv_heads) + 3 * 48 * w.intermediate_size


def test_zscores_cancel_the_lipschitz_factor():
    """Z-scored rankings skip the FFN factor: it cannot change which units go (nor under the default's
    channel standardisation, which ranks heads by their channels, never by the factored head score)."""
    plans = {}
    for normalize in ("zscore", "none"):  # unnormalised, the factor does change the ranking
        for lipschitz in ("spectral", "none"):
            config = PruneConfig(ratio=0.4, allocation="global", normalize=normalize, lipschitz=lipschitz,
                                 head_score="exact")
            _, result = prune(tiny_model("llama-gqa", layers=4, scale=5.0), None, config, calib=random_ids())
            plans[normalize, lipschitz] = result.plans
    assert plans["zscore", "spectral"] == plans["zscore", "none"]
    assert plans["none", "spectral"] != plans["none", "none"]


def test_keep_dense_layers_and_ratio_still_met():
    model = tiny_model("llama-gqa", layers=4)
    _, result = prune(model, None, PruneConfig(ratio=0.2, method="magnitude", keep_dense=[0, -1]))
    assert result.widths_after[0] == result.widths_before[0]
    assert result.widths_after[3] == result.widths_before[3]
    assert result.widths_after[1] != result.widths_before[1]
    assert abs(result.block_ratio - 0.2) < 0.01


def test_round_to_multiple():
    model = tiny_model("llama-gqa", layers=3)
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", allocation="global", round_to=8))
    assert all(w.intermediate_size % 8 == 0 for w in result.widths_after)


def test_every_layer_keeps_heads_and_channels():
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=0.65, allocation="global", min_channels=0.1), calib=random_ids())
    for w in result.widths_after:
        assert w.num_heads >= 1 and w.num_kv_heads >= 1 and w.intermediate_size >= 7
        assert 48 % w.num_heads == 0  # transformers' config validation


def test_mqa_removes_query_heads_only():
    model = tiny_model("llama-mqa", layers=2)
    _, result = prune(model, None, PruneConfig(ratio=0.4, method="magnitude"))
    assert all(w.num_kv_heads == 1 and w.num_heads < 4 for w in result.widths_after)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(PruneError, match="ratio"):
        prune(tiny_model(), None, PruneConfig(ratio=ratio, method="magnitude"))


def test_ratio_that_would_empty_a_layer():
    with pytest.raises(PruneError, match="empty"):
        prune(tiny_model(), None, PruneConfig(ratio=0.97, method="magnitude"))
    with pytest.raises(PruneError, match="empty"):
        prune(tiny_model(), None, PruneConfig(ratio=0.97, method="magnitude", allocation="global"))
