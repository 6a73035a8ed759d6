"""No command loses a user's data, and bad input is refused before the model is loaded.

Every command that writes refuses an ``--out`` that is an input, holds one or lies inside one, and
``--overwrite`` replaces only a folder llm-bip wrote; each case is a one-line error before any work,
with every file left as it was. Text that is not text, devices the machine lacks and GGUF files of
architectures that cannot be pruned are refused up front too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from helpers import FAST, assert_fails_cleanly, earlier_output, error_message, prune_args, snapshot

from llm_bip.cli import main
from llm_bip.data import read_text_file
from llm_bip.devices import check_device, note_slow_cpu_dtype
from llm_bip.errors import PruneError
from llm_bip.evaluation import perplexity
from llm_bip.outputs import OUTPUT_MARKER, save_model
from llm_bip.sources import gguf_architecture
from llm_bip.testing import build_tokenizer, tiny_model

EVAL = ["--seqlen", "16", "--max-tokens", "64"]


@pytest.fixture
def user_folder(tmp_path, tiny_model_dir, calib_text_file) -> Path:
    """A user's folder: a model, a calibration text and an unrelated notes file."""
    folder = tmp_path / "user"
    shutil.copytree(tiny_model_dir, folder / "model")
    shutil.copy(calib_text_file, folder / "calib.txt")
    (folder / "notes.txt").write_text("unrelated notes")
    return folder


def command(name: str, folder: Path, out: Path) -> list[str]:
    """``name``'s argv reading the model and text in ``folder`` and writing ``out`` (with --overwrite)."""
    model, text = str(folder / "model"), str(folder / "calib.txt")
    return {
        "prune": prune_args(model, out, text),
        "eval": ["eval", model, "--ppl", text, *EVAL, "--out", str(out)],
        "compare": ["compare", model, "--out", str(out), "--methods", "random", "--ratios", "0.2", "--seqlens", "16",
                    "--ppl", text, "--calibration", text, "--samples", "4", "--calib-seqlen", "16"],
        "finetune": ["finetune", model, "--data", text, "--out", str(out), "--seqlen", "16", "--max-steps", "1",
                     "--eval", "none"],
        "distill": ["distill", model, "--teacher", model, "--data", text, "--out", str(out), "--seqlen", "16",
                    "--max-steps", "1", "--eval", "none"],
        "bench-speed": ["bench-speed", model, "--out", str(out), "--batch-sizes", "1", "--lengths", "8",
                        "--decode-tokens", "2", "--prompt-length", "4", "--repeats", "1", "--warmup", "0"],
    }[name] + ["--overwrite"]


COMMANDS = ["prune", "eval", "compare", "finetune", "distill", "bench-speed"]
OVERLAPS = {  # --out relative to the user's folder, and what the message says
    "is-input": (lambda f: f / "model", "is the input"),
    "holds-input": (lambda f: f, "holds the input"),
    "inside-input": (lambda f: f / "model" / "run", "lies inside the input"),
}


