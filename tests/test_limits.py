"""What a model cannot take is refused after it is read and before any forward pass (windows longer than its
context, a calibration forward larger than free memory), and a signal stops the work between pieces."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import assert_fails_cleanly, prune_args

import llm_bip.calibration
import llm_bip.limits
from llm_bip.cli import main
from llm_bip.limits import calibration_bytes
from llm_bip.loading import read_config
from llm_bip.pipeline import within_context
from llm_bip.recovery import DistillConfig

CONTEXT = 64  # the tiny saved model's max_position_embeddings (llm_bip.testing.save_tiny_model)


@pytest.fixture
def no_forward(monkeypatch):
    """Any forward pass of a block fails the test: refusals must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a block ran before the refusal")
    monkeypatch.setattr(llm_bip.calibration, "block_output", forbidden)


def test_tiny_model_context_is_what_these_tests_assume(tiny_model_dir):
    assert read_config(str(tiny_model_dir), tiny_model_dir).max_position_embeddings == CONTEXT


@pytest.mark.parametrize("seqlen", [CONTEXT + 1, 1_000_000])
def test_calibration_window_past_the_context_is_refused(capsys, work, tiny_model_dir, calib_text_file, no_forward,
                                                        seqlen):
    argv = [*prune_args(tiny_model_dir, work / "out", calib_text_file), "--calib-seqlen", str(seqlen)]
    message = assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, calib_text_file],
                                   f"seqlen (--calib-seqlen) {seqlen} is longer than the model's context of {CONTEXT}")
    assert message.endswith(f"use at most {CONTEXT}")


def test_calibration_window_at_the_context_is_accepted(work, tiny_model_dir, calib_text_file):
    argv = [*prune_args(tiny_model_dir, work / "out", calib_text_file), "--calib-seqlen", str(CONTEXT)]
    assert main(argv) == 0


def test_evaluation_window_past_the_context_is_refused_before_calibration(capsys, work, tiny_model_dir,
                                                                          calib_text_file, no_forward):
    argv = ["prune", str(tiny_model_dir), "--out", str(work / "out"), "--calibration", str(calib_text_file),
            "--samples", "4", "--calib-seqlen", "16", "--eval", str(calib_text_file), "--eval-seqlen", "65"]
    assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, calib_text_file],
                         "--eval-seqlen 65 is longer than the model's context of 64")


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_eval_and_compare_windows_past_the_context_are_refused(capsys, work, tiny_model_dir, calib_text_file,
                                                               no_forward, command):
    argv = {"eval": ["eval", str(tiny_model_dir), "--ppl", str(calib_text_file), "--seqlen", "65"],
            "compare": ["compare", str(tiny_model_dir), "--methods", "magnitude", "--ratios", "0.2", "--seqlens",
                        "16,65", "--ppl", str(calib_text_file), "--calibration", str(calib_text_file),
                        "--samples", "4", "--calib-seqlen", "16"]}[command]
    words = {"eval": "the evaluation window 65", "compare": "--seqlens 65"}[command]
    assert_fails_cleanly(capsys, [*argv, "--out", str(work / "out")], work / "out", [tiny_model_dir, calib_text_file],
                         f"{words} is longer than the model's context of 64")


@pytest.mark.parametrize("option", ["--seqlen", "--eval-seqlen"])
def test_training_windows_past_the_context_are_refused_before_any_model_loads(capsys, monkeypatch, work,
                                                                               tiny_model_dir, calib_text_file, option):
    monkeypatch.setattr("llm_bip.recovery.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["finetune", str(tiny_model_dir), "--data", str(calib_text_file), "--out", str(work / "out"),
            "--max-steps", "1", "--seqlen", "32", "--eval", str(calib_text_file), option, "100"]
    assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, calib_text_file],
                         f"{option} 100 is longer than the model's context of 64")


def test_calibration_larger_than_free_memory_is_refused(capsys, monkeypatch, work, tiny_model_dir, calib_text_file,
                                                        no_forward):
    config = read_config(str(tiny_model_dir), tiny_model_dir)
    need = calibration_bytes(config, samples=4, seqlen=16, batch_size=8)
    monkeypatch.setattr(llm_bip.limits, "free_bytes", lambda device: need - 1)
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, work / "out", calib_text_file), work / "out",
                         [tiny_model_dir, calib_text_file], "the calibration forward needs about",
                         "(4 samples of 16 tokens in batches of 8)", "free on cpu", "lower --samples")


def test_calibration_within_free_memory_runs(monkeypatch, work, tiny_model_dir, calib_text_file):
    config = read_config(str(tiny_model_dir), tiny_model_dir)
    need = calibration_bytes(config, samples=4, seqlen=16, batch_size=8)
    monkeypatch.setattr(llm_bip.limits, "free_bytes", lambda device: need)
    assert main(prune_args(tiny_model_dir, work / "out", calib_text_file)) == 0


def test_eager_attention_counts_its_probabilities(tiny_model_dir):
    """Eager attention holds two (batch, heads, L, L) float32 tensors per batch; SDPA does not."""
    config = read_config(str(tiny_model_dir), tiny_model_dir)
    config._attn_implementation = "sdpa"
    sdpa = calibration_bytes(config, samples=8, seqlen=32, batch_size=2)
    config._attn_implementation = "eager"
    assert calibration_bytes(config, samples=8, seqlen=32, batch_size=2) - sdpa == 2 * 2 * 4 * 32 * 32 * 4


def test_sigterm_stops_before_the_next_piece_of_work(capsys, monkeypatch, work, tiny_model_dir, calib_text_file):
    """SIGTERM arriving during one block's batch: no further batch or block starts, nothing is written."""
    pieces = []
    real = llm_bip.calibration.block_output

    def piece(*args, **kwargs):
        pieces.append(1)
        if len(pieces) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(llm_bip.calibration, "block_output", piece)
    argv = [*prune_args(tiny_model_dir, work / "out", calib_text_file), "--batch-size", "1"]
    assert main(argv) == 128 + signal.SIGTERM
    assert len(pieces) == 1
    assert "terminated; nothing was written" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_compare_refuses_a_calibration_window_past_the_context(capsys, work, tiny_model_dir, calib_text_file,
                                                               no_forward):
    argv = ["compare", str(tiny_model_dir), "--methods", "magnitude,bip", "--ratios", "0.2",
            "--seqlens", "16", "--ppl", str(calib_text_file), "--calibration", str(calib_text_file), "--samples", "4",
            "--calib-seqlen", "65", "--out", str(work / "out")]
    assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, calib_text_file],
                         "seqlen (--calib-seqlen) 65 is longer than the model's context of 64")


def test_recover_trains_on_windows_within_the_context(tiny_model_dir):
    """``prune --recover`` has no window option: distill's default windows, cut to a shorter context."""
    assert DistillConfig().seqlen > CONTEXT
    assert within_context(DistillConfig(), str(tiny_model_dir)).seqlen == CONTEXT
    assert within_context(DistillConfig(seqlen=CONTEXT - 1), str(tiny_model_dir)).seqlen == CONTEXT - 1
