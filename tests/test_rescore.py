"""Re-pruning from saved scores: the same model a full run gives, with no data; clear refusals."""

import json

import pytest
import torch
from helpers import assert_fails_cleanly, prune_args
from safetensors.torch import load_file

from llm_bip import PruneConfig, prune
from llm_bip.cli import main
from llm_bip.outputs import SCORES_FILE
from llm_bip.scores import load_scores, save_scores
from llm_bip.testing import random_ids, tiny_model

CALIB = random_ids(8, 16, seed=3)
METHODS = [
    ("bip", {"reconstruct": False}),  # llama: compensation, channel-standardised ranking (refit: tested below)
    ("bip-unit-zscore", {}),
    ("bip", {"normalize": "log-channels", "reconstruct": False}),
    ("flap", {}),
    ("llm-pruner", {}),
    ("magnitude", {"allocation": "global"}),
    ("wanda-sp", {"allocation": "global", "sequential": False}),  # its own: sequential, scores not reusable
    ("random", {}),
]


def full_run(ratio: float, method: str, options: dict):
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    _, result = prune(model, None, PruneConfig(ratio=ratio, method=method, **options), calib=CALIB)
    return model, result


@pytest.mark.parametrize("method,options", METHODS)
def test_reprune_from_scores_equals_a_full_run(method, options, tmp_path):
    _, first = full_run(0.15, method, options)
    save_scores(tmp_path / SCORES_FILE, first.record)
    record = load_scores(tmp_path / SCORES_FILE)
    expected, full = full_run(0.3, method, options)
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    _, again = prune(model, None, PruneConfig(ratio=0.3, method=method, **options), record=record)
    assert again.calibration_tokens == 0 and "scoring" not in again.phases and "gradients" not in again.phases
    assert again.widths_after == full.widths_after
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "re-pruned weights differ from the full run's"


@pytest.mark.parametrize("method", ["bip", "bip-refit", "flap", "magnitude"])
def test_reprune_with_reconstruction_equals_a_full_run(method, tmp_path):
    """Scores made without reconstruction, cut with it: what a full --reconstruct run gives, from the same data."""
    _, first = full_run(0.15, method, {})
    save_scores(tmp_path / SCORES_FILE, first.record)
    expected, full = full_run(0.3, method, {"reconstruct": True})
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    config = PruneConfig(ratio=0.3, method=method, reconstruct=True)
    _, again = prune(model, None, config, calib=CALIB, record=load_scores(tmp_path / SCORES_FILE))
    assert again.calibration_tokens == CALIB.numel() and "reconstruction" in again.phases
    assert "scoring" not in again.phases
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "re-pruned weights differ from the full run's"


def test_scores_file_round_trip_is_exact(tmp_path):
    _, result = full_run(0.3, "bip", {})
    save_scores(tmp_path / SCORES_FILE, result.record)
    record = load_scores(tmp_path)  # a run folder works too
    assert record.settings == result.record.settings and record.widths == result.record.widths
    for i, s in result.record.scores.items():
        assert torch.equal(record.scores[i].heads, s.heads.double())
        assert torch.equal(record.scores[i].channels, s.channels.double())
        assert torch.equal(record.scores[i].attn_channels, s.attn_channels.double())
        assert record.norms[i] == result.record.norms[i]
        assert all(torch.equal(a, b) for a, b in zip(record.means[i], result.record.means[i]))


def test_cli_reprune_matches_full_cli_run(capsys, tiny_model_dir, calib_text_file, tmp_path):
    no_refit = ("--no-reconstruct",)  # the refit reads data (tested below)
    assert main(prune_args(tiny_model_dir, tmp_path / "r20", calib_text_file, "--ratio", "0.2", *no_refit)) == 0
    assert main(prune_args(tiny_model_dir, tmp_path / "r40", calib_text_file, "--ratio", "0.4", *no_refit)) == 0
    # no calibration options: the record's settings are used, and no data is read
    assert main(["prune", str(tiny_model_dir), "--out", str(tmp_path / "again"), "--eval", "none",
                 "--scores", str(tmp_path / "r20"), "--ratio", "0.4", *no_refit]) == 0
    full, again = tmp_path / "r40", tmp_path / "again"
    assert load_file(str(full / "model.safetensors")).keys() == load_file(str(again / "model.safetensors")).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(full / "model.safetensors")).values(),
                                                 load_file(str(again / "model.safetensors")).values()))
    assert (full / "config.json").read_text() == (again / "config.json").read_text()
    summary = json.loads((again / "llm_bip_summary.json").read_text())
    assert summary["calibration"]["tokens"] == 0 and summary["scores_from"] == str(tmp_path / "r20")


