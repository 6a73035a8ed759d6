"""The engine's passes (engine.py) on tiny in-process models: scoring changes nothing and scores exactly the
prunable blocks; cutting keeps the units the plans name and runs no forward pass; the sequential pass equals
scoring then cutting where no block is cut before another, and scores a block on the cut outputs otherwise;
an interrupted pass resumes after its last completed block with the uninterrupted result.

The engine's inputs are built by a Pruner (its stack, plan and allocation options), as in a run."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_same_weights, weights

from llm_bip import PruneConfig, engine
from llm_bip.adapters import adapter_for
from llm_bip.progress import ProgressStore, begin_work
from llm_bip.pruner import Pruner
from llm_bip.scores import ScoreRecord
from llm_bip.surgery import head_channels
from llm_bip.testing import random_ids, tiny_model

CALIB = random_ids(8, 16, seed=3)
CHANNEL = 3 * 48  # parameters of one tiny_model FFN channel: gate row, up row, down column


def ffns(model) -> list[torch.nn.Module]:
    """Each decoder block's FFN: it runs when the block computes (capturing block 0's inputs passes every block's
    input through, computing nothing)."""
    return [view.mlp for view in adapter_for(model.config).blocks(model)]


@contextmanager
def block_forwards(model) -> Iterator[list[int]]:
    """The indices of the decoder blocks computed meanwhile, in order."""
    calls: list[int] = []
    handles = [ffn.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, ffn in enumerate(ffns(model))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def assert_same_scores(a: ScoreRecord, b: ScoreRecord, layers: list[int]) -> None:
    for i in layers:
        assert torch.equal(a.scores[i].heads.double(), b.scores[i].heads.double()), i
        assert torch.equal(a.scores[i].channels.double(), b.scores[i].channels.double()), i
        assert a.norms[i] == b.norms[i], i


@pytest.mark.parametrize("method", ["bip", "flap", "llm-pruner"])
def test_score_changes_no_weight_and_scores_exactly_the_prunable_blocks(method):
    """Statistics (bip, flap, with compensation means) or LM-loss gradients (llm-pruner): every weight as it
    was, no gradient left behind, and one score per head and per channel of each prunable block, none of the
    dense ones."""
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    pruner = Pruner(model, PruneConfig(ratio=0.3, method=method, keep_dense=[0, -1]))
    before = weights(model)
    record = engine.score(pruner.stack, pruner.plan, CALIB)
    assert_same_weights(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert pruner.stack.prunable == [1, 2]
    assert sorted(record.scores) == sorted(record.norms) == [1, 2]
    assert sorted(record.means) == ([1, 2] if pruner.plan.compensate else [])
    for i, scores in record.scores.items():
        widths = pruner.stack.views[i].widths
        assert scores.heads.shape == (widths.num_heads,)
        assert scores.channels.shape == (widths.intermediate_size,)
        assert scores.channels.isfinite().all() and scores.channels.abs().sum() > 0


def test_cut_keeps_the_units_the_plans_name_and_runs_no_forward():
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    dense = copy.deepcopy(model)
    config = PruneConfig(ratio=0.4, allocation="global", compensate=False, reconstruct=False, keep_dense=[0])
    pruner = Pruner(model, config)
    blocks_before = pruner.stack.parameters()
    record = engine.score(pruner.stack, pruner.plan, CALIB)
    with block_forwards(model) as calls:
        plans = engine.cut(pruner.stack, record, pruner.alloc, pruner.plan.compensate)
    assert calls == []
    assert sorted(plans) == [1, 2]
    adapter = adapter_for(model.config)
    assert adapter.block(model, 0).widths == adapter.block(dense, 0).widths
    for i, plan in plans.items():
        view, was = adapter.block(model, i), adapter.block(dense, i)
        assert view.widths == plan.widths != was.widths
        heads = head_channels(plan.keep_heads, view.head_dim)
        kv_heads = head_channels(plan.keep_kv_heads, view.head_dim)
        channels = torch.tensor(plan.keep_channels)
        assert torch.equal(view.q.weight, was.q.weight[heads])
        assert torch.equal(view.k.weight, was.k.weight[kv_heads])
        assert torch.equal(view.v.weight, was.v.weight[kv_heads])
        assert torch.equal(view.o.weight, was.o.weight[:, heads])
        assert torch.equal(view.gate.weight, was.gate.weight[channels])
        assert torch.equal(view.up.weight, was.up.weight[channels])
        assert torch.equal(view.down.weight, was.down.weight[:, channels])
    # the ratio is of every block, the dense one included
    assert abs(blocks_before - pruner.stack.parameters() - 0.4 * blocks_before) <= 2 * CHANNEL


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_sequential_equals_one_shot_on_a_single_prunable_block(allocation):
    """One block to cut: no block is cut before it, so scoring and cutting fused give what scoring then
    cutting give, bit for bit."""
    runs = {}
    for sequential in (False, True):
        model = tiny_model("llama-gqa", layers=3, scale=5.0)
        config = PruneConfig(ratio=0.15, allocation=allocation, sequential=sequential, keep_dense=[0, 2],
                             compensate=False, reconstruct=False)
        pruner = Pruner(model, config)
        if sequential:
            record, plans = engine.score_and_cut(pruner.stack, pruner.plan, pruner.alloc, CALIB)
        else:
            record = engine.score(pruner.stack, pruner.plan, CALIB)
            plans = engine.cut(pruner.stack, record, pruner.alloc, pruner.plan.compensate)
        runs[sequential] = record, plans, model
    (one_shot, one_shot_plans, one_shot_model), (fused, fused_plans, fused_model) = runs[False], runs[True]
    assert sorted(fused_plans) == sorted(one_shot_plans) == [1]
    assert fused_plans == one_shot_plans
    assert fused_plans[1].widths.as_dict() != fused.widths[1]  # it was cut
    assert_same_scores(fused, one_shot, [1])
    assert_same_weights(fused_model, weights(one_shot_model))


def test_sequential_scores_each_block_on_the_outputs_of_the_blocks_cut_before_it():
    """Uniform allocation (the counts come from sizes alone): block 1 sees dense inputs either way and is scored
    and cut alike; block 2 is scored on block 1's cut outputs, so its scores differ from the one-shot ones."""
    records = {}
    for sequential in (False, True):
        model = tiny_model("llama-gqa", layers=3, scale=5.0)
        config = PruneConfig(ratio=0.3, allocation="uniform", sequential=sequential, keep_dense=[0],
                             compensate=False, reconstruct=False)
        pruner = Pruner(model, config)
        if sequential:
            records[sequential] = engine.score_and_cut(pruner.stack, pruner.plan, pruner.alloc, CALIB)
        else:
            record = engine.score(pruner.stack, pruner.plan, CALIB)
            records[sequential] = record, engine.cut(pruner.stack, record, pruner.alloc, pruner.plan.compensate)
    (one_shot, one_shot_plans), (fused, fused_plans) = records[False], records[True]
    assert_same_scores(fused, one_shot, [1])
    assert fused_plans[1] == one_shot_plans[1]
    assert not torch.equal(fused.scores[2].channels.double(), one_shot.scores[2].channels.double())


