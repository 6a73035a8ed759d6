"""GGUF export: llama.cpp runs the written file with the logits of our PyTorch model, at every width."""

from __future__ import annotations

import io
from pathlib import Path

import gguf
import pytest
import torch

from llm_bip import PruneConfig, prune, run_export, save_model
from llm_bip.adapters import adapter_for
from llm_bip.cli import main
from llm_bip.errors import PruneError
from llm_bip.gguf_export import describe, write_file
from llm_bip.gguf_layouts import LAYOUTS
from llm_bip.llamacpp import open_gguf, window_logits
from llm_bip.outputs import write_atomically
from llm_bip.testing import (
    TOKEN_IDS_ONLY,
    VOCAB,
    build_model,
    build_tokenizer,
    calibration_text,
    random_ids,
    save_tiny_model,
    tiny_model,
)


def pruned_tiny(variant: str, allocation: str, compensate: bool, seed: int = 0, layers: int = 3, **options):
    model = tiny_model(variant, layers=layers, seed=seed, scale=4.0)
    config = PruneConfig(ratio=0.4, allocation=allocation, compensate=compensate, keep_dense=[], **options)
    return prune(model, None, config, calib=random_ids(8, 16, seed=seed))[0]


def llama_cpp_logits(model, path, file_type: str = "f32", ids: torch.Tensor | None = None) -> tuple:
    write_file(model, TOKEN_IDS_ONLY, path, file_type)
    ids = random_ids(3, 24, seed=1) if ids is None else ids
    with open_gguf(path, context=ids.shape[1], f32_cache=True) as runner:
        theirs = window_logits(runner, ids)
    with torch.no_grad():
        ours = model(ids).logits
    return ours, theirs


def per_layer_fields(path) -> dict[str, list[int]]:
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    keys = {"num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv",
            "intermediate_size": "feed_forward_length"}
    return {name: reader.fields[f"{arch}.{key}"].contents() for name, key in keys.items()}


LLAMA_SHAPED = ["llama-mha", "llama-gqa", "llama-gqa-bias", "mistral-gqa", "qwen2-gqa", "phi3-gqa"]
OWN_LAYOUT = ["qwen3-gqa", "qwen3-wide", "smollm3-gqa", "olmo2-gqa", "gemma2-gqa", "gemma2-mqa", "gemma3-gqa",
              "gemma3-mqa"]
CASES = [(v, a) for v in LLAMA_SHAPED for a in ("uniform", "global")] + [(v, "uniform") for v in OWN_LAYOUT]


@pytest.mark.parametrize("variant,allocation", CASES)
def test_llama_cpp_gives_the_logits_of_the_pruned_model(variant, allocation, tmp_path):
    """Every family: blocks of one size in its llama.cpp layout; Llama-shaped blocks of per-layer sizes in deci."""
    smollm3 = variant.startswith("smollm3")  # its fourth layer is the first without RoPE; llama.cpp's graph has
    layers = 4 if smollm3 else 3                # no o_proj/down_proj bias, which SmolLM3's refit would add
    model = pruned_tiny(variant, allocation, compensate=variant.startswith("llama"), layers=layers,
                        reconstruct=not smollm3)
    path = tmp_path / "model.gguf"
    ours, theirs = llama_cpp_logits(model, path)
    # llama.cpp's GELU (Gemma) reads a float16 table: 5e-4 to 1.5e-3 of the largest logit measured, 2e-4 to
    # 2.6e-4 with that table's rounding applied to ours too
    tolerance = 2e-3 if model.config.model_type.startswith("gemma") else 2e-4
    assert (ours - theirs).abs().max() < tolerance * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    adapter = adapter_for(model.config)
    widths = [adapter.block(model, i).widths for i in range(layers)]
    uniform, per_layer = LAYOUTS[model.config.model_type]
    assert describe(path).architecture == (uniform if len(set(widths)) == 1 else per_layer).name
    fields = per_layer_fields(path)
    for name, values in fields.items():
        expected = [getattr(w, name) for w in widths]
        assert (values if isinstance(values, list) else [values] * layers) == expected


