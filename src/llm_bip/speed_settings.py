"""What bench-speed measures: batch sizes, lengths, decode steps, repeats, device; checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig

from .errors import PruneError
from .sources import resolve_source


def parse_sizes(text: str, option: str) -> list[int]:
    """'1,8' -> [1, 8]; anything but comma-separated positive integers is a PruneError."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise PruneError(f"{option} takes comma-separated positive integers, e.g. 1,8; got {text!r}")
    return values


@dataclass
class SpeedSettings:
    """What is measured. The defaults keep dense + two pruned SmolLM2-135M within a few minutes on
    2 CPU cores (one 8x512 forward of the dense model takes about 12 s there)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    lengths: list[int] = field(default_factory=lambda: [128, 512])
    decode_tokens: int = 32
    prompt_length: int = 32
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def validate(self) -> None:
        sizes = {"--decode-tokens": self.decode_tokens, "--prompt-length": self.prompt_length,
                 "--repeats": self.repeats}
        if self.threads is not None:
            sizes["--threads"] = self.threads
        for option, value in sizes.items():
            if value < 1:
                raise PruneError(f"{option} must be a positive integer, got {value}")
        if self.warmup < 0:
            raise PruneError(f"--warmup must be zero or more, got {self.warmup}")
        if not (self.batch_sizes and self.lengths and min(self.batch_sizes + self.lengths) >= 1):
            raise PruneError("--batch-sizes and --lengths must list positive integers")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PruneError(f"--device {self.device}: no CUDA device is available here")

    @property
    def positions(self) -> int:
        """The most positions any measurement uses."""
        return max(*self.lengths, self.prompt_length + self.decode_tokens)


def check_positions(source: str, settings: SpeedSettings) -> None:
    """Fail before any measurement when a model cannot hold the longest sequence asked for."""
    location = resolve_source(source)
    try:
        limit = AutoConfig.from_pretrained(location).max_position_embeddings
    except Exception as err:
        raise PruneError(f"{source}: cannot read its config ({type(err).__name__}: {err})") from err
    if settings.positions > limit:
        raise PruneError(f"{source}: the measurements need {settings.positions} positions (--lengths, or "
                         f"--prompt-length + --decode-tokens), more than its max_position_embeddings {limit}")
