"""``--calibration self``: calibration windows that the model writes itself (data-free calibration).

From one start token (the tokenizer's BOS, else the first token of its chat template) the model samples
each window's other ``seqlen - 1`` tokens: plain sampling from its whole next-token distribution
(temperature 1, no top-k or top-p; an end-of-text token is sampled like any other and the text goes
on), with a KV cache, at least ``batch_size`` windows at a time, from a generator seeded with ``seed``. The
windows are kept in the llm-bip cache under a digest of the weights, config, device, these settings
and the library versions, so the same run again reads them instead of sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .config import PruneConfig, PrunePlan
from .data import SELF, calibration_ids
from .devices import input_device
from .errors import PruneError
from .evaluation import model_digest
from .outputs import cache_dir, write_cache_entry

SAMPLING = "temperature 1, whole vocabulary, KV cache"  # in the cache key: another scheme is another entry


def calibration_batch(model, tokenizer, config: PruneConfig | PrunePlan) -> torch.Tensor:
    """The calibration ids [n_samples, seqlen] that ``config`` names: written by ``model`` for 'self',
    else windows of the train split (or whole file) of its text source."""
    if config.calibration == SELF:
        return self_calibration_ids(model, tokenizer, config.n_samples, config.seqlen, config.seed,
                                    config.batch_size)
    return calibration_ids(tokenizer, config.calibration, config.n_samples, config.seqlen, config.seed)


def self_calibration_ids(model, tokenizer, n_samples: int, seqlen: int, seed: int, batch_size: int) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens sampled from ``model``, from the cache when an identical
    run kept them there."""
    start, vocab, at_once = start_token(tokenizer), len(tokenizer), windows_at_once(model, seqlen, batch_size)
    settings = {"calibration": SELF, "start": start, "vocab": vocab, "n_samples": n_samples, "seqlen": seqlen,
                "seed": seed, "at_once": at_once, "sampling": SAMPLING}
    entry = cache_dir() / "calibration" / f"{model_digest(model, settings).hexdigest()}.safetensors"
    if entry.is_file():
        return load_file(entry)["ids"]
    ids = sample_windows(model, start, vocab, n_samples, seqlen, seed, at_once)
    write_cache_entry(entry, lambda path: Path(path).write_bytes(save({"ids": ids})))  # the umask's modes
    return ids


def windows_at_once(model, seqlen: int, batch_size: int) -> int:
    """``batch_size`` windows at a time, or more while their KV cache stays within the weights' memory: each
    decoding step reads all the weights, so a wider step costs little more time, and peak memory stays
    about twice the model's. The config's widths are the widest block's, so this errs on the small side."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element_size = next(model.parameters()).element_size()
    per_window = config.num_hidden_layers * 2 * kv_heads * head_dim * seqlen * element_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(batch_size, weights // per_window)


def start_token(tokenizer) -> int:
    """The tokenizer's BOS token, else the first token of its chat template."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if not getattr(tokenizer, "chat_template", None):
        raise PruneError("--calibration self starts each window with the BOS token or the chat template's first "
                         "token; this tokenizer has neither")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids[0]


def sample_windows(model, start: int, vocab: int, n_samples: int, seqlen: int, seed: int,
                   batch_size: int) -> torch.Tensor:
    """[n_samples, seqlen] token ids on the CPU: ``start``, then tokens below ``vocab`` (the tokenizer's:
    an embedding padded beyond it has no text), sampled ``batch_size`` windows at a time."""
    if n_samples < 1 or seqlen < 2:
        raise PruneError("need at least one calibration sample of at least 2 tokens")
    generator = torch.Generator(device=input_device(model)).manual_seed(seed)
    with tqdm(total=n_samples * (seqlen - 1), desc="self-calibration tokens", leave=False) as bar:
        return torch.cat([_sample(model, torch.full((min(batch_size, n_samples - first), 1), start), vocab, seqlen,
                                  generator, bar.update) for first in range(0, n_samples, batch_size)])


@torch.no_grad()
def _sample(model, ids: torch.Tensor, vocab: int, seqlen: int, generator: torch.Generator,
            done: Callable[[int], object]) -> torch.Tensor:
    """Extend ``ids`` [rows, 1] to ``seqlen`` tokens, one sampled step at a time over a KV cache."""
    ids, cache = ids.to(generator.device), None
    for _ in range(seqlen - 1):
        out = model(ids[:, -1:], cache=cache, use_cache=True)
        cache = out.cache
        probs = out.logits[:, -1, :vocab].float().softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        done(ids.shape[0])
    return ids.cpu()