def test_an_interrupted_scoring_pass_resumes_after_its_last_completed_block(tmp_path):
    """Interrupted while block 2 runs, the pass kept blocks 0 and 1; resumed on a fresh model, it runs blocks 2
    and 3 only and gives the uninterrupted scores."""
    config = PruneConfig(ratio=0.3, keep_dense=[0])  # bip: statistics and compensation means

    def pruner() -> Pruner:
        return Pruner(tiny_model("llama-gqa", layers=4, scale=5.0), config)

    straight = pruner()
    expected = engine.score(straight.stack, straight.plan, CALIB)

    begin_work(tmp_path / "out.partial", {"test": 1}, resume=False, overwrite=False)
    store = ProgressStore(tmp_path / "out.partial", "cpu")
    first = pruner()

    def interrupt(*_args):
        raise KeyboardInterrupt

    ffns(first.stack.model)[2].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.score(first.stack, first.plan, CALIB, store)

    resumed = pruner()
    with block_forwards(resumed.stack.model) as calls:
        record = engine.score(resumed.stack, resumed.plan, CALIB, store)
    assert sorted(set(calls)) == [2, 3]
    assert sorted(record.scores) == sorted(expected.scores) == [1, 2, 3]
    assert_same_scores(record, expected, [1, 2, 3])
    for i in (1, 2, 3):
        assert all(torch.equal(a.double(), b.double()) for a, b in zip(record.means[i], expected.means[i])), i
