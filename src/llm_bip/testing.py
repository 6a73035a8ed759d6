"""Tiny randomly initialised decoder models of every supported family and a word-level tokenizer, for every test: built
in-process (``tiny_model``, ``build_model``) or saved as a model folder (``save_tiny_model``); one block of one with its
calibration inputs (``block_setup``) and the brute-force change of its output (``output_change``).

Tests and the benchmarks on these models (bench/family_bounds.py, bench/family_shapes.py) share them from here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import gguf
import torch
import transformers as hf

from .adapters import BlockView, adapter_for
from .calibration import BlockInputs, BlockStats, capture_block_inputs, collect_block_stats, forward_block

VOCAB = 96  # of in-process models; random_ids draws from it
# GGUF vocabulary fields of a model exported without a tokenizer: llama.cpp then runs on token ids alone
TOKEN_IDS_ONLY = {"tokenizer.ggml.model": gguf.GGUFValue("none", gguf.GGUFValueType.STRING)}

# model_type -> (config class, model class)
ARCHITECTURES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM),
    "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM),
    "smollm3": (hf.SmolLM3Config, hf.SmolLM3ForCausalLM),
    "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM),
    "gemma3_text": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM),
    "phi3": (hf.Phi3Config, hf.Phi3ForCausalLM),
    "olmo2": (hf.Olmo2Config, hf.Olmo2ForCausalLM),
}
# config fields some families need with a tiny vocabulary (their default token ids lie past it)
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
NEEDS_TOKEN_IDS = ("qwen3", "smollm3", "gemma2", "gemma3_text", "phi3", "olmo2")
# sliding-window layers next to global ones, a window shorter than the test sequences
MIXED_LAYERS = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
GEMMA = dict(MIXED_LAYERS, tie_word_embeddings=True)  # as every Gemma ships

# name -> (architecture, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=2)),
    "llama-gqa-bias": ("llama", dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True, mlp_bias=True)),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral-gqa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-gqa": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-wide": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, hidden_size=64,
                                 intermediate_size=384)),
    "smollm3-gqa": ("smollm3", dict(num_attention_heads=4, num_key_value_heads=2)),  # every 4th layer: no RoPE
    "smollm3-gqa-bias": ("smollm3", dict(num_attention_heads=6, num_key_value_heads=3, attention_bias=True,
                                         mlp_bias=True, no_rope_layer_interval=2)),
    "gemma2-mqa": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_size=128,
                                  intermediate_size=512, query_pre_attn_scalar=256, **GEMMA)),
    "gemma2-gqa": ("gemma2", dict(num_attention_heads=6, num_key_value_heads=2, query_pre_attn_scalar=8,
                                  **GEMMA)),
    "gemma3-mqa": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_size=128,
                                       intermediate_size=512, query_pre_attn_scalar=256, **GEMMA)),
    "gemma3-gqa": ("gemma3_text", dict(num_attention_heads=6, num_key_value_heads=3, query_pre_attn_scalar=8,
                                       **GEMMA)),
    "phi3-gqa": ("phi3", dict(num_attention_heads=6, num_key_value_heads=2)),
    "phi3-mha": ("phi3", dict(num_attention_heads=4, num_key_value_heads=4)),
    "olmo2-gqa": ("olmo2", dict(num_attention_heads=6, num_key_value_heads=2)),
}

# Words of the tiny tokenizer; with the special tokens they must fit a saved model's vocabulary.
WORDS = (
    "the a of and to in is was for on that with as by at from it his her they "
    "we you he she be are were had has have not but or an this which one all "
    "new year time people day man world life hand part child eye woman place work week case point"
).split()
SPECIAL = ["[UNK]", "<s>", "</s>"]
SAVED_VOCAB = 64  # of saved models, >= the tokenizer's
assert len(SPECIAL) + len(WORDS) <= SAVED_VOCAB


def build_model(architecture: str, seed: int = 0, **config):
    """A random model of family ``architecture`` (an ``ARCHITECTURES`` key) with these config fields (the
    rest at transformers' defaults; token ids inside a tiny vocabulary where the defaults lie past it),
    in eval mode."""
    config_cls, model_cls = ARCHITECTURES[architecture]
    if architecture in NEEDS_TOKEN_IDS:
        config = {**TOKEN_IDS, **config}
    config = config_cls(**config)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_model(variant: str = "llama-gqa", layers: int = 3, seed: int = 0, scale: float = 1.0):
    """A random model with hidden 48, head_dim 8, FFN 64 unless the variant says otherwise. ``scale``
    multiplies all weights (the default init std 0.02 gives near-zero activations; 1/sqrt(fan_in)-like
    scales are more realistic for score tests)."""
    architecture, overrides = VARIANTS[variant]
    sizes = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                 max_position_embeddings=1024, tie_word_embeddings=False)
    if "layer_types" in overrides:
        overrides = {**overrides, "layer_types": (overrides["layer_types"] * layers)[:layers]}
    model = build_model(architecture, seed, **{**sizes, **overrides})
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


def save_tiny_model(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """Save a random tiny LLaMA (hidden 32, 4 query heads over 2 KV heads, FFN 48) and its tokenizer."""
    model = build_model("llama", seed, vocab_size=SAVED_VOCAB, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        pad_token_id=None)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


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


def calibration_text(n_words: int = 3000, seed: int = 0) -> str:
    """Plain text of ``n_words`` vocabulary words, one tokenizer token each."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(n_words // 20)]
    return "\n".join(lines) + "\n"


def random_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def block_setup(variant: str, seed: int = 0, scale: float = 3.0, layer: int = 1,
                layers: int = 2) -> tuple[BlockView, BlockInputs, BlockStats, torch.Tensor]:
    """Block ``layer`` of a float64 ``tiny_model`` of ``layers`` blocks: (its view, its calibration inputs (through
    the blocks before it), its statistics, its dense outputs over all of them)."""
    model = tiny_model(variant, layers=layers, seed=seed, scale=scale).double()
    adapter = adapter_for(model.config)
    inputs = capture_block_inputs(model, adapter.layers(model), random_ids(4, 24, seed), batch_size=2)
    for i in range(layer):
        inputs = forward_block(adapter.block(model, i), inputs)
    view = adapter.block(model, layer)
    stats, outputs = collect_block_stats(view, inputs)
    return view, inputs, stats, torch.cat([o for o, _ in outputs])


def output_change(view: BlockView, inputs: BlockInputs, dense_y: torch.Tensor, weight: torch.Tensor,
                  cols: list[int] | torch.Tensor) -> float:
    """||y - y'||_F over all calibration tokens after zeroing ``cols`` of ``weight`` (restored after)."""
    saved = weight.data.clone()
    weight.data[:, cols] = 0
    try:
        with torch.no_grad():
            y = torch.cat([view.layer(h, **kw[view.index]) for h, kw in inputs])
    finally:
        weight.data.copy_(saved)
    return float((y - dense_y).norm())
