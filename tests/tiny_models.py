"""Tiny randomly initialised LLaMA-family models, built in-process for unit tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96

# name -> (model class, config class, config overrides)
VARIANTS = {
    "llama-mha": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=6, num_key_value_heads=2)),
    "llama-gqa-bias": (LlamaForCausalLM, LlamaConfig,
                       dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, mlp_bias=True)),
    "llama-mqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral-gqa": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-gqa": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


def tiny_model(variant: str = "llama-gqa", layers: int = 3, seed: int = 0, scale: float = 1.0):
    """A random model with hidden 48, head_dim 8, FFN 64. ``scale`` multiplies all weights
    (the default init std 0.02 gives near-zero activations; 1/sqrt(fan_in)-like scales are more
    realistic for score tests)."""
    model_cls, config_cls, overrides = VARIANTS[variant]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
        max_position_embeddings=128, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.mul_(scale)
                elif "bias" in name:
                    p.normal_(0, 0.1)
                elif "norm" in name:  # non-trivial RMSNorm gains
                    p.uniform_(0.5, 1.5)
    return model


def random_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