TARGET_CASES = ["llama-gqa-bias", "mistral-gqa", "qwen2-gqa", "phi3-gqa", "qwen3-gqa", "smollm3-gqa",
                "olmo2-gqa", "gemma2-gqa", "gemma3-gqa"]


@pytest.mark.parametrize("variant", TARGET_CASES)
def test_target_llamacpp_gives_a_model_llama_cpp_runs_with_its_logits(variant, tmp_path):
    """The default method (global allocation, refit, compensation where the family holds biases) with --target
    llamacpp: per-layer widths where the deci graph serves the family, one width elsewhere, every FFN width a
    multiple of 32; llama.cpp gives the pruned model's logits."""
    layers = 4 if variant.startswith("smollm3") else 3  # smollm3: its fourth layer is the first without RoPE
    model = tiny_model(variant, layers=layers, scale=4.0)
    prune(model, None, PruneConfig(ratio=0.25, target="llamacpp"), calib=random_ids(8, 16))
    adapter = adapter_for(model.config)
    widths = [adapter.block(model, i).widths for i in range(layers)]
    assert all(w.intermediate_size % 32 == 0 for w in widths)
    if LAYOUTS[model.config.model_type][1] is None:
        assert len(set(widths)) == 1
    ours, theirs = llama_cpp_logits(model, tmp_path / "model.gguf")
    tolerance = 2e-3 if model.config.model_type.startswith("gemma") else 2e-4
    assert (ours - theirs).abs().max() < tolerance * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("variant,options,words", [
    ("qwen3-gqa", dict(allocation="global"), r"target \(--target\) llamacpp computes one width for every layer"),
    ("smollm3-gqa", dict(compensate=True), r"adds no o_proj/down_proj biases.*compensate \(--compensate\)"),
])
def test_target_llamacpp_refuses_what_the_user_asked_that_llama_cpp_cannot_compute(variant, options, words):
    with pytest.raises(PruneError, match=words):
        prune(tiny_model(variant, layers=4), None, PruneConfig(target="llamacpp", **options), calib=random_ids())


def tiny_gemma2(**fields):
    sizes = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=8)
    return build_model("gemma2", **sizes, **fields)


@pytest.mark.parametrize("build,words", [
    (lambda: tiny_model("smollm3-gqa-bias", layers=4), "skips RoPE in every fourth layer"),  # every 2nd here
    (lambda: pruned_tiny("smollm3-gqa", "uniform", compensate=True, layers=4), "adds no blk.0.attn_output bias"),
    (lambda: tiny_gemma2(tie_word_embeddings=True), r"1/sqrt\(256\)"),  # query_pre_attn_scalar 256, head_dim 8
    (lambda: tiny_gemma2(query_pre_attn_scalar=8, tie_word_embeddings=False), "reuses the embedding as LM head"),
])
def test_what_a_family_s_llama_cpp_layout_cannot_hold_is_refused(build, words, tmp_path):
    with pytest.raises(PruneError, match=words):
        write_file(build(), TOKEN_IDS_ONLY, tmp_path / "model.gguf", "f32")


def test_per_layer_model_needs_the_deci_layout_and_keeps_compensation_biases(tmp_path):
    model = pruned_tiny("llama-gqa", "global", compensate=True)
    path = tmp_path / "model.gguf"
    write_file(model, TOKEN_IDS_ONLY, path, "f32")
    biases = {t.name for t in gguf.GGUFReader(path).tensors if t.name.endswith(".bias")}
    assert describe(path).architecture == "deci"
    nonzero = {(int(name.split(".")[2]), name.split(".")[-2]) for name, p in model.named_parameters()
               if name.endswith("bias") and p.any()}
    kinds = {"o_proj": "attn_output", "down_proj": "ffn_down"}
    assert biases == {f"blk.{layer}.{kinds[kind]}.bias" for layer, kind in nonzero}  # zero biases are left out
    assert {kind for _, kind in nonzero} == set(kinds)


