"""Shared fixtures: an offline environment and a tiny LLaMA model folder with a word-level tokenizer."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub/datasets: they read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The tests' own llm-bip cache (GGUF conversions, perplexities): never the user's, the same for the session.
SESSION_CACHE = tempfile.TemporaryDirectory(prefix="llm-bip-test-cache-")
os.environ["LLM_BIP_CACHE"] = SESSION_CACHE.name

# Words of the tiny tokenizer; with the special tokens they must fit the model's vocabulary.
WORDS = (
    "the a of and to in is was for on that with as by at from it his her they "
    "we you he she be are were had has have not but or an this which one all "
    "new year time people day man world life hand part child eye woman place work week case point"
).split()
SPECIAL = ["[UNK]", "<s>", "</s>"]
VOCAB = 64  # model vocabulary, >= the tokenizer's
assert len(SPECIAL) + len(WORDS) <= VOCAB


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the hub (llm_bip reads these at run time); unexpected errors stay one
    line (no LLM_BIP_DEBUG)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLM_BIP_DEBUG", raising=False)


def build_tokenizer():
    """A word-level fast tokenizer over ``WORDS``, built without any download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def save_tiny_model(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """Save a random tiny LLaMA (hidden 32, 4 query heads over 2 KV heads, FFN 48) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def calibration_text(n_words: int = 3000, seed: int = 0) -> str:
    """Plain text of ``n_words`` vocabulary words, one tokenizer token each."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(n_words // 20)]
    return "\n".join(lines) + "\n"


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
