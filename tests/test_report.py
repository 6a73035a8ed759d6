"""``llm-bip report`` on real tiny runs: a prune run, its fine-tuned copy, an eval folder and a bench-speed
folder, each written by its producer, rendered into markdown, HTML and PNG plots."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from safetensors.numpy import load_file

from llm_bip.cli import main
from llm_bip.outputs import EVAL_FILE, OUTPUT_MARKER, SCORES_FILE, SPEED_FILE, SUMMARY_FILE
from llm_bip.report import run_report, to_html
from llm_bip.report_plots import speedups
from llm_bip.speed import SpeedSettings, bench_speed, write_speed
from llm_bip.zeroshot import AVERAGED

TASKS = Path(__file__).parent / "data" / "tasks" / "tiny_words"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, calib_text_file) -> Path:
    """A tiny global-allocation prune run (per-layer widths) with perplexity before and after."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["prune", str(tiny_model_dir), "--out", str(run), "--calibration", str(calib_text_file),
                 "--samples", "4", "--calib-seqlen", "16", "--allocation", "global", "--ratio", "0.3",
                 "--eval", str(calib_text_file), "--eval-seqlen", "16", "--eval-max-tokens", "256"]) == 0
    return run


def summary_of(run: Path) -> dict:
    return json.loads((run / SUMMARY_FILE).read_text())


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def part(markdown: str, heading: str) -> str:
    """The text from ``heading`` to the next level-2 heading."""
    return markdown.split(heading, 1)[1].split("\n## ", 1)[0]


