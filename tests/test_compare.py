"""The compare command end to end on a tiny model (the full table is a benchmark, not a test)."""

import copy
import json
from dataclasses import replace

import pytest

from llm_bip.cli import main
from llm_bip.compare import CompareSpec, compare_models, parse_method
from llm_bip.errors import PruneError
from llm_bip.evaluation import perplexity
from llm_bip.loading import load_model
from llm_bip.pruner import PruneConfig, Pruner
from llm_bip.selfcalib import calibration_batch
from llm_bip.testing import calibration_text


def test_compare_end_to_end(tiny_model_dir, calib_text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", str(tiny_model_dir), "--out", str(out), "--methods",
               "bip,random,wanda-sp,flap,llm-pruner:keep_dense=,bip:allocation=global;sequential=true",
               "--ratios", "0.2,0.4", "--seqlens", "16,32", "--ppl", str(calib_text_file),
               "--calibration", str(calib_text_file), "--samples", "4", "--calib-seqlen", "16", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["method"] for r in rows][:3] == ["dense", "bip", "bip"]
    assert len(rows) == 1 + 6 * 2
    for r in rows:
        assert set(r["ppl"]) == {f"{calib_text_file}@16", f"{calib_text_file}@32"}
        assert all(v["ppl"] > 1 for v in r["ppl"].values())
    for r in rows[1:]:
        assert r["block_ratio"] == pytest.approx(r["ratio"], abs=0.03)
        assert r["prune_wall_s"] > 0 and r["prune_peak_rss_mb"] > 0
        floor = results["calibrations"][0]["floor_forward"]["wall_s"]
        assert r["time_vs_forward"] == pytest.approx(r["prune_wall_s"] / floor, rel=0.2, abs=0.1)
    assert rows[-1]["config"]["sequential"] is True and rows[-1]["config"]["allocation"] == "global"
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 - 1  # header + rows (separator starts with '|-')
    assert (out / "ppl_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"


def test_method_specs():
    label, config = parse_method("bip:allocation=global,compensate=true,keep_dense=0/-1", PruneConfig())
    assert label.startswith("bip:") and config.allocation == "global" and config.compensate is True
    assert config.keep_dense == [0, -1]
    with pytest.raises(PruneError, match="bad method option"):
        parse_method("bip:colour=red", PruneConfig())


def test_compare_rejects_unknown_method_before_loading(tmp_path, capsys):
    assert main(["compare", "does-not-matter", "--out", str(tmp_path / "x"), "--methods", "bip,nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,words", [
    ("--ratios", "0.2,1.5", ["ratio", "1.5"]),
    ("--ratios", "0.2,x", ["--ratios", "fractions"]),
    ("--methods", "bip:lipschitz=huge", ["lipschitz", "huge"]),
    ("--seqlens", "128,0", ["--seqlens", "positive"]),
])
def test_compare_checks_every_option_before_loading(tmp_path, capsys, option, value, words):
    argv = ["compare", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x"), option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "no-such-model" not in err, err


def test_each_method_prunes_on_its_own_calibration(tiny_model_dir, calib_text_file, tmp_path):
    """A row that names its own calibration is pruned on that batch (built once, timed once) and says so."""
    other = tmp_path / "other.txt"
    other.write_text(calibration_text(seed=1))
    model, tokenizer = load_model(str(tiny_model_dir))
    base = PruneConfig(calibration=str(calib_text_file), n_samples=4, seqlen=16, batch_size=2)
    spec = CompareSpec(methods=["bip", f"bip:calibration={other}", f"flap:calibration={other}"], ratios=[0.3],
                       seqlens=[16], datasets=[str(calib_text_file)], base=base)
    results = compare_models(model, tokenizer, spec)
    assert [c["calibration"] for c in results["calibrations"]] == [str(calib_text_file), str(other)]
    assert all(c["tokens"] == 4 * 16 for c in results["calibrations"])
    rows = results["rows"][1:]
    assert [r["config"]["calibration"] for r in rows] == [str(calib_text_file), str(other), str(other)]
    direct = copy.deepcopy(model)
    config = replace(base, calibration=str(other), ratio=0.3)
    Pruner(direct, config).run(calibration_batch(model, tokenizer, config))
    expected = perplexity(direct, tokenizer, str(calib_text_file), "test", 16).ppl
    assert rows[1]["ppl"][f"{calib_text_file}@16"]["ppl"] == expected
    assert rows[0]["ppl"][f"{calib_text_file}@16"]["ppl"] != expected


def test_compare_checks_every_methods_calibration_before_loading(tmp_path, capsys):
    argv = ["compare", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x"),
            "--methods", f"bip,flap:calibration={tmp_path / 'missing.txt'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "no-such-model" not in err, err
