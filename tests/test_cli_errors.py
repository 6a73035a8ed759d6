"""Bad input to ``llm-bip prune`` fails cleanly.

Every failure must give one line ``llm-bip: error: ...`` on stderr (progress bars aside), a
non-zero exit code, no traceback, no output folder and no ``.NAME.tmp-*`` sibling, and leave the
input files byte-for-byte untouched. The CLI runs in-process through ``main()``; one test runs
the installed console script to check the same from a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from helpers import assert_fails_cleanly, earlier_output, error_message, prune_args, snapshot

from llm_bip.cli import main
from llm_bip.errors import PruneError
from llm_bip.outputs import OUTPUT_MARKER

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- the model argument


def _missing(d: Path) -> Path:
    return d / "nope"


def _empty_dir(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _dir_with_random_file(d: Path) -> Path:
    (d / "junk").mkdir()
    (d / "junk" / "weights.bin").write_bytes(os.urandom(256))
    return d / "junk"


def _plain_file(d: Path) -> Path:
    (d / "model.bin").write_bytes(os.urandom(256))
    return d / "model.bin"


def _garbage_gguf(d: Path) -> Path:
    (d / "model.gguf").write_bytes(b"not a gguf file at all" * 10)
    return d / "model.gguf"


@pytest.mark.parametrize("make,words", [
    (_missing, ["nope", "no such file or folder"]),
    (_empty_dir, ["empty", "no config.json", "not a hugging face model"]),
    (_dir_with_random_file, ["junk", "no config.json"]),
    (_plain_file, ["model.bin", "not a model"]),
    (_garbage_gguf, ["model.gguf", "not a readable gguf file"]),
], ids=["missing", "empty-dir", "dir-with-random-file", "plain-file", "garbage-gguf"])
def test_bad_model_path(capsys, monkeypatch, work, inputs, calib_text_file, make, words):
    monkeypatch.setenv("LLM_BIP_CACHE", str(inputs.parent / "cache"))
    model = make(inputs)
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(model, out, calib_text_file), out, [inputs, calib_text_file], *words)
    cache = inputs.parent / "cache"
    assert not cache.exists() or not list(cache.rglob("config.json")), "a failed GGUF conversion was cached"


def test_unsupported_architecture(capsys, work, inputs, calib_text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(inputs / "gpt2")
    out = work / "out"
    message = assert_fails_cleanly(capsys, prune_args(inputs / "gpt2", out, calib_text_file), out,
                                   [inputs, calib_text_file], "unsupported architecture", "gpt2")
    assert "llama" in message  # names what is supported


def test_hub_model_while_offline(capsys, monkeypatch, work, calib_text_file, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "someorg/some-model" cannot be a local relative path
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args("someorg/some-model", out, calib_text_file), out, [calib_text_file],
                         "someorg/some-model", "hub", "HF_HUB_OFFLINE")


def test_hub_model_while_offline_spelled_true(capsys, monkeypatch, work, calib_text_file, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")  # huggingface_hub accepts 1/true/yes/on
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args("someorg/some-model", out, calib_text_file), out, [calib_text_file],
                         "someorg/some-model", "offline")


# --------------------------------------------------------------------------- pruning options


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1", "nan"])
def test_ratio_out_of_range(capsys, work, tiny_model_dir, calib_text_file, ratio):
    out = work / "out"
    message = assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, f"--ratio={ratio}"),
                                   out, [tiny_model_dir, calib_text_file], "--ratio", "(0, 1)")
    assert f"got {float(ratio)}" in message


def test_ratio_that_would_empty_a_layer(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, "--ratio=0.99"), out,
                         [tiny_model_dir, calib_text_file], "ratio 0.99", "would empty layer")


@pytest.mark.parametrize("layers", ["2", "-3", "0,7"])
def test_keep_dense_out_of_range(capsys, work, tiny_model_dir, calib_text_file, layers):
    out = work / "out"  # the tiny model has 2 layers: valid indices are -2..1
    bad = layers.split(",")[-1]
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, f"--keep-dense={layers}"), out,
                         [tiny_model_dir, calib_text_file], "--keep-dense", f"layer {bad}", "out of range", "2 layers")


def test_keep_dense_every_layer(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, "--keep-dense=0,-1"), out,
                         [tiny_model_dir, calib_text_file], "every layer is kept dense", "nothing to prune")


@pytest.mark.parametrize("option,words", [
    ("--samples=0", ["n_samples (--samples)", "got 0"]),
    ("--calib-seqlen=1", ["seqlen (--calib-seqlen)", ">= 2", "got 1"]),
    ("--batch-size=0", ["batch_size (--batch-size)"]),
    ("--round-to=0", ["round_to (--round-to)"]),
    ("--min-channels=1", ["min_channels (--min-channels)", "[0, 1)"]),
])
def test_bad_option_fails_before_the_model_is_loaded(capsys, work, inputs, calib_text_file, option, words):
    out = work / "out"  # the model does not exist: the option is checked first
    assert_fails_cleanly(capsys, prune_args(inputs / "nope", out, calib_text_file, option), out, [calib_text_file],
                         *words)


# --------------------------------------------------------------------------- calibration text


@pytest.mark.parametrize("name,text,words", [
    ("empty.txt", "", ["empty"]),
    ("blank.txt", " \n\n\t \n", ["empty"]),
    ("short.txt", "the a of and to in is was for on\n", ["10 tokens", "fewer than one window of 16"]),
    ("exact.txt", " ".join(["the"] * 16), ["16 tokens", "fewer than one window of 16"]),
    ("bad.json", "{not json", ["bad.json", "not valid json"]),
    ("records.jsonl", '{"title": "no text field"}\n', ["none of the fields"]),
], ids=["empty", "whitespace-only", "shorter-than-window", "exactly-one-window", "bad-json", "jsonl-no-text"])
def test_bad_calibration_text(capsys, work, inputs, tiny_model_dir, name, text, words):
    calib = inputs / name
    calib.write_text(text)
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib), out, [tiny_model_dir, calib], *words)


def test_missing_calibration_file(capsys, work, inputs, tiny_model_dir):
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, inputs / "nofile.txt"), out, [tiny_model_dir],
                         "nofile.txt", "neither a file nor one of", "ptb")


@pytest.mark.parametrize("option", ["--calibration", "--eval"])
@pytest.mark.parametrize("offline_var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_dataset_while_offline(capsys, monkeypatch, work, tiny_model_dir, calib_text_file, option, offline_var):
    other = {"HF_DATASETS_OFFLINE": "HF_HUB_OFFLINE", "HF_HUB_OFFLINE": "HF_DATASETS_OFFLINE"}[offline_var]
    monkeypatch.delenv(other)  # the one variable alone must be enough
    argv = prune_args(tiny_model_dir, work / "out", calib_text_file)
    argv[argv.index(option) + 1] = "wikitext2"
    assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, calib_text_file],
                         "wikitext2", "hub", "offline")


# --------------------------------------------------------------------------- the output folder


def test_existing_output_without_overwrite(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    capsys.readouterr()
    rc = main(prune_args(tiny_model_dir, out, calib_text_file))
    message = error_message(capsys.readouterr().err)
    assert rc == 2
    assert str(out) in message and "already exists" in message and "--overwrite" in message
    assert snapshot(out) == before, "the existing output folder was modified"
    assert sorted(p.name for p in work.iterdir()) == ["out"], "a temporary sibling was left behind"


def test_missing_output_parents_are_created(work, tiny_model_dir, calib_text_file):
    out = work / "no" / "such" / "out"  # as in the README's `--out runs/...` on a fresh clone
    assert main(prune_args(tiny_model_dir, out, calib_text_file)) == 0
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "a temporary sibling was left behind"


def test_output_parent_is_a_file(capsys, work, tiny_model_dir, calib_text_file):
    (work / "afile").write_text("x")
    assert main(prune_args(tiny_model_dir, work / "afile" / "out", calib_text_file)) == 2
    message = error_message(capsys.readouterr().err)
    assert "cannot create" in message and "is not a folder" in message
    assert (work / "afile").read_text() == "x" and sorted(p.name for p in work.iterdir()) == ["afile"]


def test_output_is_a_file_with_overwrite(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    out.write_text("a file, not a folder")
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, "--overwrite"), out,
                         [tiny_model_dir, calib_text_file, out], "out", "not a folder")


# --------------------------------------------------------------------------- runs that succeed

EXPECTED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "llm_bip_summary.json", "llm_bip_scores.safetensors"}


def test_valid_prune_writes_complete_folder(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "pruned"
    before = {p: snapshot(p) for p in (tiny_model_dir, calib_text_file)}
    rc = main(prune_args(tiny_model_dir, out, calib_text_file, "--ratio=0.3"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "error" not in captured.err and "Traceback" not in captured.err
    assert f"wrote {out}" in captured.out
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in work.iterdir()) == ["pruned"], "a temporary sibling was left behind"
    summary = json.loads((out / "llm_bip_summary.json").read_text())
    assert summary["config"]["ratio"] == 0.3
    assert 0.25 < summary["parameters"]["block_ratio_removed"] < 0.35
    assert summary["parameters"]["blocks_after"] < summary["parameters"]["blocks_before"]
    assert {p: snapshot(p) for p in (tiny_model_dir, calib_text_file)} == before, "inputs changed"


def test_existing_output_with_overwrite_is_replaced(capsys, work, tiny_model_dir, calib_text_file):
    out = earlier_output(work / "out")
    rc = main(prune_args(tiny_model_dir, out, calib_text_file, "--overwrite"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "llm_bip_summary.json", OUTPUT_MARKER} <= names
    assert "earlier.txt" not in names, "--overwrite must replace the folder, not merge into it"
    assert sorted(p.name for p in work.iterdir()) == ["out"]


# --------------------------------------------------------------------------- a real process


def _console_script() -> str:
    beside = Path(sys.executable).with_name("llm-bip")
    found = str(beside) if beside.is_file() else shutil.which("llm-bip")
    assert found, "the llm-bip console script is not installed (pip install -e .)"
    return found


def test_console_script_reports_one_line_error(work, tiny_model_dir, calib_text_file):
    out = work / "out"
    before = snapshot(tiny_model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LLM_BIP_DEBUG", None)
    proc = subprocess.run([_console_script(), *prune_args(tiny_model_dir, out, calib_text_file, "--ratio=1.5")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    message = error_message(proc.stderr)
    assert "--ratio" in message and "1.5" in message
    assert not out.exists() and list(work.iterdir()) == []
    assert snapshot(tiny_model_dir) == before


def test_debug_switch_shows_the_cause_of_a_refusal(monkeypatch, work, tiny_model_dir):
    """With LLM_BIP_DEBUG=1 a refusal is raised whole, the error it was made from chained as its cause."""
    monkeypatch.setenv("LLM_BIP_DEBUG", "1")
    bad = work / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(PruneError, match="not a readable GGUF file") as raised:
        main(["prune", str(bad), "--out", str(work / "out")])
    shown = "".join(traceback.format_exception(raised.value))
    assert "ValueError: no GGUF magic number" in shown and "direct cause of the following exception" in shown
    assert not (work / "out").exists()