@pytest.mark.parametrize("overlap", list(OVERLAPS))
@pytest.mark.parametrize("name", COMMANDS)
def test_out_overlapping_an_input_is_refused(capsys, user_folder, name, overlap):
    where, words = OVERLAPS[overlap]
    out = where(user_folder)
    before = snapshot(user_folder)
    capsys.readouterr()
    assert main(command(name, user_folder, out)) == 2
    assert words in error_message(capsys.readouterr().err)
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_refuses_a_folder_llm_bip_did_not_write(capsys, user_folder, tmp_path, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_fails_cleanly(capsys, command(name, user_folder, out), out, [user_folder, out], "not written by llm-bip",
                         OUTPUT_MARKER)


def test_report_out_overlapping_its_inputs_is_refused(capsys, user_folder, tmp_path):
    run = tmp_path / "run"
    assert main(prune_args(user_folder / "model", run, user_folder / "calib.txt")) == 0
    evals = tmp_path / "evals"
    assert main(["eval", str(run), "--ppl", str(user_folder / "calib.txt"), *EVAL, "--out", str(evals)]) == 0
    before = snapshot(tmp_path)
    for out, words in [(run, "is the input"), (tmp_path, "holds the input"), (evals / "sub", "lies inside")]:
        capsys.readouterr()
        assert main(["report", str(run), "--eval", str(evals), "--out", str(out), "--overwrite"]) == 2
        assert words in error_message(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_offload_work_folder_may_not_be_an_input(capsys, tmp_path, tiny_model_dir, calib_text_file):
    model = tmp_path / "m.partial"  # the work folder of --out tmp/m
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    assert main(prune_args(model, tmp_path / "m", calib_text_file, "--offload")) == 2
    assert "is the input" in error_message(capsys.readouterr().err)
    assert snapshot(model) == before


def test_overwrite_replaces_an_earlier_output(capsys, user_folder, tmp_path):
    out = earlier_output(tmp_path / "out")
    assert main(command("eval", user_folder, out)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["llm_bip_eval.json", OUTPUT_MARKER]


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        out = save_model(tiny_model("llama-gqa"), None, tmp_path / "out", overwrite=False)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


# --------------------------------------------------------------------------- text that is not text

NOT_TEXT = {
    "binary": (bytes(range(256)) * 40, ["not utf-8 text", "offset 128"]),
    "utf16-without-bom": ("the a of and to in is was for on\n".encode("utf-16-le") * 100, ["not text", "nul"]),
    "mostly-nuls": (b"\0" * 4000 + b"the a of", ["not text", "nul"]),
    "latin1": ("the caf\xe9 of the world\n".encode("latin-1") * 100, ["not utf-8 text", "offset 7"]),
}


@pytest.mark.parametrize("option", ["--calibration", "--eval"])
@pytest.mark.parametrize("case", list(NOT_TEXT))
def test_prune_refuses_text_that_is_not_text(capsys, work, tmp_path, tiny_model_dir, calib_text_file, case, option):
    data, words = NOT_TEXT[case]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(data)
    argv = prune_args(tiny_model_dir, work / "out", calib_text_file)
    argv[argv.index(option) + 1] = str(bad)
    assert_fails_cleanly(capsys, argv, work / "out", [tiny_model_dir, bad], "bad.txt", *words)


def test_eval_refuses_text_that_is_not_text(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(NOT_TEXT["binary"][0])
    assert main(["eval", str(tiny_model_dir), "--ppl", str(bad), *EVAL]) == 2
    assert "not UTF-8 text" in error_message(capsys.readouterr().err)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_text_with_a_byte_order_mark_is_read(tmp_path, encoding):
    text = "Zoë's café, naïve — the end.\n"
    path = tmp_path / "text.txt"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    path.write_bytes(data)
    assert read_text_file(path) == text


# --------------------------------------------------------------------------- devices and dtypes

@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("device,words", [("gpu", ["unknown --device", "gpu"]), ("cuda:7", ["--device cuda:7"])])
def test_bad_device_is_refused_before_loading(capsys, tmp_path, user_folder, name, device, words):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = command(name, user_folder, tmp_path / "out")
    argv[1] = str(tmp_path / "no-such-model")  # the device is refused first, before the model is looked at
    assert_fails_cleanly(capsys, [*argv, "--device", device], tmp_path / "out", [user_folder], *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_plain_message():
    with pytest.raises(PruneError, match="sees no CUDA device; use --device cpu"):
        check_device("cuda")


def test_half_precision_on_cpu_is_noted_once(capsys):
    note_slow_cpu_dtype.cache_clear()
    check_device("cpu", "bfloat16")
    check_device("cpu", "bfloat16")
    check_device("cpu", "float32")
    err = capsys.readouterr().err
    assert err.count("bfloat16 on the CPU runs about 4x slower than float32") == 1


# --------------------------------------------------------------------------- GGUF files and architectures

def write_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file whose header holds several key-value pairs (strings, arrays) before the architecture."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_token_list(["<s>", "</s>", "the"])
    writer.add_token_scores([0.0, -1.0, -2.0])
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", torch.zeros(3, 4).numpy())
    for shard in writer.kv_data:  # the architecture last: the reader must skip every other kind of value
        shard["general.architecture"] = shard.pop("general.architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "rwkv6"])
def test_gguf_architecture_is_read_from_the_header(tmp_path, architecture):
    path = write_gguf(tmp_path / "m.gguf", architecture)
    field = gguf.GGUFReader(path).fields["general.architecture"]
    assert gguf_architecture(path) == architecture == bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("argv,words", [
    (["prune", "MODEL", "--out", "OUT", *FAST], ["unsupported architecture 'stablelm' for pruning", "llama"]),
    (["eval", "MODEL", "--ppl", "ptb"], []),  # evaluation takes stablelm: it fails later, in the conversion
])
def test_gguf_architecture_without_an_adapter(capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path / "cache"))
    model = write_gguf(tmp_path / "m.gguf", "stablelm")
    argv = [str(model) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    message = error_message(capsys.readouterr().err)
    assert all(w in message for w in words), message
    if not words:
        assert "could not read GGUF file" in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("config.json"))


def test_gguf_architecture_read_as_another_model_type_passes_the_header_check(capsys, monkeypatch, tmp_path):
    """transformers reads a "gemma3" GGUF as gemma3_text, which prunes: this header-only file fails later,
    in the conversion."""
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path / "cache"))
    model = write_gguf(tmp_path / "m.gguf", "gemma3")
    assert main(["prune", str(model), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "could not read GGUF file" in error_message(capsys.readouterr().err)


def test_gguf_architecture_transformers_cannot_read(capsys, tmp_path):
    model = write_gguf(tmp_path / "m.gguf", "rwkv6")
    assert main(["eval", str(model), "--ppl", "ptb"]) == 2
    assert "transformers cannot read GGUF architecture 'rwkv6'" in error_message(capsys.readouterr().err)


# --------------------------------------------------------------------------- evaluation of any causal LM

def test_eval_takes_an_architecture_no_adapter_prunes(capsys, tmp_path, calib_text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    assert main(["eval", str(tmp_path / "gpt2"), "--ppl", str(calib_text_file), *EVAL]) == 0
    out = capsys.readouterr().out
    assert f"{calib_text_file} perplexity " in out and "/test" not in out  # a file is evaluated whole


def test_split_of_a_file_is_refused(capsys, tiny_model_dir, calib_text_file):
    assert main(["eval", str(tiny_model_dir), "--ppl", str(calib_text_file), "--split", "valid", *EVAL]) == 2
    assert "is a file, evaluated whole" in error_message(capsys.readouterr().err)


# --------------------------------------------------------------------------- the perplexity cache

def test_perplexity_cache_reuses_only_identical_measurements(monkeypatch, tmp_path, tiny_model_dir, calib_text_file):
    from llm_bip import load_model

    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path / "cache"))  # empty: no other test's measurement in it
    model, tokenizer = load_model(str(tiny_model_dir))
    args = (model, tokenizer, str(calib_text_file), "test", 16, 160)
    first = perplexity(*args, cache=True, progress=False)
    assert not first.cached
    with monkeypatch.context() as patch:
        patch.setattr("llm_bip.evaluation.window_nll", lambda *a, **k: pytest.fail("measured again"))
        again = perplexity(*args, cache=True, progress=False)
    assert again.cached and again.as_dict() == first.as_dict()
    assert not perplexity(*args, progress=False).cached  # cache=False always measures
    assert not perplexity(model, tokenizer, str(calib_text_file), "test", 32, 160, cache=True, progress=False).cached
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    changed = perplexity(*args, cache=True, progress=False)
    assert not changed.cached and changed.ppl != first.ppl


def test_prune_reuses_the_dense_perplexity(capsys, work, tiny_model_dir, calib_text_file):
    argv = prune_args(tiny_model_dir, work / "a", calib_text_file)
    argv[argv.index("--eval") + 1] = str(calib_text_file)
    argv += ["--eval-seqlen", "16"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main([*argv[:3], str(work / "b"), *argv[4:]]) == 0
    second = capsys.readouterr().out
    lines = [[line for line in text.splitlines() if line.startswith(("dense:", "pruned:"))] for text in (first, second)]
    assert [line.endswith("scored)") for line in lines[0]] == [True, True]
    assert lines[1] == [line.replace("scored)", "scored, cached)") for line in lines[0]]
    assert main([*argv[:3], str(work / "c"), *argv[4:], "--no-cache"]) == 0
    assert "cached" not in capsys.readouterr().out


def test_per_layer_checkpoints_load_without_warnings(tmp_path, tiny_model_dir, calib_text_file):
    out = tmp_path / "out"
    assert main(prune_args(tiny_model_dir, out, calib_text_file, "--allocation", "global")) == 0
    script = "import sys; from llm_bip.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, "eval", str(out), "--ppl", str(calib_text_file), *EVAL,
                           "--no-cache"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "per-layer" not in proc.stderr and "warning" not in proc.stderr.lower(), proc.stderr


def test_work_folders_that_llm_bip_did_not_write_are_kept(capsys, tmp_path, tiny_model_dir, calib_text_file):
    out = tmp_path / "out"
    for name, argv in [("out.partial", prune_args(tiny_model_dir, out, calib_text_file, "--offload", "--overwrite")),
                       ("out.checkpoints", ["finetune", str(tiny_model_dir), "--data", str(calib_text_file), "--out",
                                            str(out), "--seqlen", "16", "--max-steps", "1", "--eval", "none",
                                            "--overwrite"]),
                       ("out.pruned", prune_args(tiny_model_dir, out, calib_text_file, "--recover", "1"))]:
        mine = tmp_path / name
        mine.mkdir()
        (mine / "data.csv").write_text("a user's folder that happens to have this name")
        assert_fails_cleanly(capsys, argv, out, [mine], name, "holds none" if "checkpoints" in name
                             else "not written by llm-bip")
