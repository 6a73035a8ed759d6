"""Faults beyond bad options: damaged or mismatched model folders, a foreign tokenizer, NaN/Inf
activations, failed writes (no permission, full disk) and interrupted runs.

Each must end with a one-line error (or the interrupt message) and a non-zero exit, leave no
``.OUT.tmp-*`` sibling and no partial ``--out``, keep an existing ``--out`` whole, and leave the
input files untouched. Calibration text shorter than one window is covered in test_cli_errors.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_fails_cleanly, earlier_output, error_message, prune_args, snapshot
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_bip import PruneConfig, PruneError, load_pruned, prune, save_model
from llm_bip.cli import main
from llm_bip.testing import build_tokenizer, random_ids, tiny_model


@pytest.fixture(scope="module")
def per_layer_dir(tmp_path_factory) -> Path:
    """A pruned folder with per-layer widths (loaded by load_pruned, not by stock transformers)."""
    model = tiny_model("llama-gqa", layers=4, scale=5.0)
    prune(model, None, PruneConfig(ratio=0.3, allocation="global"), calib=random_ids())
    folder = save_model(model, build_tokenizer(), tmp_path_factory.mktemp("per-layer") / "model", overwrite=False)
    assert json.loads((folder / "config.json").read_text())["per_layer_config"], "widths came out uniform"
    return folder


def model_copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "in" / "model"))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def save_with_tokenizer(model, tokenizer_source: Path, folder: Path) -> Path:
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- damaged model folders


def _garbage(data: bytes) -> bytes:
    return os.urandom(len(data))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["garbage", "truncated"])
@pytest.mark.parametrize("layout", ["stock", "per-layer"])
def test_damaged_safetensors(capsys, tmp_path, work, tiny_model_dir, per_layer_dir, calib_text_file, layout, damage):
    model = model_copy(tiny_model_dir if layout == "stock" else per_layer_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(model, out, calib_text_file), out, [model, calib_text_file],
                         str(model), "corrupted or truncated")


def test_damaged_per_layer_folder_through_the_api(tmp_path, per_layer_dir):
    model = model_copy(per_layer_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(_truncated(weights.read_bytes()))
    with pytest.raises(PruneError, match=r"model\.safetensors: corrupted or truncated safetensors file"):
        load_pruned(model)


def test_truncated_config(capsys, tmp_path, work, tiny_model_dir, calib_text_file):
    model = model_copy(tiny_model_dir, tmp_path)
    config = model / "config.json"
    config.write_bytes(config.read_bytes()[:40])
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(model, out, calib_text_file), out, [model, calib_text_file],
                         str(model), "cannot read its config")


def _wider_ffn(config):
    config["intermediate_size"] = 80


def _more_layers(config):
    config["num_hidden_layers"] = 3


def _fewer_layers(config):
    config["num_hidden_layers"] = 1


def _wider_ffn_in_layer_1(config):
    config["per_layer_config"]["1"]["intermediate_size"] = 80


def _fewer_layers_per_layer(config):
    config["num_hidden_layers"] = 3
    del config["per_layer_config"]["3"]


@pytest.mark.parametrize("layout,edit,words", [
    ("stock", _wider_ffn, ["6 of another shape", "mlp.down_proj.weight is [32, 48], config.json says [32, 80]"]),
    ("stock", _more_layers, ["9 missing", "model.layers.2."]),
    ("stock", _fewer_layers, ["9 not in the model", "model.layers.1."]),
    ("per-layer", _wider_ffn_in_layer_1, ["of another shape", "layers.1.mlp", "config.json says"]),
    ("per-layer", _fewer_layers_per_layer, ["not in the model", "model.layers.3."]),
], ids=["ffn-width", "more-layers", "fewer-layers", "per-layer-ffn-width", "per-layer-fewer-layers"])
def test_config_does_not_match_weights(capsys, tmp_path, work, tiny_model_dir, per_layer_dir, calib_text_file,
                                       layout, edit, words):
    model = model_copy(tiny_model_dir if layout == "stock" else per_layer_dir, tmp_path)
    edit_config(model, edit)
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(model, out, calib_text_file), out, [model, calib_text_file],
                         str(model), "weights do not match config.json", *words)


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_tokenizer_larger_than_the_embedding(capsys, tmp_path, work, tiny_model_dir, calib_text_file, command):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(20)  # the tokenizer's ids run to 58
    folder = save_with_tokenizer(model, tiny_model_dir, tmp_path / "in" / "model")
    out = work / "out"
    argv = prune_args(folder, out, calib_text_file)
    if command == "eval":
        argv = ["eval", str(folder), "--ppl", str(calib_text_file), "--out", str(out)]
    assert_fails_cleanly(capsys, argv, out, [folder, calib_text_file],
                         "tokenizer has 59 tokens", "embeds only 20", "belongs to another model")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_calibration_activations(capsys, tmp_path, work, tiny_model_dir, calib_text_file, value):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = value
    folder = save_with_tokenizer(model, tiny_model_dir, tmp_path / "in" / "model")
    out = work / "out"
    assert_fails_cleanly(capsys, prune_args(folder, out, calib_text_file), out, [folder, calib_text_file],
                         "calibration activations contain NaN or Inf", "check the model's weights")


# --------------------------------------------------------------------------- failed writes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a 0o555 folder; see the simulated cases below")
def test_read_only_output_parent(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    work.chmod(0o555)
    try:
        assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file), out,
                             [tiny_model_dir, calib_text_file], "cannot write to", str(work))
    finally:
        work.chmod(0o755)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _eacces(*_args, **_kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def _safetensors_enospc(*_args, **_kwargs):  # how safetensors' Rust writer reports a full disk
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("target,failure,cause", [
    ("transformers.modeling_utils.safe_save_file", _safetensors_enospc, "No space left on device"),
    ("transformers.modeling_utils.safe_save_file", _eacces, "Permission denied"),
    ("llm_bip.job.save_scores", _enospc, "No space left on device"),  # after weights and tokenizer
], ids=["weights-disk-full", "weights-no-permission", "scores-disk-full"])
def test_failed_write(capsys, monkeypatch, work, tiny_model_dir, calib_text_file, target, failure, cause, existing):
    out = work / "out"
    if existing:
        earlier_output(out)
    monkeypatch.setattr(target, failure)
    argv = prune_args(tiny_model_dir, out, calib_text_file, "--overwrite")
    # snapshots of work (so of an existing out too) are compared before and after
    assert_fails_cleanly(capsys, argv, out, [tiny_model_dir, calib_text_file], f"cannot write {out}", cause,
                         mid_write=True)
    assert sorted(p.name for p in work.iterdir()) == (["out"] if existing else [])


def test_failed_swap_restores_the_existing_output(capsys, monkeypatch, work, tiny_model_dir, calib_text_file):
    out = earlier_output(work / "out")
    rename = Path.rename

    def fail_new_into_place(self, target):
        if ".tmp-" in self.name and not self.name.endswith("-replaced") and Path(target) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_new_into_place)
    assert_fails_cleanly(capsys, prune_args(tiny_model_dir, out, calib_text_file, "--overwrite"), out,
                         [tiny_model_dir, calib_text_file], f"cannot write {out}", "Input/output error",
                         mid_write=True)
    assert [p.name for p in work.iterdir()] == ["out"]
    assert (out / "earlier.txt").read_text() == "an earlier run"


# --------------------------------------------------------------------------- interrupted runs


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_mid_save_cleans_up(capsys, monkeypatch, work, tiny_model_dir, calib_text_file, sig, code, word):
    out = earlier_output(work / "out")
    before = snapshot(out)
    written = []

    def signalled_save_scores(path, record):
        written.extend(sorted(p.name for p in path.parent.iterdir()))
        # a real signal, sent to the main thread itself: a process-wide os.kill may be taken by a
        # worker thread (torch's, tqdm's), leaving this thread to run on until the interpreter notices
        signal.pthread_kill(threading.main_thread().ident, sig)
        pytest.fail("the signal handler did not run at the next bytecode")

    monkeypatch.setattr("llm_bip.job.save_scores", signalled_save_scores)
    handler = signal.getsignal(signal.SIGTERM)
    # Ctrl-C as in a terminal: a job started in the background (CI's, nohup's) inherits SIGINT ignored,
    # and then Python never raises KeyboardInterrupt
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = main(prune_args(tiny_model_dir, out, calib_text_file, "--overwrite"))
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    stderr = capsys.readouterr().err
    assert rc == code, stderr
    assert "model.safetensors" in written, "the signal must land on a half-written folder"
    assert "Traceback" not in stderr and stderr.rstrip().endswith(f"llm-bip: {word}; nothing was written")
    assert [p.name for p in work.iterdir()] == ["out"], "a temporary sibling was left behind"
    assert snapshot(out) == before, "the existing output folder was modified"
    assert signal.getsignal(signal.SIGTERM) is handler, "main() must restore the SIGTERM handler"


# SIGKILL allows no cleanup, so it needs a real process: this runs the CLI with a save that
# stalls once weights and tokenizer are in the temporary folder (marked by a "stalled" file).
STALLED_SAVE = """
import sys, time
import llm_bip.cli as cli
import llm_bip.job as job

