"""Shared fixtures: an offline environment, a tiny LLaMA model folder and a calibration text file
(the models and tokenizer themselves come from llm_bip/testing.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub/datasets: they read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The tests' own llm-bip cache (GGUF conversions, perplexities): never the user's, the same for the session.
SESSION_CACHE = tempfile.TemporaryDirectory(prefix="llm-bip-test-cache-")
os.environ["LLM_BIP_CACHE"] = SESSION_CACHE.name

from llm_bip.testing import calibration_text, save_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the hub (llm_bip reads these at run time); unexpected errors stay one
    line (no LLM_BIP_DEBUG)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLM_BIP_DEBUG", raising=False)


@pytest.fixture
def work(tmp_path) -> Path:
    """Empty folder that holds the --out folder and nothing else."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random LLaMA model with tokenizer (treat as read-only: it is shared)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    """A calibration .txt file of a few thousand in-vocabulary words (read-only, shared)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calibration_text())
    return path
