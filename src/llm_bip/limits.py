"""What a model can take, checked after it is loaded and before any forward pass: windows no longer than
its context, and a calibration forward that fits the memory of the device it runs on (long work then runs
in pieces small enough that Ctrl-C and SIGTERM stop it within seconds)."""

from __future__ import annotations

import psutil
import torch

from .errors import PruneError

FLOAT32 = 4


def context_length(config) -> int | None:
    """The longest window the model was built for (None where its config does not say)."""
    return getattr(config, "max_position_embeddings", None)


def check_window(config, seqlen: int, option: str) -> None:
    """Refuse windows of ``seqlen`` tokens (set by ``option``) longer than the model's context."""
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise PruneError(f"{option} {seqlen} is longer than the model's context of {limit} tokens "
                         f"(max_position_embeddings); use at most {limit}")


def calibration_bytes(config, samples: int, seqlen: int, batch_size: int) -> int:
    """About the most memory the calibration forward takes besides the weights: every sample's block input
    and output (float32), and one batch through a block (hidden states, FFN activations, and the attention
    probabilities where eager attention builds them)."""
    held = 2 * samples * seqlen * config.hidden_size * FLOAT32
    batch = min(batch_size, samples)
    step = batch * seqlen * (8 * config.hidden_size + 3 * config.intermediate_size) * FLOAT32
    if getattr(config, "_attn_implementation", None) == "eager":
        step += 2 * batch * config.num_attention_heads * seqlen ** 2 * FLOAT32
    return held + step


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now (the CPU: what the system can give without swapping)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_calibration_memory(config, samples: int, seqlen: int, batch_size: int, device: torch.device) -> None:
    """Refuse a calibration forward that would not fit the memory free on ``device``."""
    need, free = calibration_bytes(config, samples, seqlen, batch_size), free_bytes(device)
    if need > free:
        raise PruneError(f"the calibration forward needs about {need / 2**30:.1f} GiB ({samples} samples of "
                         f"{seqlen} tokens in batches of {batch_size}) but {free / 2**30:.1f} GiB is free on "
                         f"{device}; lower --samples, --calib-seqlen or --batch-size")
