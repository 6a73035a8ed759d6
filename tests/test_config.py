"""PruneConfig checks: every option is checked before any model pass (through the Python API too),
and messages name both the field and the CLI option that sets it."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, asdict, fields
from typing import get_args

import pytest

from llm_bip import PruneConfig, PruneError, prune, run_prune
from llm_bip.config import Method, PrunePlan
from llm_bip.methods import METHODS
from llm_bip.pruner import Pruner
from llm_bip.testing import random_ids, tiny_model

BAD_OPTIONS = [
    ("method", "nope", "method (--method)"),
    ("allocation", "everywhere", "allocation (--allocation)"),
    ("normalize", "minmax", "normalize (--normalize)"),
    ("lipschitz", "spectrall", "lipschitz (--lipschitz)"),
    ("head_score", "sum", "head_score (--head-score)"),
    ("gqa", "kv", "gqa (--gqa)"),
    ("compensate", "yes", "compensate (--compensate)"),
    ("ratio", 1.5, "ratio (--ratio)"),
    ("min_channels", 1.0, "min_channels (--min-channels)"),
    ("n_samples", 0, "n_samples (--samples)"),
    ("seqlen", 1, "seqlen (--calib-seqlen)"),
    ("batch_size", 0, "batch_size (--batch-size)"),
    ("round_to", 0, "round_to (--round-to)"),
    ("seed", 0.5, "seed (--seed)"),
    ("keep_dense", "0,-1", "keep_dense (--keep-dense)"),
    ("sequential", "yes", "sequential (--sequential)"),
    ("reconstruct", "yes", "reconstruct (--reconstruct)"),
    ("calibration", "", "calibration (--calibration)"),
]


def test_method_choices_are_the_registered_methods():
    assert get_args(Method) == tuple(METHODS)


@pytest.mark.parametrize("field,value,name", BAD_OPTIONS, ids=[f for f, _, _ in BAD_OPTIONS])
def test_bad_option_fails_before_any_model_pass(monkeypatch, field, value, name):
    def no_model_pass(*_args, **_kwargs):
        raise AssertionError("a model pass started before the options were checked")

    for target in ("capture_block_inputs", "accumulate_lm_gradients", "collect_block_stats"):
        monkeypatch.setattr(f"llm_bip.engine.{target}", no_model_pass)
    with pytest.raises(PruneError, match=re.escape(name)):
        prune(tiny_model(layers=2), None, PruneConfig(**{field: value}), calib=random_ids())


def test_good_values_pass():
    PruneConfig(method="flap", allocation="block", normalize="output", compensate="auto", keep_dense=[0, -1],
                lipschitz="certified", head_score="exact", gqa="heads", min_channels=0.0, seed=-3).check()


def test_keep_dense_is_checked_against_the_layer_count():
    config = PruneConfig(keep_dense=[0, -3])
    config.check()  # no model: any index is plausible
    assert PruneConfig(keep_dense=[1, -2]).dense_layers(3) == [1]
    with pytest.raises(PruneError, match=r"keep_dense \(--keep-dense\) layer -3 out of range for 2 layers"):
        config.dense_layers(2)


def test_run_prune_checks_options_before_loading(tmp_path):
    with pytest.raises(PruneError, match="lipschitz"):  # the model does not exist: it was never loaded
        run_prune(str(tmp_path / "no-such-model"), tmp_path / "out", PruneConfig(lipschitz="bad"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", list(METHODS))
def test_plan_is_frozen_fully_explicit_and_what_the_summary_records(method):
    config = PruneConfig(method=method, keep_dense=[-1], ratio=0.3)
    pruner = Pruner(tiny_model(layers=3), config)
    plan = pruner.plan
    values = asdict(plan)
    assert [f.name for f in fields(PrunePlan)] == [f.name for f in fields(PruneConfig)]
    assert not [k for k, v in values.items() if v is None or v == "auto"]
    assert plan.keep_dense == (2,) and isinstance(plan.compensate, bool)
    with pytest.raises(FrozenInstanceError):
        plan.ratio = 0.5  # type: ignore[misc]
    summary = pruner.run(random_ids() if pruner.needs_data else None).summary()
    assert summary["config"] == plan.as_dict() == {**values, "keep_dense": [2]}


def test_plan_refuses_keeping_every_layer_dense():
    with pytest.raises(PruneError, match="every layer is kept dense: nothing to prune"):
        Pruner(tiny_model(layers=2), PruneConfig(keep_dense=[0, 1]))
