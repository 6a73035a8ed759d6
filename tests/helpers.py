"""Helpers shared by the test modules: running ``llm-bip prune`` in-process and checking that it fails
cleanly, snapshots of files and folders, comparing two pruned output folders, and a trainer callback that
simulates a crash. (Tiny models, and the block-level helpers the benchmarks share, are in llm_bip.testing.)"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from llm_bip.cli import main
from llm_bip.outputs import OUTPUT_MARKER, SCORES_FILE, SUMMARY_FILE
from llm_bip.shards import read_weights

if TYPE_CHECKING:
    from pytest import CaptureFixture
    from transformers import TrainerCallback

# a prune that reads little calibration data and measures nothing
FAST = ["--samples", "4", "--calib-seqlen", "16", "--eval", "none"]

# One tqdm progress-bar frame, e.g. "Loading weights:  50%|█████     | 1/2 [00:00<00:00, 9.1it/s]".
PROGRESS_FRAME = re.compile(r"[^\r\n|]*\d+%\|[^\r\n|]*\| *[\d.?]+[kMG]?/[\d.?]+[kMG]? \[[^\]\r\n]*\] *")


def prune_args(model: Path | str, out: Path, calib: Path | str, *extra: str) -> list[str]:
    """``llm-bip prune`` arguments for a quick run (``FAST``) of ``model`` to ``out``, then ``extra``."""
    return ["prune", str(model), "--out", str(out), "--calibration", str(calib), *FAST, *extra]


def snapshot(path: Path) -> dict[str, tuple]:
    """Every file and folder under ``path`` (or the file itself): kind, size, mtime and content hash."""
    path = Path(path)
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    state = {}
    for p in entries:
        st = p.stat()
        key = str(p.relative_to(path)) if p != path else "."
        if p.is_dir():
            state[key] = ("dir", st.st_mtime_ns)
        else:
            state[key] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def is_progress_line(line: str) -> bool:
    """Whether ``line`` is nothing but tqdm progress-bar frames."""
    frames = [f for f in line.split("\r") if f.strip()]
    return bool(frames) and all(PROGRESS_FRAME.fullmatch(f) for f in frames)


def error_message(stderr: str) -> str:
    """The text after ``llm-bip: error: `` of the one message line in ``stderr`` (asserted: one line, last,
    no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.split("\n") if line.strip() and not is_progress_line(line)]
    assert len(lines) == 1, f"expected exactly one message line on stderr, got:\n{stderr}"
    assert lines[0].startswith("llm-bip: error: "), lines[0]
    assert stderr.rstrip().endswith(lines[0]), "the error must be the last thing on stderr"
    return lines[0][len("llm-bip: error: "):]


def assert_fails_cleanly(capsys: CaptureFixture[str], argv: list[str], out: Path, inputs: list[Path], *words: str,
                         code: int = 2, mid_write: bool = False) -> str:
    """Run ``main(argv)``; check it fails with a one-line message holding ``words``, writes nothing
    next to ``out`` and leaves ``inputs`` untouched. Returns the message. ``mid_write``: the failure
    comes once the temporary sibling was made, so only the parent folder's own mtime may change."""
    inputs = [Path(p) for p in inputs if Path(p).exists()]
    before_inputs = {p: snapshot(p) for p in inputs}

    def parent_state() -> dict[str, tuple]:
        state = snapshot(out.parent)
        if mid_write:
            state.pop(".")
        return state

    before_parent = parent_state() if out.parent.exists() else None
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == code, (rc, captured.err)
    message = error_message(captured.err)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        assert parent_state() == before_parent, "something was written next to --out"
    for p in inputs:
        assert snapshot(p) == before_inputs[p], f"input {p} changed"
    return message


def earlier_output(out: Path) -> Path:
    """``out`` as an earlier llm-bip run left it (its marker file, and one file of its own)."""
    out.mkdir()
    (out / OUTPUT_MARKER).write_text('{"written_by": "llm-bip"}')
    (out / "earlier.txt").write_text("an earlier run")
    return out


def assert_same_output(expected: Path, got: Path) -> None:
    """``got``, an offloaded run's output folder, holds what ``expected`` (the in-memory run's) holds, bit for
    bit: weights, configs, tokenizer, scores, and the summary's layers and parameter counts."""
    want, have = read_weights(expected), read_weights(got)
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert have[name].dtype == tensor.dtype and torch.equal(have[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (got / name).read_text() == (expected / name).read_text(), name
    scores_want, scores_have = load_file(str(expected / SCORES_FILE)), load_file(str(got / SCORES_FILE))
    assert scores_have.keys() == scores_want.keys()
    assert all(torch.equal(scores_have[k], v) for k, v in scores_want.items())
    summary_want, summary_have = (json.loads((d / SUMMARY_FILE).read_text()) for d in (expected, got))
    assert summary_have["layers"] == summary_want["layers"]
    assert summary_have["parameters"] == summary_want["parameters"]
    assert summary_have["offload"] and not summary_want["offload"]


def stop_after_save(step: int) -> TrainerCallback:
    """A trainer callback that simulates a crash (KeyboardInterrupt) right after the checkpoint of step ``step``.
    (transformers' trainer is imported only here: it is slow to import.)"""
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return StopAfterSave()


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model``'s state."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    """``model``'s state holds exactly the tensors ``expected`` (``weights`` of an earlier state)."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
