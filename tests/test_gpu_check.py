"""bench/gpu_check (issue 24): its logic on a tiny model on the CPU, the script's clean skip without CUDA, and the
tiny check on CUDA where there is one (skipped otherwise). The full check is a benchmark: bash bench/gpu_check.sh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


def dry_run(gpu_check, work: Path, *options: str) -> tuple[int, list[dict]]:
    """(the exit status, the rows written) of a dry run in ``work``."""
    status = gpu_check.main(["--dry-run", "--work", str(work), *options])
    return status, json.loads((work / "gpu_check.json").read_text())


def test_dry_run_compares_runs_with_the_reference(gpu_check, tmp_path):
    status, rows = dry_run(gpu_check, tmp_path, "--dtype", "float32")
    assert status == 0
    assert [row["run"] for row in rows] == ["reference: cpu float32", "cpu float32", "cpu float32 --offload"]
    for row in rows:  # the same device and dtype: the same units and logits as the reference
        assert row["pass"] and row["layers_same"] == "3/3" and row["channels_same"] == 1.0
        assert row["logit_rel_diff"] < 1e-5 and row["twin"] == "reference"
        assert row["scoring_s"] > 0 and row["refit_s"] > 0 and row["forward_s"] > 0


def test_kept_units_are_read_from_the_written_rows(gpu_check, tmp_path):
    gpu_check.write_model(tmp_path, gpu_check.TINY)
    dense = gpu_check.fingerprints(tmp_path, 3, 8)
    pruned = [{kind: rows[::2] for kind, rows in block.items()} for block in dense]  # every other unit kept
    kept = gpu_check.kept_units(dense, pruned)
    assert kept[0]["heads"] == {0, 2, 4} and kept[2]["channels"] == set(range(0, 64, 2))
    row = gpu_check.unit_agreement(kept, gpu_check.kept_units(dense, dense))
    assert row["channels_same"] == 0.5 and row["widths_same"] == "0/3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_script_skips_cleanly_without_cuda():
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: skipped: no CUDA") and len(done.stdout.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dry_run_on_cuda_in_bfloat16(gpu_check, tmp_path):
    status, rows = dry_run(gpu_check, tmp_path, "--device", "cuda")  # a tiny model may miss the thresholds
    assert [row["run"] for row in rows] == ["reference: cpu float32", "cuda bfloat16", "cuda bfloat16 --offload"]
    assert all(row["peak_cuda_mb"] > 0 for row in rows[1:]) and rows[2]["offload"]
    assert status == int(not all(row["pass"] for row in rows))