def stalled_save_scores(path, record):
    (path.parent / "stalled").touch()
    time.sleep(300)

job.save_scores = stalled_save_scores
sys.exit(cli.main(sys.argv[1:]))
"""


def start_stalled_prune(out: Path, model: Path, calib: Path) -> tuple[subprocess.Popen, Path]:
    """The running process and its temporary folder, once the save has stalled."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_SAVE, *prune_args(model, out, calib)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        stalled = list(out.parent.glob(f".{out.name}.tmp-*/stalled"))
        if stalled:
            return proc, stalled[0].parent
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the save never started: {proc.communicate(timeout=30)}")


def test_killed_run_leaves_only_a_temporary_folder(capsys, work, tiny_model_dir, calib_text_file):
    out = work / "out"
    proc, tmp = start_stalled_prune(out, tiny_model_dir, calib_text_file)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a folder that looks complete"
    assert [p.name for p in work.iterdir()] == [tmp.name] and tmp.name.startswith(f".{out.name}.tmp-")
    rc = main(prune_args(tiny_model_dir, out, calib_text_file))  # the next run ignores the leftover
    assert rc == 0, error_message(capsys.readouterr().err)
    assert (out / "llm_bip_scores.safetensors").is_file() and not (out / "stalled").exists()
    assert sorted(p.name for p in work.iterdir()) == sorted([tmp.name, "out"])
