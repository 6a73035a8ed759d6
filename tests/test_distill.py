"""Distillation: the losses against independent arithmetic, a step toward the teacher, the top-k teacher cache
(exact round trip, the online loss when k is the vocabulary), resume, two processes, data sources, refusals."""

from __future__ import annotations

import json
import logging
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate_launch import DATA_PARALLEL, FSDP_CONFIG, launch
from helpers import assert_fails_cleanly, stop_after_save
from safetensors.torch import load_file

from llm_bip import PruneConfig, PruneError
from llm_bip.cli import main
from llm_bip.evaluation import agreement, text_windows
from llm_bip.loading import load_model
from llm_bip.losses import IGNORE_INDEX, hidden_sum, kl_sum, lm_sum, predicting, top_k
from llm_bip.outputs import EVAL_FILE, SUMMARY_FILE, cache_dir
from llm_bip.pipeline import is_finished, pruned_stage, run_prune_and_recover
from llm_bip.recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune
from llm_bip.selfcalib import self_calibration_ids
from llm_bip.teacher import OnlineTeacher
from llm_bip.teacher_cache import CachedExamples, build_cache, cache_key, teacher_top_k
from llm_bip.testing import build_model, build_tokenizer, calibration_text
from llm_bip.training import Collator, train, trainable, training_arguments
from llm_bip.training_data import DataFile, build_training_data, read_data

REPETITIVE = "the new year of the world " * 200
FAST = ["--seqlen", "16", "--batch-size", "2", "--max-steps", "3", "--eval", "none"]


