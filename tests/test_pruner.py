"""One pruning run (pruner.py) on tiny in-process models: what the model cannot take is refused at construction,
before any forward pass and with the model untouched; a run that needs calibration data refuses to run without
it, and one that needs none ignores it; a saved record prunes as the run that scored it, with no data and no
forward pass, and a record of other settings or another model is refused; the summary's parameter counts are
the model's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import assert_same_weights, weights

from llm_bip import PruneConfig, PruneError, prune
from llm_bip.adapters import adapter_for
from llm_bip.pruner import Pruner
from llm_bip.testing import random_ids, tiny_model

CALIB = random_ids(8, 16, seed=3)


@contextmanager
def forwards(model) -> Iterator[list[str]]:
    """What ran meanwhile: "model" for each forward of the whole model, "block i" for each block that computed."""
    calls: list[str] = []
    handles = [model.register_forward_pre_hook(lambda *_: calls.append("model"))]
    for i, view in enumerate(adapter_for(model.config).blocks(model)):
        handles.append(view.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(f"block {i}")))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


REFUSALS = [
    ("mistral-gqa", dict(compensate=True), "bias compensation needs output biases.*--no-compensate"),
    ("olmo2-gqa", dict(lipschitz="certified"), "certified.*OLMo 2"),
    ("llama-gqa", dict(keep_dense=[3]), r"keep_dense \(--keep-dense\) layer 3 out of range for 3 layers"),
    ("llama-gqa", dict(keep_dense=[0, 1, -1]), "every layer is kept dense"),
    ("llama-gqa", dict(ratio=0.97, method="magnitude"), "would empty"),
]


@pytest.mark.parametrize("variant,options,message", REFUSALS,
                         ids=["compensation-without-biases", "certified-without-ffn-norm", "dense-layer-out-of-range",
                              "every-layer-dense", "ratio-empties-a-layer"])
def test_refuses_what_the_model_cannot_take_before_any_forward(variant, options, message):
    model = tiny_model(variant, layers=3)
    before = weights(model)
    with forwards(model) as calls, pytest.raises(PruneError, match=message):
        Pruner(model, PruneConfig(**options))
    assert calls == []
    assert_same_weights(model, before)


def test_run_without_the_calibration_it_needs_raises_and_changes_nothing():
    model = tiny_model("llama-gqa", layers=2)
    pruner = Pruner(model, PruneConfig(ratio=0.3))  # bip: scores from calibration statistics
    assert pruner.needs_data
    before = weights(model)
    with forwards(model) as calls, pytest.raises(ValueError, match="calibration"):
        pruner.run()
    assert calls == []
    assert_same_weights(model, before)  # no compensation bias added, nothing cut


def test_a_run_that_needs_no_data_ignores_calibration():
    """Magnitude scores with neither compensation nor reconstruction read no data: ``calibration()`` gives
    none and token ids given to ``run`` are ignored (the same result as without them)."""
    config = PruneConfig(ratio=0.3, method="magnitude")
    with_ids, without = tiny_model("llama-gqa", layers=2), tiny_model("llama-gqa", layers=2)
    pruner = Pruner(with_ids, config)
    assert not pruner.needs_data and pruner.calibration(tokenizer=None) is None
    with forwards(with_ids) as calls:
        result = pruner.run(CALIB)
    assert calls == [] and result.calibration_tokens == 0
    Pruner(without, config).run()
    assert_same_weights(with_ids, weights(without))
    assert parameters(with_ids) < parameters(tiny_model("llama-gqa", layers=2))


def test_a_record_prunes_as_the_run_that_scored_it_without_data():
    """The default method with compensation and no reconstruction: the record's scores and calibration means
    are all the cut needs."""
    config = PruneConfig(ratio=0.3, reconstruct=False)
    first_model = tiny_model("llama-gqa", layers=3, scale=5.0)
    _, first = prune(first_model, None, config, calib=CALIB)
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    pruner = Pruner(model, config, record=first.record)
    assert not pruner.needs_data and pruner.plan.compensate
    with forwards(model) as calls:
        again = pruner.run()
    assert calls == []
    assert again.plans == first.plans and again.widths_after == first.widths_after
    assert_same_weights(model, weights(first_model))


def test_a_record_of_other_settings_or_another_model_is_refused():
    config = PruneConfig(ratio=0.3, reconstruct=False)
    _, first = prune(tiny_model("llama-gqa", layers=3, scale=5.0), None, config, calib=CALIB)
    with pytest.raises(PruneError, match="other scoring settings: seed 0 \\(asked: 1\\)"):
        Pruner(tiny_model("llama-gqa", layers=3), PruneConfig(ratio=0.3, reconstruct=False, seed=1),
               record=first.record)
    with pytest.raises(PruneError, match="other layer widths"):
        Pruner(tiny_model("llama-gqa", layers=2), config, record=first.record)


def test_summary_counts_the_parameters_the_model_has():
    """The default method (compensation biases added, the cut blocks refit): the counts before and after are
    what the model holds, of the whole model and of its blocks, and the layers' widths are the blocks'."""
    model = tiny_model("llama-gqa", layers=3, scale=5.0)
    adapter = adapter_for(model.config)
    model_before = parameters(model)
    blocks_before = sum(view.prunable_parameters() for view in adapter.blocks(model))
    _, result = prune(model, None, PruneConfig(ratio=0.3), calib=CALIB)
    summary = json.loads(json.dumps(result.summary()))
    counts = summary["parameters"]
    blocks_after = sum(view.prunable_parameters() for view in adapter.blocks(model))
    assert counts["model_before"] == model_before and counts["model_after"] == parameters(model) < model_before
    assert counts["blocks_before"] == blocks_before and counts["blocks_after"] == blocks_after < blocks_before
    assert counts["block_ratio_removed"] == round(1 - blocks_after / blocks_before, 6)
    assert [layer["after"] for layer in summary["layers"]] == [v.widths.as_dict() for v in adapter.blocks(model)]
    assert summary["calibration"]["tokens"] == CALIB.numel()
