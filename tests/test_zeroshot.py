"""Zero-shot accuracy through lm-evaluation-harness on tiny models, with local task files only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llm_bip import PruneConfig, prune, save_model
from llm_bip.cli import main
from llm_bip.errors import PruneError
from llm_bip.loading import load_model
from llm_bip.outputs import EVAL_FILE, OUTPUT_MARKER
from llm_bip.tasks import CHOICES, ending_docs
from llm_bip.testing import random_ids, tiny_model
from llm_bip.zeroshot import load_tasks, zero_shot, zero_shot_table

TASKS = Path(__file__).parent / "data" / "tasks"
DOCS = [json.loads(line) for line in (TASKS / "tiny_words" / "tiny_words.jsonl").read_text().splitlines()]


@torch.no_grad()
def hand_accuracy(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    """acc and acc_norm computed directly: the choice with the highest summed log-probability
    after the context (acc_norm: divided by the choice's length in characters)."""
    hits = norm_hits = 0
    for doc in docs:
        context = tokenizer(doc["context"]).input_ids
        lls = []
        for choice in doc["choices"]:
            target = tokenizer(choice).input_ids
            logprobs = model(torch.tensor([context + target])).logits[0].log_softmax(-1)
            lls.append(sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(target)))
        hits += max(range(CHOICES), key=lambda i: lls[i]) == doc["label"]
        norm_hits += max(range(CHOICES), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    return hits / len(docs), norm_hits / len(docs)


def test_local_tasks_score_like_a_hand_computation(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    result = zero_shot(model, tokenizer, ["tiny_words", "tiny_words_acc"], include_path=[TASKS])
    acc, acc_norm = hand_accuracy(model, tokenizer, DOCS)
    assert acc != acc_norm  # the two metrics are told apart below
    assert result == {
        "tasks": {
            "tiny_words": {"n": 16, "acc": acc, "acc_stderr": pytest.approx(math.sqrt(acc * (1 - acc) / 15)),
                           "acc_norm": acc_norm, "acc_norm_stderr": pytest.approx(
                               math.sqrt(acc_norm * (1 - acc_norm) / 15)), "averaged": "acc_norm"},
            "tiny_words_acc": {"n": 16, "acc": acc, "acc_stderr": pytest.approx(math.sqrt(acc * (1 - acc) / 15)),
                               "averaged": "acc"},
        },
        "average": pytest.approx((acc_norm + acc) / 2),
        "averaged": "acc_norm where the task has it, else acc", "num_fewshot": 0, "limit": None,
    }


def test_per_layer_width_pruned_model(tiny_model_dir, tmp_path):
    _, tokenizer = load_model(str(tiny_model_dir))
    model = tiny_model("llama-gqa", scale=5.0)  # weights large enough for layers to score apart
    prune(model, None, PruneConfig(ratio=0.35, allocation="global", gqa="heads"), calib=random_ids())
    save_model(model, tokenizer, tmp_path / "pruned", overwrite=False)
    pruned, tokenizer = load_model(str(tmp_path / "pruned"))
    assert pruned.config.is_heterogeneous
    scores = zero_shot(pruned, tokenizer, ["tiny_words"], include_path=[TASKS])["tasks"]["tiny_words"]
    assert (scores["acc"], scores["acc_norm"]) == hand_accuracy(pruned, tokenizer, DOCS)


def test_cli_writes_eval_folder(tiny_model_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(tiny_model_dir), "--ppl", str(calib_text_file), "--seqlen", "16", "--max-tokens", "160",
            "--tasks", "tiny_words,llm_bip_ptb_endings", "--include-path", str(TASKS / "tiny_words"),
            "--limit", "8", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in out.iterdir()) == [EVAL_FILE, OUTPUT_MARKER]
    summary = json.loads((out / EVAL_FILE).read_text())
    assert summary["model"] == str(tiny_model_dir)
    assert [(p["dataset"], p["windows"]) for p in summary["perplexity"]] == [(str(calib_text_file), 10)]
    zs = summary["zeroshot"]
    assert list(zs["tasks"]) == ["tiny_words", "llm_bip_ptb_endings"]
    assert [s["n"] for s in zs["tasks"].values()] == [8, 8] and zs["limit"] == 8
    assert set(summary["phases"]) == {"load_tasks", "load", "perplexity", "zero_shot"}
    assert {"torch", "transformers", "lm_eval", "llm_bip"} <= set(summary["versions"])
    printed = capsys.readouterr().out
    assert zero_shot_table(zs) in printed and "| average |" in printed

    assert main(argv) == 2  # an existing --out is refused before any work
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [EVAL_FILE, OUTPUT_MARKER]


@pytest.mark.parametrize("task, message", [
    ("piqa", "task 'piqa' needs its data from the Hugging Face hub, which is offline here "
             "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); pass folders of local task YAMLs with --include-path"),
    ("no_such_task", "unknown task(s) no_such_task: `lm-eval ls tasks` lists lm_eval's tasks"),
])
def test_cli_task_errors_come_first_in_one_line(task, message, tmp_path, capsys):
    out = tmp_path / "eval"
    # the model does not exist either: the task error shows tasks are checked before the model is loaded
    code = main(["eval", str(tmp_path / "missing-model"), "--ppl", "none", "--tasks", task, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("llm-bip: error:")]
    assert line.startswith(f"llm-bip: error: {message}")
    assert not out.exists()


def test_cli_needs_something_to_evaluate(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--ppl", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_bad_local_tasks_are_refused(tmp_path):
    with pytest.raises(PruneError, match="no such folder"):
        load_tasks(["tiny_words"], [tmp_path / "nowhere"])
    (tmp_path / "generate.yaml").write_text(
        f"include: {TASKS / 'tiny_words' / 'tiny_words.yaml'}\ntask: tiny_generate\noutput_type: generate_until\n"
        "metric_list:\n  - metric: exact_match\n")
    with pytest.raises(PruneError, match="task 'tiny_generate' reports no accuracy"):
        load_tasks(["tiny_generate"], [tmp_path, TASKS])


def test_ptb_endings_are_deterministic_same_length_choices():
    import treebank

    text = treebank.penn["test"]
    docs = ending_docs(text)
    assert docs == ending_docs(text) and len(docs) == 2928
    sentences = [line.split() for line in text.splitlines() if 12 <= len(line.split()) <= 40]
    for doc, words in zip(docs, sentences):
        half = len(words) // 2
        assert doc["context"] == " ".join(words[:half])
        assert doc["choices"][doc["label"]] == " ".join(words[half:])
        assert len(set(doc["choices"])) == CHOICES
        assert {len(choice.split()) for choice in doc["choices"]} == {len(words) - half}
    assert {doc["label"] for doc in docs} == set(range(CHOICES))


def test_table_format():
    result = {"tasks": {"a": {"n": 10, "acc": 0.5, "acc_stderr": 0.1667, "acc_norm": 0.6, "acc_norm_stderr": 0.1633,
                              "averaged": "acc_norm"},
                        "b": {"n": 1, "acc": 1.0, "acc_stderr": "N/A", "averaged": "acc"}},
              "average": 0.8, "averaged": "acc_norm where the task has it, else acc"}
    assert zero_shot_table(result) == (
        "| task | n | acc | acc_norm | score |\n"
        "|---|---:|---:|---:|---:|\n"
        "| a | 10 | 50.00 ± 16.67 | 60.00 ± 16.33 | 60.00 |\n"
        "| b | 1 | 100.00 |  | 100.00 |\n"
        "| average | | | | 80.00 |\n"
        "score: acc_norm where the task has it, else acc"
    )
