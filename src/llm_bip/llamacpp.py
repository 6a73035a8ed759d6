"""llama.cpp (through llama-cpp-python) as the engine that serves an exported GGUF: its quantizer, its
logits for token windows, and timed prompt processing and generation."""

from __future__ import annotations

import ctypes
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import PruneError
from .evaluation import Perplexity, split_label, text_windows, window_nll

INSTALL_HINT = "pip install --no-deps llama-cpp-python==0.3.36 (pinned in requirements.lock; builds llama.cpp)"


def require_llama_cpp():
    """The llama_cpp module, or a PruneError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise PruneError(f"this needs llama.cpp's Python binding: {INSTALL_HINT}") from err
    return llama_cpp


def quantize(source: Path, target: Path, ftype: int, threads: int = 0) -> None:
    """llama.cpp's quantizer: ``source`` GGUF (f32/f16) to ``target`` as llama_ftype ``ftype``."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise PruneError(f"llama.cpp could not quantize {source} (llama_ftype {ftype})")


@contextmanager
def open_gguf(path: str | Path, context: int = 512, logits_all: bool = True, threads: int | None = None,
              flash_attn: bool = False, f32_cache: bool = False):
    """A llama.cpp model and context of ``context`` tokens, closed on exit (llama-cpp-python raises at
    interpreter exit for one left open). ``f32_cache``: keep K and V in float32, not llama.cpp's default
    f16 (whose rounding moves logits by about 1e-3 relative)."""
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise PruneError(f"{path}: no such GGUF file")
    cache_type = llama_cpp.GGML_TYPE_F32 if f32_cache else None
    try:
        model = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                logits_all=logits_all, n_threads=threads or os.cpu_count(), flash_attn=flash_attn,
                                type_k=cache_type, type_v=cache_type, verbose=False)
    except ValueError as err:
        raise PruneError(f"{path}: llama.cpp cannot load it ({err})") from err
    try:
        yield model
    finally:
        model.close()


def window_logits(model, windows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits (n, L, vocab) for each window of token ids (n, L), each from an empty cache."""
    out = []
    for window in windows.tolist():
        model.reset()
        model.eval(window)
        out.append(torch.from_numpy(np.array(model.scores[: len(window)], dtype=np.float32)))
    return torch.stack(out)


def prompt_seconds(model, tokens: list[int]) -> float:
    """Wall seconds llama.cpp takes to process ``tokens`` as one prompt from an empty cache."""
    model.reset()
    start = time.perf_counter()
    model.eval(tokens)
    return time.perf_counter() - start


def generation_seconds(model, prompt: list[int], continuation: list[int]) -> float:
    """Wall seconds of single-token decode steps through ``continuation`` after ``prompt``: the work of
    generating those tokens (which tokens they are does not change it)."""
    model.reset()
    model.eval(prompt)
    start = time.perf_counter()
    for token in continuation:
        model.eval([token])
    return time.perf_counter() - start


def gguf_perplexity(path: str | Path, tokenizer, dataset: str = "ptb", split: str = "test", seqlen: int = 128,
                    max_tokens: int | None = None, threads: int | None = None) -> Perplexity:
    """Perplexity with llm-bip's protocol (the same windows of the same token ids) from llama.cpp's logits."""
    windows = text_windows(tokenizer, dataset, split, seqlen, max_tokens)
    with open_gguf(path, context=seqlen, threads=threads) as model:
        nll, count = window_nll(lambda batch: window_logits(model, batch), windows, 1, progress=False)
    return Perplexity(dataset, split_label(dataset, split), seqlen, windows.shape[0], count, math.exp(nll / count))