def random_logits(seed: int, shape=(2, 6, 11)) -> torch.Tensor:
    return 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LABELS = torch.tensor([[5, 1, 2, IGNORE_INDEX, 4, 7], [0, 3, 3, 9, IGNORE_INDEX, IGNORE_INDEX]])


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Sum over positions t whose next label is kept of sum_v p_T(v) (log p_T(v) - log q_T(v)), times T^2."""
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            p = [math.exp(x) for x in (teacher[b, t] / temperature).tolist()]
            q = [math.exp(x) for x in (student[b, t] / temperature).tolist()]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    return total * temperature ** 2


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_sum_is_the_forward_kl_written_out(temperature):
    student, teacher = random_logits(0), random_logits(1)
    mask = predicting(LABELS)
    found = kl_sum(student, teacher, mask, temperature)
    assert float(found) == pytest.approx(kl_by_hand(student, teacher, LABELS, temperature), rel=1e-5)
    assert float(kl_sum(student, student.clone(), mask, temperature)) == pytest.approx(0, abs=1e-5)


def test_lm_sum_is_the_summed_next_token_cross_entropy():
    logits = random_logits(2)
    by_hand = sum(-float(logits[b, t].float().log_softmax(-1)[LABELS[b, t + 1]])
                  for b in range(2) for t in range(5) if LABELS[b, t + 1] != IGNORE_INDEX)
    assert float(lm_sum(logits, LABELS)) == pytest.approx(by_hand, rel=1e-5)


def test_top_k_kl_with_the_whole_vocabulary_is_the_full_kl():
    student, teacher = random_logits(3), random_logits(4)
    mask = predicting(LABELS)
    whole = top_k(teacher, k=teacher.shape[-1])
    assert torch.isinf(whole.rest).all()
    assert float(kl_sum(student, whole, mask)) == pytest.approx(float(kl_sum(student, teacher, mask)), rel=1e-5)


def test_top_k_kl_is_the_kl_of_the_top_k_and_one_bucket_for_the_rest():
    student, teacher = random_logits(5), random_logits(6)
    mask = predicting(LABELS)
    k = 3
    found = float(kl_sum(student, top_k(teacher, k), mask))
    by_hand = 0.0
    for b, t in mask.nonzero().tolist():
        p, q = teacher[b, t].softmax(-1), student[b, t].softmax(-1)
        top = p.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        grouped_p = [*p[top].tolist(), float(p[rest].sum())]
        grouped_q = [*q[top].tolist(), float(q[rest].sum())]
        by_hand += sum(pv * math.log(pv / qv) for pv, qv in zip(grouped_p, grouped_q))
    assert found == pytest.approx(by_hand, rel=1e-5)
    assert found <= float(kl_sum(student, teacher, mask)) + 1e-6  # grouping outcomes never increases a KL


def test_hidden_sum_is_the_relative_squared_distance_per_block():
    g = torch.Generator().manual_seed(7)
    student = [torch.randn(2, 6, 4, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 6, 4, generator=g) * (i + 1) for i in range(3)]
    mask = predicting(LABELS)
    by_hand = 0.0
    for s, t in zip(student, teacher):
        positions = [(b, p) for b in range(2) for p in range(5) if mask[b, p]]
        scale = sum(float(t[b, p].pow(2).sum()) for b, p in positions) / len(positions)
        by_hand += sum(float((s[b, p] - t[b, p]).pow(2).sum()) for b, p in positions) / scale
    assert float(hidden_sum(student, teacher, mask)) == pytest.approx(by_hand / 3, rel=1e-5)
    assert float(hidden_sum(teacher, teacher, mask)) == 0


# --------------------------------------------------------------------------- a student and its teacher


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, calib_text_file, tmp_path_factory) -> Path:
    """The tiny model pruned 30% (per-layer widths, compensation biases); its summary names its teacher."""
    out = tmp_path_factory.mktemp("student") / "pruned"
    assert main(["prune", str(tiny_model_dir), "--out", str(out), "--ratio", "0.3", "--calibration",
                 str(calib_text_file), "--samples", "4", "--calib-seqlen", "16", "--eval", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(calibration_text(5000, seed=3))
    return path


def config_for(data_file: Path, **fields) -> DistillConfig:
    return DistillConfig(**{"data": str(data_file), "seqlen": 16, "batch_size": 2, "max_steps": 3, "eval": "none",
                            "lora_dropout": 0.0, "save_steps": 100, **fields})


def batch_kl(model, teacher, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        return float(kl_sum(logits, teacher(input_ids=batch["input_ids"]).logits, predicting(batch["labels"])))


@pytest.mark.parametrize("full", [False, True])
def test_one_step_moves_the_student_toward_the_teacher(student_dir, tiny_model_dir, data_file, tmp_path, full):
    student, tokenizer = load_model(str(student_dir))
    teacher, _ = load_model(str(tiny_model_dir))
    config = config_for(data_file, max_steps=1, batch_size=4, lr=1e-4, full=full)
    examples = build_training_data(tokenizer, read_data(config.data), config.seqlen, config.seed, limit=4).examples
    batch = Collator(tokenizer)(examples)
    before = batch_kl(student, teacher, batch)
    model = trainable(student, config)
    train(model, tokenizer, examples, training_arguments(config, tmp_path / "checkpoints", "cpu"),
          config.objective(), OnlineTeacher(teacher))
    model.eval()
    assert before > 0
    assert batch_kl(model, teacher, batch) < before


def test_agreement_is_the_mean_kl_and_top1_match_with_the_teacher(student_dir, tiny_model_dir, data_file, tmp_path):
    student, tokenizer = load_model(str(student_dir))
    teacher, _ = load_model(str(tiny_model_dir))
    same = agreement(teacher, teacher, tokenizer, str(data_file), "test", 16, 160)
    assert (same.kl, same.top1, same.tokens) == (pytest.approx(0, abs=1e-6), 1.0, 150)
    found = agreement(student, teacher, tokenizer, str(data_file), "test", 16, 160)
    windows = text_windows(tokenizer, str(data_file), "test", 16, 160)
    with torch.no_grad():
        q, p = (m(windows).logits[:, :-1].log_softmax(-1) for m in (student, teacher))
    assert found.kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    assert found.top1 == pytest.approx(float((q.argmax(-1) == p.argmax(-1)).double().mean()), rel=1e-12)
    out = tmp_path / "eval"
    assert main(["eval", str(student_dir), "--ppl", str(data_file), "--seqlen", "16", "--max-tokens", "160",
                 "--teacher", str(tiny_model_dir), "--out", str(out)]) == 0
    written = json.loads((out / EVAL_FILE).read_text())
    assert written["agreement"][0]["kl"] == pytest.approx(found.kl, rel=1e-6)
    assert written["teacher"] == str(tiny_model_dir)


# --------------------------------------------------------------------------- the teacher cache


@pytest.mark.parametrize("k", [5, 64])
def test_the_cache_round_trips_exactly(tiny_model_dir, data_file, tmp_path, k):
    teacher, tokenizer = load_model(str(tiny_model_dir))
    examples = build_training_data(tokenizer, read_data(str(data_file)), 16, 0, limit=70).examples
    examples[3] = {"input_ids": examples[3]["input_ids"][:9], "labels": examples[3]["labels"][:9]}  # a short one
    key = cache_key(str(tiny_model_dir), examples, k, 1.0)
    build_cache(teacher, examples, tmp_path / "cache", key, batch_size=4, pad_id=0)
    cached = CachedExamples(examples, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2  # 64 examples a shard
    for i in (0, 3, 69):
        first = i - i % 4  # the batch of 4 that computed example i
        expected = teacher_top_k(teacher, examples[first:first + 4], k, 1.0, pad_id=0)[i - first]
        item = cached[i]
        assert item["input_ids"] == examples[i]["input_ids"]
        for name in ("indices", "log_probs", "rest"):
            assert torch.equal(item[f"teacher_{name}"], getattr(expected, name))  # bit for bit
        with torch.no_grad():  # the padding of the batch left the example's own answers as they are
            alone = top_k(teacher(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0], k)
        assert torch.equal(item["teacher_indices"], alone.indices)
        assert torch.allclose(item["teacher_log_probs"], alone.log_probs, atol=1e-5, rtol=0)


def test_a_cache_of_the_whole_vocabulary_trains_as_the_online_teacher(student_dir, data_file, tmp_path):
    online = run_distill(str(student_dir), tmp_path / "online", config_for(data_file))["distill"]
    cached = run_distill(str(student_dir), tmp_path / "cached",
                         config_for(data_file, teacher_cache=str(tmp_path / "cache"), cache_top_k=64))["distill"]
    assert cached["teacher"]["top_k"] == 64 and cached["teacher"]["cache"] == str(tmp_path / "cache")
    assert [h["kl"] for h in cached["loss_history"]] == pytest.approx([h["kl"] for h in online["loss_history"]],
                                                                       rel=1e-5)
    a, b = load_file(tmp_path / "online" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-6, rtol=0) for name in a)
    # a second student on the same examples reuses the cache without the teacher
    again = run_distill(str(student_dir), tmp_path / "again",
                        config_for(data_file, teacher_cache=str(tmp_path / "cache"), cache_top_k=64))["distill"]
    assert "load_teacher" not in again["phases"]
    assert again["phases"]["teacher_cache"]["wall_s"] < cached["phases"]["teacher_cache"]["wall_s"]


def test_the_summary_records_the_teacher_and_the_losses(student_dir, tiny_model_dir, data_file, tmp_path):
    summary = run_distill(str(student_dir), tmp_path / "out",
                          config_for(data_file, lm_weight=0.5, hidden_weight=2.0, temperature=2.0, full=True))
    section = summary["distill"]
    assert section["teacher"] == {"source": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}
    assert section["objective"] == {"kl": 1.0, "lm": 0.5, "hidden": 2.0, "temperature": 2.0}
    assert "lora" not in section and section["training_tokens"] == 3 * 2 * 16
    for entry in section["loss_history"]:
        assert entry["loss"] == pytest.approx(entry["kl"] + 0.5 * entry["lm"] + 2.0 * entry["hidden"], rel=1e-4)
    pruned = json.loads((student_dir / SUMMARY_FILE).read_text())
    assert {k: summary[k] for k in pruned} == pruned  # the prune's summary is kept
    tuned, _ = load_model(str(tmp_path / "out"))
    source, _ = load_model(str(student_dir))
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, dict(source.named_parameters())[n])}
    assert any(n.endswith("o_proj.bias") for n in changed)  # --full trains the compensation biases too


def test_resume_gives_the_weights_of_an_uninterrupted_run(student_dir, data_file, tmp_path):
    config = config_for(data_file, max_steps=4, save_steps=2, lr=1e-2)
    with pytest.raises(KeyboardInterrupt):
        run_distill(str(student_dir), tmp_path / "resumed", config, callbacks=[stop_after_save(2)])
    resumed = run_distill(str(student_dir), tmp_path / "resumed", config, resume=True)["distill"]
    straight = run_distill(str(student_dir), tmp_path / "straight", config)["distill"]
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == straight["steps"] == 4
    assert [h["kl"] for h in resumed["loss_history"]] == pytest.approx([h["kl"] for h in straight["loss_history"]],
                                                                        rel=1e-6)
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)


# --------------------------------------------------------------------------- prune, then recover


def test_prune_and_recover_resumes_at_the_phase_it_stopped_in(tiny_model_dir, calib_text_file, data_file, tmp_path,
                                                              caplog):
    prune_config = PruneConfig(ratio=0.3, calibration=str(calib_text_file), n_samples=4, seqlen=16)
    recovery = config_for(data_file, max_steps=4, save_steps=2)
    run = partial(run_prune_and_recover, str(tiny_model_dir), config=prune_config, recovery=recovery,
                  eval_dataset=str(calib_text_file), eval_seqlen=16, eval_max_tokens=160)
    straight = run(tmp_path / "straight")
    assert not pruned_stage(tmp_path / "straight").exists()
    assert straight["distill"]["teacher"]["source"] == str(tiny_model_dir)
    assert straight["perplexity"]["pruned"]["ppl"] == straight["distill"]["perplexity"]["before"]["ppl"]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(out, callbacks=[stop_after_save(2)])
    assert is_finished(pruned_stage(out)) and not out.exists()
    with pytest.raises(PruneError, match="--resume"):
        run(out)
    with caplog.at_level(logging.INFO, logger="llm_bip"):
        resumed = run(out, resume=True)
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("resuming:") for line in lines)  # not pruned again
    assert resumed["distill"]["resumed_from"].endswith("checkpoint-2")
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)
    assert not pruned_stage(out).exists()


def test_prune_recover_through_the_cli(capsys, tiny_model_dir, calib_text_file, data_file, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--out", str(out), "--calibration", str(calib_text_file),
                 "--samples", "4", "--calib-seqlen", "16", "--eval", "none",
                 "--recover", "1", "--recover-data", str(data_file)]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["distill"]["steps"] == 1 and summary["distill"]["teacher"]["source"] == str(tiny_model_dir)
    assert summary["distill"]["data"]["source"] == str(data_file)
    assert not pruned_stage(out).exists()
    assert f"wrote {out}" in capsys.readouterr().out


def test_recover_refuses_offload(capsys, tiny_model_dir, work):
    out = work / "out"
    assert_fails_cleanly(capsys, ["prune", str(tiny_model_dir), "--out", str(out), "--offload", "--recover", "3"],
                         out, [tiny_model_dir], "--recover", "--offload")


# --------------------------------------------------------------------------- data


def test_mix_takes_equal_turns_of_its_corpora(tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    texts = {name: " ".join([word] * 400) for name, word in (("a", "the"), ("b", "world"), ("c", "hand"))}
    data = build_training_data(tokenizer, DataFile("mix", "mix", texts), 16, 0, limit=7)
    first_words = [tokenizer.decode(e["input_ids"][1:2]) for e in data.examples]
    assert first_words == ["the", "world", "hand", "the", "world", "hand", "the"]


def test_self_data_is_what_the_writer_samples(tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    windows = torch.arange(12).view(3, 4)
    data = build_training_data(tokenizer, read_data("self"), 4, 0, limit=3, sample=lambda n: windows[:n])
    assert [e["input_ids"] for e in data.examples] == windows.tolist() == [e["labels"] for e in data.examples]


def test_self_data_distills_without_any_text(student_dir, tmp_path):
    section = run_distill(str(student_dir), tmp_path / "out", config_for("self"))["distill"]
    assert section["data"]["format"] == "self" and section["data"]["examples"] == 6


def test_finetune_on_self_data_samples_the_parent(student_dir, tiny_model_dir, tmp_path):
    parent, tokenizer = load_model(str(tiny_model_dir))
    assert self_calibration_ids(parent, tokenizer, 6, 16, 0, 2).shape == (6, 16)  # the parent's windows, cached
    entries = sorted((cache_dir() / "calibration").iterdir())
    section = run_finetune(str(student_dir), tmp_path / "out", FinetuneConfig(
        data="self", seqlen=16, batch_size=2, max_steps=3, eval="none"))["finetune"]
    assert section["data"] == {"source": "self", "format": "self", "examples": 6, "tokens": 96, "loss_tokens": 90}
    assert sorted((cache_dir() / "calibration").iterdir()) == entries  # the same windows: read from the cache


def test_a_corpus_trains_on_its_train_split():
    tokenizer = build_tokenizer()
    data = build_training_data(tokenizer, read_data("ptb"), 16, 0, limit=5)
    assert data.describe()["source"] == "ptb" and len(data.examples) == 5


# --------------------------------------------------------------------------- two processes


def test_two_cpu_processes_share_the_cache_and_train_equal_weights(student_dir, data_file, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    launch(DATA_PARALLEL, ["distill", str(student_dir), "--data", str(data_file), "--out", str(out), "--full",
                           "--teacher-cache", str(cache), "--max-steps", "70", *FAST[:4], *FAST[6:]])
    section = json.loads((out / SUMMARY_FILE).read_text())["distill"]
    assert section["world_size"] == 2 and section["steps"] == 70 and section["data"]["examples"] == 280
    assert len(section["checksums"]) == 2 and section["checksums"][0] == section["checksums"][1]
    assert len(list(cache.glob("shard-*.safetensors"))) == 5  # 280 examples, shared out over both processes


def test_fsdp_trains_all_weights_as_data_parallel_does(student_dir, data_file, tmp_path):
    (tmp_path / "fsdp.yaml").write_text(FSDP_CONFIG)
    options = ["--data", str(data_file), "--full", *FAST]
    launch(DATA_PARALLEL, ["distill", str(student_dir), "--out", str(tmp_path / "ddp"), *options])
    launch(["--config_file", str(tmp_path / "fsdp.yaml")],
           ["distill", str(student_dir), "--out", str(tmp_path / "fsdp"), *options])
    ddp, fsdp = (load_file(tmp_path / name / "model.safetensors") for name in ("ddp", "fsdp"))
    source = load_file(student_dir / "model.safetensors")
    assert set(fsdp) == set(source) and all(fsdp[k].shape == source[k].shape for k in source)  # whole tensors
    assert all(torch.allclose(fsdp[k], ddp[k], atol=1e-6, rtol=0) for k in ddp)
    assert not torch.equal(fsdp["model.layers.0.mlp.down_proj.weight"], source["model.layers.0.mlp.down_proj.weight"])


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def other_vocabulary(tmp_path) -> Path:
    folder = tmp_path / "in" / "other"
    build_model("llama", 0, vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                pad_token_id=None).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_a_teacher_with_another_vocabulary_is_refused(capsys, student_dir, data_file, other_vocabulary, work):
    out = work / "out"
    assert_fails_cleanly(capsys, ["distill", str(student_dir), "--data", str(data_file), "--out", str(out),
                                  "--teacher", str(other_vocabulary), *FAST], out, [student_dir, data_file],
                         "another vocabulary", "80 embedded")


def test_a_model_without_a_parent_needs_a_teacher(capsys, tiny_model_dir, data_file, work):
    out = work / "out"
    assert_fails_cleanly(capsys, ["distill", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), *FAST],
                         out, [tiny_model_dir, data_file], "pruned from", "--teacher")


def test_a_parent_that_is_gone_needs_a_teacher(capsys, student_dir, data_file, tmp_path, work):
    moved = tmp_path / "in" / "student"
    shutil.copytree(student_dir, moved)
    summary = json.loads((moved / SUMMARY_FILE).read_text())
    (moved / SUMMARY_FILE).write_text(json.dumps({**summary, "model": str(tmp_path / "gone")}))
    out = work / "out"
    assert_fails_cleanly(capsys, ["distill", str(moved), "--data", str(data_file), "--out", str(out), *FAST],
                         out, [moved, data_file], "gone", "no such file", "--teacher")


@pytest.mark.parametrize("extra,words", [
    (["--hidden-weight", "1", "--teacher-cache", "CACHE"], ["--hidden-weight", "--teacher-cache"]),
    (["--temperature", "0"], ["--temperature", "positive"]),
    (["--cache-top-k", "0"], ["--cache-top-k"]),
    (["--teacher-dtype", "int8"], []),
])
def test_bad_options_fail_cleanly(capsys, student_dir, data_file, work, extra, words):
    out = work / "out"
    extra = [str(work / "cache") if e == "CACHE" else e for e in extra]
    if "int8" in extra:
        with pytest.raises(SystemExit):  # argparse's own choices
            main(["distill", str(student_dir), "--data", str(data_file), "--out", str(out), *FAST, *extra])
        return
    assert_fails_cleanly(capsys, ["distill", str(student_dir), "--data", str(data_file), "--out", str(out), *FAST,
                                  *extra], out, [student_dir, data_file], *words)


def test_self_data_needs_max_steps(capsys, student_dir, work):
    out = work / "out"
    assert_fails_cleanly(capsys, ["distill", str(student_dir), "--data", "self", "--out", str(out), "--seqlen", "16",
                                  "--eval", "none"], out, [student_dir], "--data self", "--max-steps")


def test_a_cache_made_for_other_examples_is_refused(capsys, student_dir, data_file, tmp_path, work):
    cache = tmp_path / "cache"
    run_distill(str(student_dir), tmp_path / "first", config_for(data_file, teacher_cache=str(cache)))
    out = work / "out"
    assert_fails_cleanly(capsys, ["distill", str(student_dir), "--data", str(data_file), "--out", str(out),
                                  "--teacher-cache", str(cache), *FAST[:4], "--max-steps", "5", *FAST[6:]],
                         out, [student_dir, data_file, cache], "does not fit this run", "its examples",
                         "choose another folder")


def test_fsdp_with_lora_is_refused(capsys, student_dir, data_file, work, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = work / "out"
    argv = ["distill", str(student_dir), "--data", str(data_file), "--out", str(out), "--no-full", *FAST]
    assert_fails_cleanly(capsys, argv, out, [student_dir, data_file], "FSDP", "--full")