def tables(markdown: str) -> list[list[list[str]]]:
    """Every table in ``markdown`` as rows of cells, the header row first (the separator row dropped)."""
    found: list[list[list[str]]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                found.append([])
            if not line.startswith("|---"):
                found[-1].append([cell.strip() for cell in line.strip("|").split(" | ")])
        previous = line
    return found


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the body rows of the first table after ``heading``."""
    return tables(part(markdown, heading))[0][1:]


def records(table: list[list[str]]) -> list[dict[str, str]]:
    head, *rows = table
    return [dict(zip(head, row)) for row in rows]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables, self.images = 0, []

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def html_tags(out: Path) -> Tags:
    parser = Tags()
    parser.feed((out / "report.html").read_text())
    parser.close()
    return parser


def assert_image(path: Path) -> None:
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0, f"{path.name} is blank"


# --------------------------------------------------------------------------- prune run


def test_prune_run_report(run_dir, capsys):
    before = snapshot(run_dir)
    assert main(["report", str(run_dir)]) == 0
    out = run_dir.parent / "run-report"  # default: a sibling of RUN
    assert f"wrote {out}" in capsys.readouterr().out
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "report.html", "report.md", "scores.png",
                                                     "widths.png"]

    summary, md = summary_of(run_dir), (out / "report.md").read_text()
    p = summary["parameters"]
    assert table_rows(md, "## Parameters") == [
        ["blocks", f"{p['blocks_before']:,}", f"{p['blocks_after']:,}", f"{100 * p['block_ratio_removed']:.2f}%"],
        ["model", f"{p['model_before']:,}", f"{p['model_after']:,}",
         f"{100 * (1 - p['model_after'] / p['model_before']):.2f}%"]]

    layers = summary["layers"]
    widths = table_rows(md, "## Kept widths per layer")
    assert [row[:4] for row in widths] == [
        [str(w["layer"]), *[f"{w['after'][k]} / {w['before'][k]}" for k in ("num_heads", "num_kv_heads",
                                                                             "intermediate_size")]]
        for w in layers]

    scores = load_file(str(run_dir / SCORES_FILE))
    rows = table_rows(md, "## Scores per layer")
    assert [row[0] for row in rows] == [str(w["layer"]) for w in layers]
    for row in rows:
        heads, channels = scores[f"layer{row[0]}.heads"], scores[f"layer{row[0]}.channels"]
        expected = [f(v) for v in (heads, channels) for f in (np.min, np.median, np.max)]
        assert [float(c) for c in row[1:]] == pytest.approx(expected, rel=1e-4)

    ppl = {row[0]: float(row[-1]) for row in table_rows(md, "## Perplexity")}
    assert ppl == pytest.approx({k: v["ppl"] for k, v in summary["perplexity"].items()}, rel=1e-4)

    tags = html_tags(out)
    assert tags.tables == 6  # settings, parameters, perplexity, widths, scores, phases
    assert sorted(tags.images) == ["scores.png", "widths.png"]
    for name in tags.images:
        assert_image(out / name)


# --------------------------------------------------------------------------- finetune, eval and speed


@pytest.fixture(scope="module")
def finetuned(run_dir, calib_text_file, tmp_path_factory) -> Path:
    """The prune run after 3 LoRA steps, with perplexity before and after."""
    out = tmp_path_factory.mktemp("finetune") / "finetuned"
    assert main(["finetune", str(run_dir), "--data", str(calib_text_file), "--out", str(out), "--seqlen", "16",
                 "--batch-size", "2", "--max-steps", "3", "--eval", str(calib_text_file), "--eval-seqlen", "16",
                 "--eval-max-tokens", "160"]) == 0
    return out


@pytest.fixture(scope="module")
def eval_dir(run_dir, calib_text_file, tmp_path_factory) -> Path:
    """Perplexity and zero-shot accuracy of the prune run."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    assert main(["eval", str(run_dir), "--ppl", str(calib_text_file), "--seqlen", "16", "--max-tokens", "160",
                 "--tasks", "tiny_words", "--include-path", str(TASKS), "--limit", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def speed_dir(tiny_model_dir, run_dir, tmp_path_factory) -> Path:
    """bench-speed of the dense tiny model and the prune run, one setting each."""
    out = tmp_path_factory.mktemp("speed") / "speed"
    settings = SpeedSettings(batch_sizes=[1], lengths=[8], decode_tokens=2, prompt_length=4, repeats=1, warmup=0)
    write_speed(bench_speed([str(tiny_model_dir), str(run_dir)], settings), out, overwrite=False)
    return out


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_distillation_section_shows_each_loss(finetuned, calib_text_file, tmp_path):
    """distill of the finetuned run (so both recovery sections): the KL, LM and block-output losses."""
    distilled = tmp_path / "distilled"
    assert main(["distill", str(finetuned), "--data", str(calib_text_file), "--out", str(distilled), "--seqlen", "16",
                 "--batch-size", "2", "--max-steps", "2", "--lm-weight", "0.5", "--hidden-weight", "0.1",
                 "--eval", "none"]) == 0
    out = run_report(distilled, tmp_path / "report")
    md = (out / "report.md").read_text()
    record = summary_of(distilled)["distill"]
    settings = dict(row[:2] for row in tables(part(md, "## Distillation"))[0][1:])
    assert {k: settings[k] for k in ("teacher.source", "objective.kl", "objective.lm", "objective.hidden")} == {
        "teacher.source": record["teacher"]["source"], "objective.kl": "1", "objective.lm": "0.5",
        "objective.hidden": "0.1"}
    assert "## Fine-tuning" in md and (out / "loss-finetune.png").is_file()
    assert "![distillation loss](loss-distill.png)" in md and (out / "loss-distill.png").is_file()
    assert set(record["loss_history"][0]) == {"step", "loss", "kl", "lm", "hidden"}


def test_speedups_pair_measured_with_mac_ratio(speed_dir):
    dense, pruned = read(speed_dir, SPEED_FILE)["models"]
    expected = {
        label: pytest.approx((e["tokens_per_s"] / d["tokens_per_s"], d["macs_per_token"]["total"]
                              / e["macs_per_token"]["total"]))
        for label, kind in (("prefill b1 L8", "prefill"), ("decode b1", "decode"))
        for e, d in zip(pruned[kind], dense[kind])}
    assert speedups(pruned) == expected
    assert speedups(dense) == {"prefill b1 L8": (1.0, 1.0), "decode b1": (1.0, 1.0)}


def test_finetune_eval_and_speed_sections(run_dir, tiny_model_dir, calib_text_file, finetuned, eval_dir, speed_dir,
                                          tmp_path):
    out = run_report(finetuned, tmp_path / "report", speed=speed_dir, evals=[eval_dir])
    md = (out / "report.md").read_text()

    record = summary_of(finetuned)["finetune"]
    finetune = part(md, "## Fine-tuning")
    settings_table, ppl_table, phases_table = tables(finetune)
    settings = dict(row[:2] for row in settings_table[1:])
    assert {k: settings[k] for k in ("steps", "lora.r", "lora.alpha", "learning_rate", "resumed_from")} == {
        "steps": "3", "lora.r": "8", "lora.alpha": "16", "learning_rate": "0.0002", "resumed_from": "-"}
    assert settings["data.examples"] == f"{record['data']['examples']:,}"
    assert settings["lora.targets"] == ", ".join(record["lora"]["targets"])
    assert settings["checksums"] == record["checksums"][0]
    assert not {"perplexity", "loss_history", "phases"} & {key.split(".")[0] for key in settings}
    stages = {row[0]: float(row[-1]) for row in ppl_table[1:]}
    assert stages == pytest.approx({k: v["ppl"] for k, v in record["perplexity"].items()}, rel=1e-4)
    assert list(stages) == ["before", "after"]
    assert "![fine-tuning loss](loss-finetune.png)" in finetune and (out / "loss-finetune.png").is_file()
    assert [row[0] for row in phases_table[1:]] == list(record["phases"])

    result = read(eval_dir, EVAL_FILE)
    evaluation = part(md, "## Evaluation")
    assert f"### {run_dir}" in evaluation
    ppl_table, task_table = tables(evaluation)
    [ppl] = records(ppl_table)
    assert ppl == {"dataset": str(calib_text_file), "split": "-", "seqlen": "16", "windows": "10",
                   "tokens": str(result["perplexity"][0]["tokens"]), "ppl": ppl["ppl"]}
    assert float(ppl["ppl"]) == pytest.approx(result["perplexity"][0]["ppl"], rel=1e-4)
    scores = result["zeroshot"]["tasks"]["tiny_words"]
    [task] = records(task_table)
    assert list(task) == ["task", *scores]
    assert (task["task"], task["n"], task["averaged"]) == ("tiny_words", "8", scores["averaged"])
    metrics = [k for k in scores if k not in ("n", "averaged")]
    assert [float(task[k]) for k in metrics] == pytest.approx([scores[k] for k in metrics], rel=1e-4)
    average = re.search(r"Average \((.+)\): \*\*(.+)\*\*", evaluation)
    assert average[1] == AVERAGED
    assert float(average[2]) == pytest.approx(result["zeroshot"]["average"], rel=1e-4)
    assert "Settings: num_fewshot 0, limit 8" in evaluation

    speed = read(speed_dir, SPEED_FILE)
    models_table, prefill_table, decode_table, settings_table = tables(part(md, "## Speed"))
    models = records(models_table)
    dense, pruned = speed["models"]
    assert [(m["model"], m["params"]) for m in models] == [(str(tiny_model_dir), f"{dense['params']:,}"),
                                                            (str(run_dir), f"{pruned['params']:,}")]
    assert [float(m["params ratio"]) for m in models] == pytest.approx([1, pruned["params"] / dense["params"]],
                                                                         rel=1e-4)
    setting = ["macs_per_token total", "ms median", "tokens_per_s", "mac_ratio", "speedup"]
    assert prefill_table[0] == ["model", "batch", "length", *setting]
    assert decode_table[0] == ["model", "batch", "prompt_length", "new_tokens", *setting]
    for kind, table, fields in (("prefill", prefill_table, ["batch", "length"]),
                                ("decode", decode_table, ["batch", "prompt_length", "new_tokens"])):
        rows, entries = records(table), [m[kind][0] for m in speed["models"]]
        assert [[row[k] for k in ["model", *fields]] for row in rows] == [
            [m["model"], *[str(e[k]) for k in fields]] for m, e in zip(speed["models"], entries)]
        measured = [[float(row[k].replace(",", "")) for k in ("ms median", "mac_ratio", "speedup")] for row in rows]
        assert measured == [pytest.approx([e["ms"]["median"], e["mac_ratio"], e["speedup"]], rel=1e-4)
                            for e in entries]
    settings = dict(settings_table[1:])
    assert (settings["batch_sizes"], settings["lengths"], settings["repeats"]) == ("1", "8", "1")
    assert settings["torch_threads"] == str(speed["torch_threads"])

    tags = html_tags(out)
    assert sorted(tags.images) == ["loss-finetune.png", "scores.png", "speed.png", "widths.png"]
    for name in tags.images:
        assert_image(out / name)


def test_eval_folder_alone(eval_dir, tmp_path):
    out = run_report(eval_dir, tmp_path / "report")
    md = (out / "report.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## Evaluation"]
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "report.html", "report.md"]
    assert html_tags(out).tables == 2


def test_html_keeps_names_as_text():
    page = to_html("# <i>run</i>\n\n| model |\n|---|\n| <script>x</script> |\n", "<run>")
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<title>&lt;run&gt;</title>" in page and "<td>" in page


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case, words", [
    ("missing", ["no such run folder"]),
    ("empty", ["holds none of", SUMMARY_FILE]),
    ("bad-eval", ["--eval", EVAL_FILE]),
    ("out-is-run", ["is the input"]),
    ("out-holds-run", ["holds the input"]),
])
def test_bad_input_fails_with_one_line(run_dir, tmp_path, capsys, case, words):
    run = {"missing": tmp_path / "nope", "empty": tmp_path / "empty"}.get(case, run_dir)
    (tmp_path / "empty").mkdir()
    args = ["report", str(run), "--out", str(tmp_path / "out"), "--overwrite"]
    if case == "bad-eval":
        args += ["--eval", str(tmp_path / "empty")]
    if case.startswith("out-"):
        args[3] = str(run_dir if case == "out-is-run" else run_dir.parent)
    before, listing = snapshot(run_dir), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llm-bip: error: "), err
    for word in words:
        assert word in err
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
