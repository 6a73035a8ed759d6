"""The record between the two phases of pruning (engine.py), and its file: every unit's score plus
what the cut needs besides (output norms for normalised ranking, calibration means for bias
compensation), with the settings and widths they belong to. Pruning again from a saved record at
another ratio or allocation needs no data and no forward pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import PruneError
from .metrics import UnitScores
from .outputs import SCORES_FILE

METADATA_KEY = "llm_bip_scores"
# the settings of files written before a field existed
EARLIER_SETTINGS = {"selection": "scores"}


@dataclass
class ScoreRecord:
    """Scores of the prunable layers of one model, and what pruning from them needs."""

    scores: dict[int, UnitScores]
    norms: dict[int, float]
    means: dict[int, tuple[torch.Tensor, torch.Tensor]]  # (o_proj input, down_proj input) means
    settings: dict  # the scoring settings of the run (PrunePlan.scoring_settings)
    widths: list[dict]  # every layer's widths when scored

    def check_matches(self, settings: dict, widths: list[dict], prunable: list[int]) -> None:
        """Raise PruneError unless these scores are what a full run with ``settings`` would compute."""
        differing = [f"{k} {self.settings.get(k)!r} (asked: {v!r})" for k, v in settings.items()
                     if self.settings.get(k) != v]
        if differing:
            raise PruneError("--scores were computed with other scoring settings: " + ", ".join(differing)
                             + "; set the same options or recompute the scores")
        if self.settings["sequential"]:
            raise PruneError("--scores of a --sequential run depend on the ratio and cannot be reused")
        if self.widths != widths:
            raise PruneError("--scores belong to a model with other layer widths than this one")
        missing = sorted(set(prunable) - set(self.scores))
        if missing:
            raise PruneError(f"--scores hold no scores for layers {missing} (kept dense when scored)")

    def only(self, layers: list[int]) -> "ScoreRecord":
        """The record of ``layers`` alone."""
        return ScoreRecord({i: self.scores[i] for i in layers}, {i: self.norms[i] for i in layers},
                           {i: m for i, m in self.means.items() if i in layers}, self.settings, self.widths)


# UnitScores fields a metric may leave out
OPTIONAL_SCORES = ("kv_heads", "attn_channels")


def save_scores(path: str | Path, record: ScoreRecord) -> None:
    """``layer{i}.heads`` / ``.channels`` / ``.output_norm`` (and ``.kv_heads`` / ``.attn_channels``
    where the metric gives them, ``.attn_mean`` / ``.ffn_mean`` when compensating) as float64
    tensors; settings and widths in the file's metadata."""
    tensors = {}
    for i, s in record.scores.items():
        tensors[f"layer{i}.heads"] = s.heads.double().contiguous()
        tensors[f"layer{i}.channels"] = s.channels.double().contiguous()
        tensors[f"layer{i}.output_norm"] = torch.tensor([record.norms[i]], dtype=torch.float64)
        for name in OPTIONAL_SCORES:
            if getattr(s, name) is not None:
                tensors[f"layer{i}.{name}"] = getattr(s, name).double().contiguous()
    for i, (attn, ffn) in record.means.items():
        tensors[f"layer{i}.attn_mean"] = attn.double().contiguous()
        tensors[f"layer{i}.ffn_mean"] = ffn.double().contiguous()
    metadata = {METADATA_KEY: json.dumps({"settings": record.settings, "widths": record.widths})}
    save_file(tensors, str(path), metadata=metadata)


def load_scores(path: str | Path) -> ScoreRecord:
    """Read a scores file written by ``save_scores``; a clear PruneError for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise PruneError(f"--scores {path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise PruneError(f"--scores {path}: not a scores file written by llm-bip prune ({err})") from err
    layers = sorted({int(k.split(".")[0][5:]) for k in tensors if k.endswith(".heads")})
    means = {i: (tensors[f"layer{i}.attn_mean"], tensors[f"layer{i}.ffn_mean"])
             for i in layers if f"layer{i}.attn_mean" in tensors}
    return ScoreRecord(
        scores={i: UnitScores(tensors[f"layer{i}.heads"], tensors[f"layer{i}.channels"],
                              **{name: tensors.get(f"layer{i}.{name}") for name in OPTIONAL_SCORES})
                for i in layers},
        norms={i: float(tensors[f"layer{i}.output_norm"]) for i in layers},
        means=means, settings={**EARLIER_SETTINGS, **meta["settings"]}, widths=meta["widths"],
    )