def quantizable_model():
    """A tiny Llama whose every matrix row is a multiple of 32 long, with a tied LM head."""
    model = build_model("llama", 0, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def test_f16_and_q8_0_stay_close_and_agree_on_the_next_token(tmp_path):
    model = quantizable_model()
    ids = random_ids(2, 32, seed=3)
    for file_type, tolerance in (("f16", 0.01), ("q8_0", 0.05)):
        path = tmp_path / f"{file_type}.gguf"
        ours, theirs = llama_cpp_logits(model, path, file_type, ids)
        assert describe(path).file_type == file_type
        assert (ours - theirs).abs().max() < tolerance * ours.abs().max()
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95
    assert describe(tmp_path / "q8_0.gguf").tensor_types["Q8_0"] == 2 * 7 + 1


def test_a_failed_quantization_leaves_no_file(tmp_path, monkeypatch):
    def fail(*_):
        raise PruneError("llama.cpp could not quantize")

    monkeypatch.setattr("llm_bip.gguf_export.quantize", fail)
    out = tmp_path / "model.gguf"
    with pytest.raises(PruneError):
        write_atomically(out, lambda path: write_file(quantizable_model(), TOKEN_IDS_ONLY, Path(path), "q8_0"))
    assert list(tmp_path.iterdir()) == []


def test_rows_a_quant_block_cannot_hold_are_refused_before_writing(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")  # hidden 32, FFN 48: down_proj rows of 48 values
    capsys.readouterr()
    out = tmp_path / "q.gguf"
    assert main(["export", str(folder), "--out", str(out), "--type", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert err.startswith("llm-bip: error:") and "not a multiple of 32" in err and "--round-to 32" in err
    assert not out.exists() and not list(tmp_path.glob("q.gguf*"))


def test_a_tokenizer_gguf_cannot_express_is_a_clear_error(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny")  # a word-level tokenizer
    capsys.readouterr()
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(folder), "--out", str(out), "--type", "f32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llm-bip: error:") and "not a byte-level BPE" in err
    assert not out.exists()


@pytest.mark.parametrize("out, message", [("model.bin", "with a .gguf suffix"), ("exists.gguf", "already exists")])
def test_bad_output_is_refused_before_loading(tmp_path, capsys, out, message):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / out)]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"


def test_an_output_inside_the_input_folder_is_refused(tmp_path, capsys):
    model = pruned_tiny("llama-gqa", "global", compensate=True)
    folder = save_model(model, None, tmp_path / "pruned", overwrite=False)
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["export", str(folder), "--out", str(folder / "inside.gguf")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def sentencepiece_model(vocab: int, leading_space: bool) -> bytes:
    """A tiny SentencePiece BPE model with byte fallback and no normalisation (as Gemma's and Llama 2's),
    trained here on the tiny vocabulary's text: <unk> 0, <s> 1, </s> 2, as the tiny HF tokenizer numbers
    its specials. ``leading_space``: a space is put before the text (Llama 2), or not (Gemma)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(calibration_text(3000).splitlines()), model_writer=model, vocab_size=vocab,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=leading_space, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


@pytest.mark.parametrize("leading_space", [True, False])
def test_sentencepiece_vocabulary_tokenizes_as_sentencepiece(tmp_path, calib_text_file, leading_space):
    """A model that ships tokenizer.model, pruned, then exported: the vocabulary is found through the summary,
    and llama.cpp splits text into the ids SentencePiece gives (byte fallback, spaces, accents included)."""
    import sentencepiece

    source = tmp_path / "model"
    build_model("llama", 0, vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                pad_token_id=None).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    (source / "tokenizer.model").write_bytes(sentencepiece_model(320, leading_space))
    assert main(["prune", str(source), "--out", str(tmp_path / "pruned"), "--calibration", str(calib_text_file),
                 "--samples", "4", "--calib-seqlen", "16", "--eval", "none"]) == 0
    assert not (tmp_path / "pruned" / "tokenizer.model").exists()
    out = tmp_path / "pruned.gguf"
    run_export(str(tmp_path / "pruned"), out)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    texts = ["the man and the woman", "  a  world of people\nday", "Zürich, 2026 — naïve café"]
    with open_gguf(out, context=64) as runner:
        for text in texts:
            assert runner.tokenize(text.encode(), add_bos=False) == spm.encode(text), text
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.model"].contents() == "llama"


def test_an_unreadable_sentencepiece_model_is_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(PruneError, match="not a readable SentencePiece model"):
        run_export(str(folder), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
