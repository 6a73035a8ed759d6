"""The resume state of an offloaded run (progress.py): a pass's progress saved and loaded back is the same,
bit for bit; a record written without its marker counts for nothing; the work folder is started, continued
or refused as the settings and flags say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_bip import shards
from llm_bip.errors import PruneError
from llm_bip.metrics import UnitScores
from llm_bip.progress import Progress, ProgressStore, begin_work, partial_folder
from llm_bip.scores import ScoreRecord

SETTINGS = {"model": "/models/tiny", "ratio": 0.2, "keep_dense": (0,), "dtype": "float32"}
# a record's settings: every scoring field, as a run writes them
SCORING = {"method": "bip", "lipschitz": "none", "head_score": "channels", "compensate": True, "sequential": False,
           "selection": "scores", "calibration": "mix", "n_samples": 4, "seqlen": 16, "batch_size": 2, "seed": 0}
WIDTHS = [{"num_heads": 6, "num_kv_heads": 2, "intermediate_size": 64}] * 4


def record(layers: list[int], seed: int = 0) -> ScoreRecord:
    """Scores, output norms and compensation means of ``layers`` (float64: what the scores file holds)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen, dtype=torch.float64)

    scores = {i: UnitScores(rand(6), rand(64), kv_heads=rand(2), attn_channels=rand(48)) for i in layers}
    means = {i: (rand(48), rand(64)) for i in layers}
    return ScoreRecord(scores, {i: 1.0 + i / 3 for i in layers}, means, SCORING, WIDTHS)


def block_inputs(seed: int = 0) -> list[tuple[torch.Tensor, list[dict]]]:
    """Two calibration batches' hidden states entering a block, with every block's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 16, 48, generator=gen), [{"batch": j, "block": i} for i in range(4)]) for j in range(2)]


def assert_same_record(got: ScoreRecord, expected: ScoreRecord) -> None:
    assert sorted(got.scores) == sorted(expected.scores)
    for i, want in expected.scores.items():
        have = got.scores[i]
        for name in ("heads", "channels", "kv_heads", "attn_channels"):
            assert torch.equal(getattr(have, name), getattr(want, name)), (i, name)
    assert got.norms == expected.norms
    assert sorted(got.means) == sorted(expected.means)
    assert all(torch.equal(a, b) for i in expected.means for a, b in zip(got.means[i], expected.means[i]))
    assert got.settings == expected.settings and got.widths == expected.widths


@pytest.fixture
def store(tmp_path) -> ProgressStore:
    partial = partial_folder(tmp_path / "out")
    begin_work(partial, SETTINGS, resume=False, overwrite=False)
    return ProgressStore(partial, "cpu")


def test_the_work_folder_is_next_to_the_output():
    assert partial_folder(Path("runs/out")) == Path("runs/out.partial")


def test_saved_progress_loads_back_exactly(store):
    """The next block, its hidden states (with the keyword arguments of the inputs given to ``load``) and the
    record of the blocks before it."""
    saved_inputs, expected = block_inputs(seed=1), record([0, 1, 2])
    store.save("scoring", Progress(3, saved_inputs, expected))
    block0 = block_inputs(seed=2)  # a resumed run's block 0 inputs: their keyword arguments are every block's
    done = store.load("scoring", block0)
    assert done.next_block == 3
    assert len(done.inputs) == len(saved_inputs)
    for (hidden, kwargs), (want, _), (_, given) in zip(done.inputs, saved_inputs, block0):
        assert hidden.dtype == want.dtype and torch.equal(hidden, want)
        assert kwargs is given
    assert_same_record(done.record, expected)


def test_each_pass_keeps_its_own_progress(store):
    store.save("scoring", Progress(4, block_inputs(seed=1), record([0, 1, 2, 3])))
    store.save("sequential", Progress(1, block_inputs(seed=3), record([0], seed=5)))
    assert store.load("reconstruction", block_inputs()) is None  # not started
    scoring, sequential = store.load("scoring", block_inputs()), store.load("sequential", block_inputs())
    assert (scoring.next_block, sequential.next_block) == (4, 1)
    assert_same_record(sequential.record, record([0], seed=5))
    assert torch.equal(sequential.inputs[0][0], block_inputs(seed=3)[0][0])


def test_a_pass_without_block_inputs_keeps_none(store):
    """A metric that reads no calibration data (magnitude) passes no hidden states down the stack."""
    store.save("scoring", Progress(2, None, record([0, 1])))
    done = store.load("scoring", None)
    assert done.next_block == 2 and done.inputs is None
    assert_same_record(done.record, record([0, 1]))


def test_a_record_saved_without_its_marker_counts_for_nothing(store, monkeypatch):
    """Interrupted between the record and the marker that points past it: the block the record has beyond the
    marker is scored again, from the inputs of the marker."""
    store.save("scoring", Progress(2, block_inputs(seed=1), record([0, 1])))

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "save_file", interrupted)  # the marker's write
    with pytest.raises(KeyboardInterrupt):
        store.save("scoring", Progress(3, block_inputs(seed=4), record([0, 1, 2])))
    monkeypatch.undo()
    done = store.load("scoring", block_inputs())
    assert done.next_block == 2 and sorted(done.record.scores) == [0, 1]
    assert_same_record(done.record, record([0, 1, 2]).only([0, 1]))
    assert torch.equal(done.inputs[0][0], block_inputs(seed=1)[0][0])
    assert not [p.name for p in store.folder.iterdir() if p.name.endswith(".tmp")]


def test_resume_continues_with_the_same_settings_only(tmp_path, store):
    partial = partial_folder(tmp_path / "out")
    store.save("scoring", Progress(1, None, record([0])))
    begin_work(partial, {**SETTINGS, "keep_dense": [0]}, resume=True, overwrite=False)  # as JSON reads it back
    assert store.load("scoring", None).next_block == 1  # continued: nothing discarded
    for changed in ({"ratio": 0.3}, {"dtype": "bfloat16"}, {"model": "/models/other"}):
        with pytest.raises(PruneError, match="other settings") as refused:
            begin_work(partial, {**SETTINGS, **changed}, resume=True, overwrite=False)
        (name, value), = changed.items()
        assert f"{name} {SETTINGS[name]!r} (asked: {value!r})" in str(refused.value)
    assert json.loads((partial / "progress" / "settings.json").read_text()) == {**SETTINGS, "keep_dense": [0]}


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(PruneError, match="no unfinished offloaded run"):
        begin_work(partial_folder(tmp_path / "out"), SETTINGS, resume=True, overwrite=False)
    assert not partial_folder(tmp_path / "out").exists()


def test_earlier_work_is_discarded_only_with_overwrite(tmp_path, store):
    partial = partial_folder(tmp_path / "out")
    store.save("scoring", Progress(1, None, record([0])))
    with pytest.raises(PruneError, match="unfinished offloaded run.*--resume.*--overwrite"):
        begin_work(partial, {**SETTINGS, "ratio": 0.3}, resume=False, overwrite=False)
    assert store.load("scoring", None).next_block == 1
    begin_work(partial, {**SETTINGS, "ratio": 0.3}, resume=False, overwrite=True)
    assert store.load("scoring", None) is None
    assert json.loads((partial / "progress" / "settings.json").read_text())["ratio"] == 0.3


def test_a_folder_llm_bip_did_not_write_is_never_removed(tmp_path):
    partial = partial_folder(tmp_path / "out")
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(PruneError, match="in the way .* not written by llm-bip"):
        begin_work(partial, SETTINGS, resume=False, overwrite=True)
    assert [p.name for p in partial.iterdir()] == ["notes.txt"]