def test_cli_reprune_with_reconstruction_reads_the_scored_calibration(capsys, tiny_model_dir, calib_text_file,
                                                                      tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text_file.read_text())
    assert main(prune_args(tiny_model_dir, tmp_path / "r20", calib, "--ratio", "0.2")) == 0
    assert main(prune_args(tiny_model_dir, tmp_path / "r40", calib, "--ratio", "0.4", "--reconstruct")) == 0
    again = tmp_path / "again"
    argv = ["prune", str(tiny_model_dir), "--out", str(again), "--eval", "none", "--scores", str(tmp_path / "r20"),
            "--ratio", "0.4", "--reconstruct"]
    assert main(argv) == 0
    full = load_file(str(tmp_path / "r40" / "model.safetensors"))
    assert all(torch.equal(full[k], v) for k, v in load_file(str(again / "model.safetensors")).items())
    summary = json.loads((again / "llm_bip_summary.json").read_text())
    assert summary["calibration"]["tokens"] == 4 * 16 and summary["config"]["reconstruct"]
    calib.unlink()  # the data the scores were made from is gone: refused before the model is loaded
    out = tmp_path / "out"
    argv[3] = str(out)
    assert_fails_cleanly(capsys, argv, out, [tiny_model_dir], str(calib))


@pytest.fixture
def scored_run(tiny_model_dir, calib_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "run"
    assert main(prune_args(tiny_model_dir, out, calib_text_file, "--ratio", "0.2")) == 0
    return out


@pytest.mark.parametrize("extra,words", [
    (["--method", "wanda-sp"], ["other scoring settings", "method"]),
    (["--samples", "5"], ["other scoring settings", "n_samples"]),
    (["--lipschitz", "certified"], ["other scoring settings", "lipschitz"]),
])
def test_scores_with_other_settings_are_refused(capsys, scored_run, tiny_model_dir, tmp_path, extra, words):
    out = tmp_path / "out"
    argv = ["prune", str(tiny_model_dir), "--out", str(out), "--eval", "none", "--scores", str(scored_run), *extra]
    assert_fails_cleanly(capsys, argv, out, [scored_run, tiny_model_dir], *words)


def test_scores_of_another_model_are_refused(capsys, scored_run, tmp_path):
    out = tmp_path / "out"  # the pruned model has other widths than the model its scores came from
    argv = ["prune", str(scored_run), "--out", str(out), "--eval", "none", "--scores", str(scored_run)]
    assert_fails_cleanly(capsys, argv, out, [scored_run], "other layer widths")


def test_scores_of_a_sequential_run_are_refused(capsys, tiny_model_dir, calib_text_file, tmp_path):
    assert main(prune_args(tiny_model_dir, tmp_path / "seq", calib_text_file, "--sequential")) == 0
    out = tmp_path / "out"
    argv = ["prune", str(tiny_model_dir), "--out", str(out), "--eval", "none", "--scores", str(tmp_path / "seq")]
    assert_fails_cleanly(capsys, argv, out, [tiny_model_dir], "sequential", "cannot be reused")


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", None])
def test_bad_scores_file_is_refused(capsys, tiny_model_dir, scored_run, tmp_path, content):
    path = tmp_path / "scores.safetensors"
    if content is None:  # a valid safetensors file that llm-bip did not write
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    argv = ["prune", str(tiny_model_dir), "--out", str(out), "--eval", "none", "--scores", str(path)]
    assert_fails_cleanly(capsys, argv, out, [tiny_model_dir, path], "not a scores file")
