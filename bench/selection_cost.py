"""What refit-aware selection's greedy costs as a projection widens (issue 22): one down_proj-shaped
projection (hidden x width, a random Gram of 4,096 calibration tokens), the whole greedy run to the last
channel, beside the refit's own Cholesky solve of the same Gram, float64 on this machine's CPU.

    python bench/selection_cost.py [--widths 1536,3072,6144] [--hidden 576]

Results: bench/results/selection_cost.json and .md.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_results import write_rows

from llm_bip.selection import greedy_removal


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return round(time.perf_counter() - start, 2)


def row(width: int, hidden: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(4096, width)
    gram = (x.T @ x).double()
    weight = torch.randn(hidden, width, dtype=torch.float64)
    units = torch.arange(width)[:, None]
    greedy = seconds(lambda: greedy_removal(weight, gram, units, torch.zeros(width)))
    eye = torch.eye(width, dtype=torch.float64)
    solve = seconds(lambda: torch.cholesky_solve(gram @ weight.T, torch.linalg.cholesky(gram + eye)))
    return {"width": width, "hidden": hidden, "greedy_s": greedy, "refit_solve_s": solve,
            "greedy_vs_solve": round(greedy / max(solve, 1e-3), 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1536,3072,6144")
    parser.add_argument("--hidden", type=int, default=576)
    args = parser.parse_args()
    rows = [row(int(w), args.hidden) for w in args.widths.split(",")]
    print(write_rows("selection_cost", rows, list(rows[0])))


if __name__ == "__main__":
    main()
