"""What a family's llama.cpp layout cannot hold is refused, and what it can is written as llama.cpp reads it:
scaled, YaRN and partial-rotary RoPE, the context of a sliding-window model, OLMo 2's query width, Gemma 3's
query scale, soft-capping and its own fields (gguf_layouts.py through gguf_export.write_file, the GGUF read back).
None of these needs llama.cpp: each file is written and read with the ``gguf`` package alone."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from llm_bip.errors import PruneError
from llm_bip.gguf_export import write_file
from llm_bip.gguf_tensors import rope_factors
from llm_bip.testing import MIXED_LAYERS, TOKEN_IDS_ONLY, VOCAB, build_model  # token ids only: no vocabulary is read

SIZES = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=128)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)


def written(model, tmp_path) -> gguf.GGUFReader:
    """``model`` written as an f32 GGUF file, read back."""
    path = tmp_path / "model.gguf"
    write_file(model, TOKEN_IDS_ONLY, path, "f32")
    return gguf.GGUFReader(path)


def field(reader: gguf.GGUFReader, key: str):
    """The value of ``{arch}.key`` in the file ``reader`` reads."""
    arch = reader.fields["general.architecture"].contents()
    return reader.fields[f"{arch}.{key}"].contents()


def refusal(model, tmp_path, words: str) -> None:
    """Writing ``model`` is refused with a PruneError matching ``words``, and leaves no file."""
    with pytest.raises(PruneError, match=words):
        write_file(model, TOKEN_IDS_ONLY, tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()


def tiny_gemma3(layers: int = 3, **fields):
    """A Gemma 3 of 4 query heads over 2 KV heads of width 8 (hidden / heads = 12, not 8), sliding-window layers
    next to global ones, tied LM head."""
    config = dict(SIZES, num_hidden_layers=layers, num_attention_heads=4, query_pre_attn_scalar=8,
                  sliding_window=MIXED_LAYERS["sliding_window"], tie_word_embeddings=True,
                  layer_types=(MIXED_LAYERS["layer_types"] * layers)[:layers])
    return build_model("gemma3_text", **{**config, **fields})


# --- RoPE ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope, expected", [
    (dict(rope_type="linear", rope_theta=10000.0, factor=4.0), [4.0, 4.0, 4.0, 4.0]),
    # wavelengths 2*pi*10^k: under 128/4 kept, over 128 divided by 8, the one between smoothly in between
    (LLAMA3_ROPE, [1.0, None, 8.0, 8.0]),
])
def test_scaled_rope_is_written_as_rope_freqs_in_the_llama_layout(rope, expected, tmp_path):
    """Linear and llama3 RoPE: the llama layout gets a ``rope_freqs`` tensor with llama.cpp's divisor of each
    default frequency, the base frequency unscaled."""
    reader = written(build_model("llama", rope_parameters=rope, **SIZES), tmp_path)
    tensors = {t.name: t for t in reader.tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    assert factors.shape == (4,)  # head_dim / 2
    for got, want in zip(factors, expected):
        if want is None:
            assert 1.0 < got < 8.0
        else:
            assert got == pytest.approx(want, rel=1e-5)
    assert field(reader, "rope.freq_base") == 10000.0
    assert field(reader, "rope.dimension_count") == 8


def test_plain_rope_writes_no_rope_freqs(tmp_path):
    """Default RoPE needs no divisors: no ``rope_freqs`` tensor (llama.cpp would read one as scaling)."""
    reader = written(build_model("llama", **SIZES), tmp_path)
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


@pytest.mark.parametrize("architecture, layout", [("qwen3", "qwen3"), ("olmo2", "olmo2"), ("smollm3", "smollm3")])
def test_scaled_rope_is_refused_where_the_layout_reads_no_rope_freqs(architecture, layout, tmp_path):
    """A layout without ``rope_freqs`` takes only default RoPE: linear scaling would be computed unscaled."""
    model = build_model(architecture, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
                        **SIZES)
    refusal(model, tmp_path, f"RoPE type 'linear' cannot be written in llama.cpp's {layout} layout here; "
                             "supported: default$")


@pytest.mark.parametrize("scaled", ["full_attention", "sliding_attention"])
def test_gemma3_scaled_rope_is_refused_in_either_kind_of_layer(scaled, tmp_path):
    """Gemma 3 keeps RoPE parameters per kind of layer: scaling in either kind is refused (the larger Gemma 3
    models scale the global layers' RoPE linearly, so this refuses them)."""
    rope = {"full_attention": dict(rope_type="default", rope_theta=1000000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}
    rope[scaled] = dict(rope[scaled], rope_type="linear", factor=8.0)
    refusal(tiny_gemma3(rope_parameters=rope), tmp_path,
            "RoPE type 'linear' cannot be written in llama.cpp's gemma3 layout here; supported: default$")


def test_yarn_is_refused_even_in_the_llama_layout(tmp_path):
    """YaRN also scales attention, which ``rope_freqs`` cannot say: refused by its type before anything is written."""
    model = build_model("llama", rope_parameters=YARN_ROPE, **SIZES)
    refusal(model, tmp_path, r"RoPE type 'yarn' cannot be written in llama.cpp's llama layout here; "
                             "supported: default, linear, llama3$")


def test_rope_factors_refuse_attention_scaling():
    """The divisors themselves refuse a rotary embedding with attention scaling (YaRN's is 1 + 0.1 ln 4 here),
    which frequencies alone cannot express."""
    model = build_model("llama", rope_parameters=YARN_ROPE, **SIZES)
    assert model.model.rotary_emb.attention_scaling > 1.0
    with pytest.raises(PruneError, match=r"attention scaling \(e\.g\. YaRN\) cannot be written to GGUF"):
        rope_factors(model, head_dim=8)


def test_partial_rotary_is_refused(tmp_path):
    """Phi-3 rotating half of each head (Phi-4-mini rotates 3/4): llama.cpp's llama layout would rotate all of it."""
    model = build_model("phi3", partial_rotary_factor=0.5, **SIZES)
    assert model.config.partial_rotary_factor == 0.5
    refusal(model, tmp_path, "^partial rotary embeddings cannot be written to llama.cpp's llama layout$")


def test_partial_rotary_given_in_rope_parameters_is_refused(tmp_path):
    """The same model with the factor where transformers 5 standardises it, inside ``rope_parameters``."""
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    model = build_model("phi3", rope_parameters=rope, **SIZES)
    assert model.model.rotary_emb.inv_freq.numel() == 2  # transformers rotates 4 of the 8 channels
    refusal(model, tmp_path, "partial rotary embeddings")


# --- context length --------------------------------------------------------------------------------------------


def qwen2_window_switched_off():
    """Qwen2 with ``use_sliding_window`` false but a window still in its config (as in Qwen2.5's config.json;
    transformers 5 drops it on load, so it is put back here)."""
    model = build_model("qwen2", use_sliding_window=False, **SIZES)
    model.config.sliding_window = 32
    return model


@pytest.mark.parametrize("build, context", [
    (lambda: build_model("mistral", sliding_window=32, **SIZES), 32),  # full attention beyond 32 would differ
    (lambda: build_model("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0, **SIZES), 32),
    (lambda: build_model("mistral", sliding_window=4096, **SIZES), 128),  # a window past the trained context
    (lambda: build_model("mistral", sliding_window=None, **SIZES), 128),
    (qwen2_window_switched_off, 128),
    (lambda: tiny_gemma3(), 128),  # gemma3 computes its window-6 layers as such
], ids=["mistral-window", "qwen2-window", "mistral-long-window", "mistral-no-window", "qwen2-window-off", "gemma3"])
def test_context_length_is_clamped_to_a_window_llama_cpp_would_not_apply(build, context, tmp_path):
    """A window in every layer, in a layout computing full attention: the written context stops at the window;
    else it is the trained 128."""
    assert field(written(build(), tmp_path), "context_length") == context


# --- OLMo 2 ----------------------------------------------------------------------------------------------------


def test_olmo2_query_narrower_than_the_hidden_size_is_refused(tmp_path):
    """llama.cpp's olmo2 reads a Q norm as wide as the hidden size: 4 heads of 8 against hidden 48 are refused."""
    model = build_model("olmo2", **{**SIZES, "num_attention_heads": 4})
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    refusal(model, tmp_path, "^llama.cpp's olmo2 layout takes the query width to be the hidden size; this model's "
                             "is 32 against 48$")


# --- Gemma 3 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, scalar, llama_cpp_scalar", [(3, 12, 8), (62, 8, 12)])
def test_gemma3_query_scale_llama_cpp_would_not_use_is_refused(layers, scalar, llama_cpp_scalar, tmp_path):
    """llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim), or, with 62 layers (27B), by 1/sqrt(hidden / heads):
    a query_pre_attn_scalar saying otherwise is refused."""
    refusal(tiny_gemma3(layers, query_pre_attn_scalar=scalar), tmp_path,
            rf"^llama.cpp would scale this model's queries by 1/sqrt\({llama_cpp_scalar}\), its config says "
            rf"1/sqrt\({scalar}\); the gemma3_text layout cannot hold that$")


def test_gemma3_of_62_layers_takes_hidden_over_heads_as_query_scale(tmp_path):
    """The 27B shape: query_pre_attn_scalar = hidden / heads (12, not head_dim 8) is what llama.cpp computes."""
    reader = written(tiny_gemma3(62, query_pre_attn_scalar=12), tmp_path)
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert (field(reader, "block_count"), field(reader, "attention.key_length")) == (62, 8)


def test_gemma3_attention_softcapping_is_refused(tmp_path):
    """llama.cpp's gemma3 graph has no attention soft-cap (Gemma 2's has): a Gemma 3 config with one is refused."""
    refusal(tiny_gemma3(attn_logit_softcapping=50.0), tmp_path,
            "^llama.cpp's gemma3 graph does not soft-cap attention logits; this model does$")


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gemma3_fields_are_written(softcap, tmp_path):
    """Gemma 3's own fields: the window, which layers use it, the sliding layers' RoPE base next to the global
    one, and the final soft-cap only where the config has one."""
    reader = written(tiny_gemma3(final_logit_softcapping=softcap), tmp_path)
    assert field(reader, "attention.sliding_window") == 6
    assert field(reader, "attention.sliding_window_pattern") == [True, False, True]
    assert (field(reader, "rope.freq_base"), field(reader, "rope.freq_base_swa")) == (1000000.0, 10000.0)
    key = "gemma3.final_logit_softcapping"
    assert (reader.fields[key].contents() if key in reader.fields else None) == softcap
