"""GGUF tokenizer fields: copied from the GGUF file the model came from, where there is one, else built with
gguf's vocabulary helpers from the SentencePiece model it came with (tokenizer.model) or its byte-level BPE
Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf

from .data import needs_bos
from .errors import PruneError
from .outputs import input_summary
from .sources import DEFAULT_MODEL, embedded_gguf, resolve_source

DESCRIPTIVE = ("general.name", "general.organization", "general.basename", "general.finetune",
               "general.license", "general.languages")


def tokenizer_fields(source: str, tokenizer, embeddings: int) -> dict[str, gguf.GGUFValue]:
    """The GGUF fields of the tokenizer and the model's descriptive metadata: copied from
    the GGUF file the model came from where there is one, else built from its Hugging Face tokenizer."""
    if (origin := origin_gguf(source)) is not None:
        fields = copied_fields(origin)
    elif (sentencepiece := sentencepiece_folder(source)) is not None:
        fields = sentencepiece_fields(source, sentencepiece, tokenizer, embeddings)
    else:
        fields = hf_tokenizer_fields(source, tokenizer)
    listed = len(fields["tokenizer.ggml.tokens"].value)
    if listed != embeddings:
        raise PruneError(f"{source}: the tokenizer lists {listed} tokens but the model embeds {embeddings}; "
                         "llama.cpp needs one token per embedding row")
    return fields


def lineage(source: str, depth: int = 8) -> Iterator[Path]:
    """``source`` and the models it was pruned or fine-tuned from, nearest first (followed through llm-bip
    summaries, at most ``depth`` steps)."""
    for _ in range(depth + 1):
        path = embedded_gguf() if source == DEFAULT_MODEL else Path(source)
        yield path
        summary = input_summary(path) if path.is_dir() else {}
        source = summary.get("model") or summary.get("finetune", {}).get("model")
        if source is None:
            return


def origin_gguf(source: str) -> Path | None:
    """The GGUF file ``source`` is or was pruned/fine-tuned from, or None."""
    return next((p for p in lineage(source) if p.is_file() and p.suffix == ".gguf"), None)


def sentencepiece_folder(source: str) -> Path | None:
    """The nearest folder of ``source``'s lineage that holds a SentencePiece ``tokenizer.model`` (Gemma, Phi-3,
    Llama 2 ship one; transformers does not write it into saved folders), or None."""
    return next((p for p in lineage(source) if (p / "tokenizer.model").is_file()), None)


def copied_fields(origin: Path) -> dict[str, gguf.GGUFValue]:
    """The tokenizer.* fields and descriptive general.* fields of a GGUF file, with their types."""
    reader = gguf.GGUFReader(origin)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key in DESCRIPTIVE:
            kind = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
            fields[key] = gguf.GGUFValue(field.contents(), kind, sub)
    if "tokenizer.ggml.tokens" not in fields:
        raise PruneError(f"{origin}: the GGUF file holds no tokenizer to copy")
    return fields


def hf_tokenizer_fields(source: str, tokenizer) -> dict[str, gguf.GGUFValue]:
    """A byte-level BPE Hugging Face tokenizer (GPT-2 style: Llama 3, Qwen2, SmolLM) as GGUF fields: tokens from
    gguf's BpeVocab, merges, special ids and chat template from its SpecialVocab, token types and BOS use from
    ``tokenizer``. llama.cpp's pre-tokenizer is named "default": its own converter picks the name from a
    table of known tokenizers, so text llama.cpp tokenizes itself may split differently in places."""
    folder = Path(resolve_source(source, prunable=False))
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise PruneError(f"{source}: its tokenizer is not a byte-level BPE one, which is all llm-bip builds a "
                         f"GGUF vocabulary from ({err})") from err
    texts = [text for text, _, _ in vocab.all_tokens()]
    recorder = vocabulary_recorder(vocab.tokenizer_model, texts)
    recorder.add_token_types(with_added_token_types(tokenizer, [gguf.TokenType.NORMAL] * len(texts)))
    recorder.add_add_bos_token(needs_bos(tokenizer))
    return recorded_fields(recorder, gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(texts)))


def sentencepiece_fields(source: str, folder: Path, tokenizer, rows: int) -> dict[str, gguf.GGUFValue]:
    """A SentencePiece vocabulary (``folder``'s tokenizer.model, read by gguf's SentencePieceVocab) as GGUF
    fields, as llama.cpp's converter writes it: padded to the embedding's ``rows`` with unused tokens, the
    Hugging Face tokenizer's added tokens over their ids (special ones CONTROL), its special ids and chat
    template, and the model's own choice of a leading space (Gemma adds none)."""
    try:
        vocab = gguf.vocab.SentencePieceVocab(folder)
    except (OSError, RuntimeError, ValueError) as err:
        raise PruneError(f"{folder / 'tokenizer.model'}: not a readable SentencePiece model ({err})") from err
    tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
    missing = range(len(tokens), rows)
    tokens += [f"[PAD{i}]".encode() for i in missing]
    scores += [-10000.0] * len(missing)
    types += [gguf.TokenType.UNUSED] * len(missing)
    for index, token in tokenizer.added_tokens_decoder.items():
        if index < rows:
            tokens[index], scores[index] = token.content.encode(), -1000.0
    leading_space = vocab.sentencepiece_tokenizer.encode("a", out_type=str)[0].startswith("\u2581")
    recorder = vocabulary_recorder(vocab.tokenizer_model, tokens)
    recorder.add_token_scores(scores)
    recorder.add_token_types(with_added_token_types(tokenizer, types))
    recorder.add_add_space_prefix(leading_space)
    special = gguf.SpecialVocab(Path(resolve_source(source, prunable=False)), load_merges=False, n_vocab=rows)
    return recorded_fields(recorder, special)


def vocabulary_recorder(tokenizer_model: str, tokens: list) -> gguf.GGUFWriter:
    """A GGUFWriter without a file, collecting the fields its helpers add: so far the tokenizer model,
    llama.cpp's "default" pre-tokenizer and the token list."""
    recorder = gguf.GGUFWriter(None, "llama")
    recorder.add_tokenizer_model(tokenizer_model)
    recorder.add_tokenizer_pre("default")
    recorder.add_token_list(tokens)
    return recorder


def recorded_fields(recorder: gguf.GGUFWriter, special: gguf.SpecialVocab) -> dict[str, gguf.GGUFValue]:
    """The tokenizer fields ``recorder`` collected, then those of ``special`` (special ids, merges, chat template)."""
    special.add_to_gguf(recorder, quiet=True)
    return {key: value for key, value in recorder.kv_data[0].items() if key.startswith("tokenizer.")}


def with_added_token_types(tokenizer, types: list[gguf.TokenType]) -> list[int]:
    """GGUF token types: the tokenizer's added special tokens CONTROL, its other added tokens USER_DEFINED,
    the rest as ``types`` gives them."""
    types = list(types)
    for index, token in tokenizer.added_tokens_decoder.items():
        if index < len(types):
            types[index] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return [int(t) for t in types]
