"""Recovery fine-tuning (the language-model loss): data building, LoRA training and merging, resume, CLI errors,
2-process run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate_launch import DATA_PARALLEL, launch
from helpers import assert_fails_cleanly, snapshot, stop_after_save
from safetensors.torch import load_file

from llm_bip import PruneConfig, prune, save_model
from llm_bip.adapters import adapter_for
from llm_bip.cli import main
from llm_bip.loading import load_model
from llm_bip.outputs import SCORES_FILE, SUMMARY_FILE
from llm_bip.recovery import FinetuneConfig, run_finetune
from llm_bip.scores import save_scores
from llm_bip.training import add_lora, checkpoint_folder, loss_history, train, training_arguments
from llm_bip.training_data import alpaca_prompt, build_training_data, read_data

RECORDS = [
    {"instruction": "the world", "input": "", "output": "a new day"},
    {"instruction": "the man", "input": "his hand", "output": "the woman"},
]
PROMPT_TOKENS = 26  # "Below is an instruction ... ### Instruction : the world ### Response :" in whole words
PROMPT_WITH_INPUT_TOKENS = 40
REPETITIVE = "the new year of the world " * 200
FAST = ["--seqlen", "16", "--batch-size", "2", "--max-steps", "3", "--eval", "none"]


def ids_of(tokenizer, words: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in words.split()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir))[1]


# --------------------------------------------------------------------------- data


def test_alpaca_prompts_are_the_standard_ones():
    assert alpaca_prompt({"instruction": "I", "output": "o"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nI\n\n### Response:\n")
    assert alpaca_prompt({"instruction": "I", "input": "X", "output": "o"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nX"
        "\n\n### Response:\n")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_instruction_labels_cover_the_response_only(tmp_path, tokenizer, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    else:
        write_jsonl(path, RECORDS)
    data = build_training_data(tokenizer, read_data(path), seqlen=64, seed=0)
    eos = tokenizer.eos_token_id
    first, second = sorted(data.examples, key=lambda e: len(e["input_ids"]))  # in a seeded order
    response = ids_of(tokenizer, "a new day") + [eos]
    assert first["labels"] == [-100] * PROMPT_TOKENS + response
    assert first["input_ids"][PROMPT_TOKENS:] == response
    # the instruction, then "### Response:" (three tokens) end the prompt
    assert first["input_ids"][PROMPT_TOKENS - 5:PROMPT_TOKENS - 3] == ids_of(tokenizer, "the world")
    response = ids_of(tokenizer, "the woman") + [eos]
    assert second["labels"] == [-100] * PROMPT_WITH_INPUT_TOKENS + response
    assert second["input_ids"][PROMPT_WITH_INPUT_TOKENS:] == response
    assert data.describe() == {"source": str(path), "format": f"alpaca-{suffix[1:]}", "examples": 2,
                               "tokens": PROMPT_TOKENS + PROMPT_WITH_INPUT_TOKENS + 7, "loss_tokens": 7}


def test_instruction_examples_are_cut_to_seqlen(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    data = build_training_data(tokenizer, read_data(path), seqlen=PROMPT_TOKENS + 2, seed=0)
    assert len(data.examples) == 1  # the second prompt alone is longer than seqlen: dropped
    assert data.examples[0]["labels"] == [-100] * PROMPT_TOKENS + ids_of(tokenizer, "a new")


def test_text_becomes_packed_windows_in_a_seeded_order(tmp_path, tokenizer):
    path = tmp_path / "data.txt"
    path.write_text("the a of and to " * 10)  # 50 tokens: three windows of 16, two tokens left over
    data = build_training_data(tokenizer, read_data(path), seqlen=16, seed=0)
    ids = ids_of(tokenizer, "the a of and to " * 10)
    assert sorted(e["input_ids"] for e in data.examples) == sorted([ids[0:16], ids[16:32], ids[32:48]])
    assert all(e["labels"] == e["input_ids"] for e in data.examples)
    # 15 tokens of each window are predicted
    assert data.describe() == {"source": str(path), "format": "text", "examples": 3, "tokens": 48, "loss_tokens": 45}
    again = build_training_data(tokenizer, read_data(path), seqlen=16, seed=0).examples
    assert again == data.examples
    orders = {tuple(map(tuple, (e["input_ids"] for e in build_training_data(tokenizer, read_data(path), 16, seed)
                                .examples))) for seed in range(6)}
    assert len(orders) > 1  # the seed orders them
    first_two = build_training_data(tokenizer, read_data(path), seqlen=16, seed=0, limit=2).examples
    assert first_two == data.examples[:2]  # a budget reads the first examples of the same order


# --------------------------------------------------------------------------- training and merging


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """The tiny model after 12 LoRA steps on repetitive text: the PEFT model's logits, then the merged model."""
    folder = tmp_path_factory.mktemp("trained")
    model, tokenizer = load_model(str(tiny_model_dir))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    (folder / "data.txt").write_text(REPETITIVE)
    config = FinetuneConfig(data=str(folder / "data.txt"), seqlen=16, batch_size=4, max_steps=12, lr=1e-2,
                            lora_dropout=0.0, save_steps=100, eval="none")
    data = build_training_data(tokenizer, read_data(config.data), config.seqlen, config.seed)
    peft_model = add_lora(model, config)
    trainer = train(peft_model, tokenizer, data.examples, training_arguments(config, folder / "checkpoints", "cpu"))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    merged = peft_model.merge_and_unload().eval()
    return SimpleNamespace(trainer=trainer, ids=ids, peft_logits=peft_logits, merged=merged, original=original,
                           tokenizer=tokenizer, folder=folder)


