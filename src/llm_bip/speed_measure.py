"""Timing of one model: prefill and greedy decode throughput, repeated after warm-up, with peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .profiling import PhaseLog
from .speed_macs import decode_context, macs_per_token, prefill_context
from .speed_settings import SpeedSettings


def random_ids(vocab_size: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Token ids of shape (batch, length), the same for every model under one seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


def _sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with queued device work finished before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def repeated(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    """The seconds ``run`` reports on each of ``repeats`` calls after ``warmup`` discarded ones."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def throughput(seconds: list[float], tokens: int) -> dict:
    """Median and min/max of the runs in ms, and tokens/s at the median."""
    median = statistics.median(seconds)

    def ms(s: float) -> float:
        return round(1e3 * s, 4)

    return {"ms": {"median": ms(median), "min": ms(min(seconds)), "max": ms(max(seconds)),
                   "runs": [ms(s) for s in seconds]}, "tokens_per_s": tokens / median}


def start_decode(model, prompt: torch.Tensor) -> tuple[object, torch.Tensor]:
    """(KV cache, first greedy token) after a forward over the prompt."""
    out = model(prompt, use_cache=True)
    return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_steps(model, cache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy one-token forwards on the KV cache; the tokens they produce (batch, steps)."""
    tokens = []
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


class ModelBench:
    """Measurements of one loaded model under the given settings."""

    def __init__(self, model, settings: SpeedSettings):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.log = PhaseLog()

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return random_ids(self.model.config.vocab_size, batch, length, self.settings.seed, self.device)

    def prefill(self, batch: int, length: int) -> dict:
        """Time and MACs of one forward over ``batch`` x ``length`` tokens, without a KV cache."""
        ids = self.ids(batch, length)
        with self.log.phase(f"prefill {batch}x{length}"):
            seconds = repeated(lambda: timed(lambda: self.model(ids, use_cache=False), self.device),
                               self.settings.warmup, self.settings.repeats)
        return {"batch": batch, "length": length, "macs_per_token": macs_per_token(self.model, prefill_context(length)),
                **throughput(seconds, batch * length)}

    def decode(self, batch: int) -> dict:
        """Per-step time of greedy decoding (the prompt's forward is not timed)."""
        s = self.settings
        prompt = self.ids(batch, s.prompt_length)

        def seconds_per_step() -> float:
            cache, token = start_decode(self.model, prompt)
            return timed(lambda: decode_steps(self.model, cache, token, s.decode_tokens), self.device) / s.decode_tokens

        with self.log.phase(f"decode {batch}"):
            seconds = repeated(seconds_per_step, s.warmup, s.repeats)
        context = decode_context(s.prompt_length, s.decode_tokens)
        return {"batch": batch, "prompt_length": s.prompt_length, "new_tokens": s.decode_tokens,
                "macs_per_token": macs_per_token(self.model, context), **throughput(seconds, batch)}

    def peak_memory_mb(self) -> float:
        """Peak over all measurements: CUDA memory allocated on a GPU, process RSS on the CPU."""
        key = "peak_cuda_mb" if self.device.type == "cuda" else "peak_rss_mb"
        return max(phase[key] for phase in self.log.phases.values())

    @torch.inference_mode()
    def run(self) -> dict:
        """Sizes, MACs, every prefill and decode setting, and the peak memory over all of them."""
        s = self.settings
        params = list(self.model.parameters())
        return {
            "params": sum(p.numel() for p in params),
            "weights_mb": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "linear_macs_per_token": macs_per_token(self.model, 0)["total"],
            "prefill": [self.prefill(b, n) for b in s.batch_sizes for n in s.lengths],
            "decode": [self.decode(b) for b in s.batch_sizes],
            "peak_memory_mb": self.peak_memory_mb(),
            "phases": self.log.phases,
        }
