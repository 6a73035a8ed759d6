"""What a report shows, read from a run folder (and extra eval / speed folders): summary, scores, evals, speed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .errors import PruneError
from .outputs import EVAL_FILE, SCORES_FILE, SPEED_FILE, SUMMARY_FILE

RUN_FILES = (SUMMARY_FILE, SCORES_FILE, EVAL_FILE, SPEED_FILE)
SPEED_KINDS = ("prefill", "decode")  # the settings of a speed result, by kind
# a summary's layer widths, as the report names them
WIDTH_NAMES = {"num_heads": "query heads", "num_kv_heads": "KV heads", "intermediate_size": "FFN channels"}
SCORE_KEY = re.compile(r"layer(\d+)\.(\w+)")


@dataclass
class RunData:
    """Everything a report can show; each part may be missing."""

    name: str
    summary: dict = field(default_factory=dict)
    scores: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    speed: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a PruneError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PruneError(f"{path}: cannot read JSON ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise PruneError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_scores(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """``layer{i}.heads`` / ``layer{i}.channels`` tensors (see scores.save_scores) as {i: {kind: array}}."""
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise PruneError(f"{path}: cannot read scores ({type(err).__name__}: {err})") from err
    scores: dict[int, dict[str, np.ndarray]] = {}
    for key, values in tensors.items():
        match = SCORE_KEY.fullmatch(key)
        if match:
            scores.setdefault(int(match[1]), {})[match[2]] = values
    return dict(sorted(scores.items()))


def read_extra(path: Path, name: str, option: str) -> dict:
    """The JSON of an extra folder given by ``option`` (or the JSON file itself)."""
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise PruneError(f"{option} {path}: no {name} there; pass a folder written by llm-bip")
    return read_json(file)


def load_run(run: Path, speed: Path | None = None, evals: Sequence[Path] = ()) -> RunData:
    """Whatever ``run`` holds, plus the speed and eval results of the extra folders ``speed`` and ``evals``."""
    if not run.is_dir():
        raise PruneError(f"{run}: no such run folder")
    present = [name for name in RUN_FILES if (run / name).is_file()]
    if not present:
        raise PruneError(f"{run} holds none of {', '.join(RUN_FILES)}; pass a folder written by "
                         "llm-bip prune, finetune, distill, eval or bench-speed")
    data = RunData(name=run.resolve().name)
    if SUMMARY_FILE in present:
        data.summary = read_json(run / SUMMARY_FILE)
    if SCORES_FILE in present:
        data.scores = read_scores(run / SCORES_FILE)
    if EVAL_FILE in present:
        data.evals.append(read_json(run / EVAL_FILE))
    data.evals += [read_extra(path, EVAL_FILE, "--eval") for path in evals]
    if speed is not None:
        data.speed = read_extra(speed, SPEED_FILE, "--speed")
    elif SPEED_FILE in present:
        data.speed = read_json(run / SPEED_FILE)
    return data
