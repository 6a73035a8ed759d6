"""What every run writes besides a model: the names of llm-bip's own files, and the versions of
the libraries that made them. A bottom module: it imports nothing from llm_bip."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SUMMARY_FILE = "llm_bip_summary.json"  # llm-bip prune and finetune
SCORES_FILE = "llm_bip_scores.safetensors"  # llm-bip prune (scores.py)
EVAL_FILE = "llm_bip_eval.json"  # llm-bip eval
SPEED_FILE = "llm_bip_speed.json"  # llm-bip bench-speed
OUTPUT_MARKER = "llm_bip_output.json"  # in every folder llm-bip writes: --overwrite replaces only those

try:
    __version__ = version("llm-bip")  # pyproject.toml's, the one source
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llm_bip": __version__}


def input_summary(source: str | Path) -> dict:
    """The summary of an llm-bip output folder given as input, or {}."""
    path = Path(source) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
