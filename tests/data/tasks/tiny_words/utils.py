"""Data of the tiny test tasks: lm_eval resolves data_files from the working directory, so the
task's custom_dataset function reads the jsonl file beside this module (in memory, no cache)."""

import json
from pathlib import Path

import datasets


def load_tiny_words(**_) -> datasets.DatasetDict:
    lines = Path(__file__).with_name("tiny_words.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
