"""Allocation: the ratio asked is the ratio obtained; limits, rounding and dense layers hold."""

import pytest
import torch
from transformers import LlamaConfig

from llm_bip import PruneConfig, PruneError, prune
from llm_bip.allocation import allocate
from llm_bip.engine import Stack, size_counts
from llm_bip.loading import empty_model
from llm_bip.metrics import UnitScores
from llm_bip.options import AllocationOptions
from llm_bip.testing import random_ids, tiny_model
from llm_bip.units import removed_parameters

CHANNEL = 3 * 48  # parameters of one tiny_model FFN channel: gate row, up row, down column


@pytest.mark.parametrize("allocation", ["uniform", "block", "global"])
@pytest.mark.parametrize("gqa", ["groups", "heads"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_ratio_obtained_is_ratio_asked(allocation, gqa, ratio):
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=ratio, allocation=allocation, gqa=gqa), calib=random_ids())
    assert abs(result.block_ratio - ratio) * result.params["blocks_before"] <= 4 * CHANNEL
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
                         compensate=False, reconstruct=False)
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


@pytest.mark.parametrize("allocation", ["uniform", "block", "global"])
@pytest.mark.parametrize("round_to", [8, 16])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.45])
def test_round_to_keeps_multiples_and_the_ratio(allocation, round_to, ratio):
    """Kept FFN widths are multiples of N and the ratio obtained is the ratio asked within half a step
    of N channels: of one block (steps move between blocks), of every pruned block under uniform
    (one width for all: the nearest multiple)."""
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    config = PruneConfig(ratio=ratio, method="magnitude", allocation=allocation, round_to=round_to)
    _, result = prune(model, None, config)
    assert all(w.intermediate_size % round_to == 0 for w in result.widths_after)
    assert allocation != "uniform" or len(set(result.widths_after)) == 1
    steps = len(result.widths_after) if allocation == "uniform" else 1
    assert abs(result.block_ratio - ratio) * result.params["blocks_before"] <= steps * round_to * CHANNEL / 2


def test_round_to_keeps_min_channels():
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    config = PruneConfig(ratio=0.4, allocation="global", min_channels=0.3, round_to=16)
    _, result = prune(model, None, config, calib=random_ids())
    assert all(w.intermediate_size >= 32 and w.intermediate_size % 16 == 0 for w in result.widths_after)
    assert abs(result.block_ratio - 0.4) * result.params["blocks_before"] <= 16 * CHANNEL / 2


def stack_of(**sizes) -> Stack:
    """A Llama stack of these sizes on the meta device: sizes and costs, no weights."""
    return Stack(empty_model(LlamaConfig(**sizes)))


@pytest.mark.parametrize("allocation", ["uniform", "block", "global"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_round_to_64_at_smollm2_sizes(allocation, ratio):
    """SmolLM2-135M's blocks (30 of them, hidden 576, 9 heads over 3 KV heads of 64, FFN 1536), random
    scores, --round-to 64: one step is 64 channels of 3 x 576 parameters."""
    stack = stack_of(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64)
    gen = torch.Generator().manual_seed(0)
    scores = {i: UnitScores(torch.rand(9, generator=gen), torch.rand(1536, generator=gen) ** 3) for i in stack.prunable}
    opts = AllocationOptions(ratio=ratio, allocation=allocation, normalize="zscore", round_to=64)
    units = stack.units(scores, {}, opts)
    counts = allocate(units, stack.parameters(), opts)
    assert all((1536 - n_ch) % 64 == 0 for _, n_ch in counts.values())
    steps = 30 if allocation == "uniform" else 1
    assert abs(removed_parameters(units, counts) - ratio * stack.parameters()) <= steps * 64 * 3 * 576 / 2


def test_uniform_removes_heads_whether_or_not_they_divide_hidden_size():
    """Llama-2-7B's blocks: 20% of 32 heads is 6 heads, though 4096 % 26 != 0 (the config copes)."""
    stack = stack_of(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32)
    assert set(size_counts(stack, AllocationOptions(ratio=0.2)).values()) == {(6, 2270)}


def test_every_layer_keeps_heads_and_channels():
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=0.65, allocation="global", min_channels=0.1), calib=random_ids())
    for w in result.widths_after:
        assert w.num_heads >= 1 and w.num_kv_heads >= 1 and w.intermediate_size >= 7


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
