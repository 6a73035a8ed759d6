"""Resume state of an offloaded run (``--offload``, ``--resume``), kept in ``OUT.partial`` next to ``OUT``.

The folder holds the run's settings (a resumed run must ask for the same), the cut blocks' shards
(offload.py writes them) and, for each pass over the blocks, the scores so far and the next
block's calibration inputs. So an interrupted run continues from its last completed block, with
the same result bit for bit. In-memory runs keep no progress.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .calibration import BlockInputs
from .errors import PruneError
from .outputs import write_atomically
from .scores import ScoreRecord, load_scores, save_scores
from .shards import write_tensors


@dataclass
class Progress:
    """How far a pass over the blocks got: the next block, its calibration inputs, and the record
    (scores, output norms, calibration means) of the blocks before it."""

    next_block: int
    inputs: BlockInputs | None
    record: ScoreRecord


def partial_folder(out: Path) -> Path:
    """Where an offloaded run keeps its work until ``out`` is written."""
    return out.parent / f"{out.name}.partial"


def begin_work(partial: Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Start the work folder ``partial``, or with ``resume`` continue the run in it (the same
    ``settings``, else a PruneError); an earlier run's work is discarded only with ``overwrite``."""
    settings = json.loads(json.dumps(settings))
    saved = _settings_file(partial)
    if resume:
        _check_same_settings(saved, settings)
        return
    if partial.exists():
        if not saved.is_file() and any(partial.iterdir()):
            raise PruneError(f"{partial} is in the way of the offloaded run's work folder and was not written by "
                             "llm-bip; remove it or choose another --out")
        if not overwrite:
            raise PruneError(f"{partial} holds an unfinished offloaded run; pass --resume to continue it "
                             "or --overwrite to start over")
        shutil.rmtree(partial)
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps(settings, indent=2))


class ProgressStore:
    """The passes' progress in ``partial``; hidden states are read back onto ``device``."""

    def __init__(self, partial: Path, device: str | torch.device):
        self.folder, self.device = partial / "progress", torch.device(device)

    def load(self, stage: str, inputs: BlockInputs | None) -> Progress | None:
        """Where the pass ``stage`` stands, given block 0's calibration inputs (whose keyword arguments
        every block shares); None when it has not started."""
        marker = self._file(stage, "inputs")
        if not marker.is_file():
            return None
        with safe_open(str(marker), "pt") as f:
            next_block = int(f.metadata()["next_block"])
            hidden = [f.get_tensor(f"batch{j}").to(self.device) for j in range(len(inputs or []))]
        if inputs is not None:
            inputs = [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]
        saved = load_scores(self._file(stage, "scores"))
        done = [i for i in saved.scores if i < next_block]  # a block scored after the marker was written is redone
        return Progress(next_block, inputs, saved.only(done))

    def save(self, stage: str, progress: Progress) -> None:
        """Keep ``progress`` of the pass ``stage``: the record first, then the marker that points past it."""
        write_atomically(self._file(stage, "scores"), lambda path: save_scores(path, progress.record))
        hidden = {f"batch{j}": h for j, (h, _) in enumerate(progress.inputs or [])}
        write_tensors(self._file(stage, "inputs"), hidden, {"next_block": str(progress.next_block)})

    def _file(self, stage: str, kind: str) -> Path:
        return self.folder / f"{stage}-{kind}.safetensors"


def _settings_file(partial: Path) -> Path:
    return partial / "progress" / "settings.json"


def _check_same_settings(saved: Path, settings: dict) -> None:
    """Refuse to resume a run (its settings file ``saved``) with other settings than ``settings``."""
    if not saved.is_file():
        raise PruneError(f"--resume: no unfinished offloaded run in {saved.parent.parent}; run without --resume")
    before = json.loads(saved.read_text())
    differing = [f"{k} {before.get(k)!r} (asked: {v!r})" for k, v in settings.items() if before.get(k) != v]
    if differing:
        raise PruneError(f"--resume: the run in {saved.parent.parent} has other settings: {', '.join(differing)}; "
                         "set the same options, or pass --overwrite without --resume to start over")