def test_loss_decreases_on_repetitive_text(trained):
    losses = [e["loss"] for e in loss_history(trained.trainer)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses


def test_merged_model_matches_the_peft_model(trained):
    with torch.no_grad():
        merged_logits = trained.merged(trained.ids).logits
    assert torch.allclose(merged_logits, trained.peft_logits, atol=1e-5, rtol=0)
    state = trained.merged.state_dict()
    assert set(state) == set(trained.original)  # no LoRA leftovers
    changed = {k for k, v in state.items() if not torch.equal(v, trained.original[k])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed == {k for k in state if k.endswith(tuple(f"{p}.weight" for p in projections))}


def test_saved_merged_model_reloads_with_the_same_logits(trained):
    out = save_model(trained.merged, trained.tokenizer, trained.folder / "out", overwrite=False)
    reloaded, _ = load_model(str(out))
    with torch.no_grad():
        assert torch.allclose(reloaded(trained.ids).logits, trained.merged(trained.ids).logits, atol=1e-6, rtol=0)


def test_resume_continues_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    (tmp_path / "data.txt").write_text(REPETITIVE)
    config = FinetuneConfig(data=str(tmp_path / "data.txt"), seqlen=16, batch_size=2, max_steps=4, save_steps=2,
                            lr=1e-2, lora_dropout=0.0, eval="none")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(str(tiny_model_dir), out, config, callbacks=[stop_after_save(2)])
    assert not out.exists()
    assert (checkpoint_folder(out) / "checkpoint-2").is_dir()
    resumed = run_finetune(str(tiny_model_dir), out, config, resume=True)["finetune"]
    assert resumed["resumed_from"] == str(checkpoint_folder(out) / "checkpoint-2")
    assert not checkpoint_folder(out).exists()  # removed once the output is written
    straight = run_finetune(str(tiny_model_dir), tmp_path / "straight", config)["finetune"]
    assert resumed["steps"] == straight["steps"] == 4
    assert [h["step"] for h in resumed["loss_history"]] == [h["step"] for h in straight["loss_history"]]
    assert [h["loss"] for h in resumed["loss_history"]] == pytest.approx([h["loss"] for h in straight["loss_history"]],
                                                                         rel=1e-6)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)


# --------------------------------------------------------------------------- pruned input, through the CLI


def test_per_layer_pruned_model_finetunes_and_reloads(tiny_model_dir, calib_text_file, tmp_path, capsys):
    model, tokenizer = load_model(str(tiny_model_dir))
    config = PruneConfig(ratio=0.3, allocation="global", keep_dense=[0], calibration=str(calib_text_file),
                         n_samples=4, seqlen=16)
    model, result = prune(model, tokenizer, config)
    pruned = tmp_path / "pruned"

    def extras(folder: Path) -> None:
        save_scores(folder / SCORES_FILE, result.record)
        (folder / SUMMARY_FILE).write_text(json.dumps(result.summary()))

    save_model(model, tokenizer, pruned, overwrite=False, extras=extras)
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS * 4)
    before = snapshot(pruned)
    out = tmp_path / "finetuned"
    args = ["finetune", str(pruned), "--data", str(data), "--out", str(out), "--seqlen", "64", "--batch-size", "3",
            "--max-steps", "3", "--lr", "1e-2", "--eval", "ptb", "--eval-seqlen", "32", "--eval-max-tokens", "256"]
    assert main(args) == 0, capsys.readouterr().err
    assert snapshot(pruned) == before

    source, _ = load_model(str(pruned))
    tuned, tuned_tokenizer = load_model(str(out))
    assert tuned.config.is_heterogeneous
    assert json.loads((out / "config.json").read_text()) == json.loads((pruned / "config.json").read_text())
    adapter = adapter_for(tuned.config)
    assert adapter.block(source, 0).widths != adapter.block(source, 1).widths  # per-layer widths
    for i in range(2):
        old, new = adapter.block(source, i), adapter.block(tuned, i)
        assert new.widths == old.widths
        assert old.o.bias is not None and old.down.bias is not None
        assert torch.equal(new.o.bias, old.o.bias) and torch.equal(new.down.bias, old.down.bias)
        assert not torch.equal(new.q.weight, old.q.weight)
    assert tuned_tokenizer.pad_token is None  # the padding copy is not what gets saved

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert {k: summary[k] for k in result.summary()} == json.loads((pruned / SUMMARY_FILE).read_text())
    section = summary["finetune"]
    assert section["data"] == {"source": str(data), "format": "alpaca-jsonl", "examples": 8,
                               "tokens": 4 * (PROMPT_TOKENS + PROMPT_WITH_INPUT_TOKENS + 7), "loss_tokens": 28}
    assert section["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "targets": [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    assert (section["steps"], section["world_size"], section["effective_batch_size"]) == (3, 1, 3)
    assert [e["step"] for e in section["loss_history"]] == [1, 2, 3]
    assert section["perplexity"]["before"]["tokens"] == section["perplexity"]["after"]["tokens"] == 248
    assert set(section["phases"]) == {"data", "load", "eval_before", "train", "eval_after"}
    assert (out / SCORES_FILE).read_bytes() == (pruned / SCORES_FILE).read_bytes()


# --------------------------------------------------------------------------- bad input


def _text(d: Path, text: str, name: str = "data.txt") -> Path:
    (d / name).write_text(text)
    return d / name


BAD_DATA = {
    "missing": (lambda d: d / "nope.txt", ["no such data file"]),
    "unknown format": (lambda d: _text(d, "the a of", "data.csv"), ["unknown data format", ".csv"]),
    "json without fields": (lambda d: _text(d, json.dumps([{"text": "the a"}]), "data.json"),
                            ["record 0", "instruction", "output"]),
    "jsonl without output": (lambda d: write_jsonl(d / "data.jsonl", [{"instruction": "the"}]), ["output"]),
    "invalid json": (lambda d: _text(d, "[{", "data.json"), ["not valid JSON"]),
    "invalid jsonl": (lambda d: _text(d, json.dumps(RECORDS[0]) + "\n\n{", "data.jsonl"), ["line 3", "not valid JSON"]),
    "empty json": (lambda d: _text(d, "[]", "data.json"), ["no examples"]),
    "empty text": (lambda d: _text(d, " \n"), ["empty"]),
    "shorter than a window": (lambda d: _text(d, "the a of and"), ["4 tokens", "--seqlen 16"]),
    "prompts fill seqlen": (lambda d: write_jsonl(d / "data.jsonl", RECORDS), ["--seqlen 16"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_cleanly(capsys, tiny_model_dir, tmp_path, case):
    make, words = BAD_DATA[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "work").mkdir()
    data = make(tmp_path / "in")
    out = tmp_path / "work" / "out"
    assert_fails_cleanly(capsys, ["finetune", str(tiny_model_dir), "--data", str(data), "--out", str(out), *FAST],
                         out, [tiny_model_dir, data], *words)


def test_resume_without_checkpoints_fails_cleanly(capsys, tiny_model_dir, tmp_path):
    data = _text(tmp_path, REPETITIVE)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    assert_fails_cleanly(capsys, ["finetune", str(tiny_model_dir), "--data", str(data), "--out", str(out), *FAST,
                                  "--resume"], out, [tiny_model_dir, data], "--resume", "no checkpoint")


def test_earlier_checkpoints_need_resume_or_overwrite(capsys, tiny_model_dir, tmp_path):
    data = _text(tmp_path, REPETITIVE)
    out = tmp_path / "work" / "out"
    (checkpoint_folder(out) / "checkpoint-1").mkdir(parents=True)
    assert_fails_cleanly(capsys, ["finetune", str(tiny_model_dir), "--data", str(data), "--out", str(out), *FAST],
                         out, [tiny_model_dir, data], "earlier run", "--resume", "--overwrite")


def test_bad_options_fail_cleanly(capsys, tiny_model_dir, tmp_path):
    data = _text(tmp_path, REPETITIVE)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    assert_fails_cleanly(capsys, ["finetune", str(tiny_model_dir), "--data", str(data), "--out", str(out), *FAST,
                                  "--lora-r", "0"], out, [tiny_model_dir, data], "--lora-r", "positive")


# --------------------------------------------------------------------------- accelerate launch, 2 processes


def test_accelerate_launch_two_cpu_processes_agree(tiny_model_dir, calib_text_file, tmp_path):
    out = tmp_path / "out"
    output = launch(DATA_PARALLEL, ["finetune", str(tiny_model_dir), "--data", str(calib_text_file), "--out", str(out),
                                    *FAST])
    section = json.loads((out / SUMMARY_FILE).read_text())["finetune"]
    assert section["world_size"] == 2 and section["effective_batch_size"] == 4 and section["steps"] == 3
    checksums = section["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    assert "trained 3 steps on 2 process(es)" in output
    tuned, _ = load_model(str(out))
    source, _ = load_model(str(tiny_model_dir))
    weights = dict(tuned.named_parameters())
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           dict(source.named_parameters())["model.layers.0.self_attn.q_proj.weight"])
