"""Zero-shot tasks shipped with llm-bip, usable offline: lm_eval task YAMLs in this folder and
the code that builds their data from text we already have (nothing is downloaded)."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

TASKS_DIR = Path(__file__).parent
CHOICES = 4
SENTENCE_WORDS = (12, 40)  # sentences used, by word count
PTB_SPLITS = {"test": "test", "validation": "valid"}


def ptb_endings(**_):
    """``custom_dataset`` of the llm_bip_ptb_endings task: PTB test docs, PTB valid for few-shot examples."""
    import datasets
    import treebank

    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(ending_docs(treebank.penn[ptb_split]))
        for split, ptb_split in PTB_SPLITS.items()
    })


def ending_docs(text: str, seed: int = 0) -> list[dict]:
    """One doc per sentence (line) of ``text``: its first half as context, its second half among
    ``CHOICES - 1`` second halves of other sentences with the same number of words (seeded, so
    every run builds the same docs)."""
    lo, hi = SENTENCE_WORDS
    sentences = [words for words in map(str.split, text.splitlines()) if lo <= len(words) <= hi]
    halves = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in sentences]
    endings_by_length = defaultdict(set)
    for _, ending in halves:
        endings_by_length[len(ending.split())].add(ending)
    pools = {n: sorted(endings) for n, endings in endings_by_length.items()}
    rng = random.Random(seed)
    docs = []
    for context, ending in halves:
        others = [e for e in pools[len(ending.split())] if e != ending]
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, ending)
        docs.append({"context": context, "choices": choices, "label": label})
    return docs
