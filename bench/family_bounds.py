"""How tight the LLM-BIP scores are on every family, against brute-force removal of every unit.

For tiny random models of each family (src/llm_bip/testing.py: the conformance suite's models), block 2 of 3
in float64: every FFN channel and every query head is removed alone and the block output's change
||y - y'||_F measured. Reported per variant: change / score for the default FFN channel score and the
certified head bound (1 = exact; <= 1 = a bound), and Spearman's rank correlation of score and change
(how well the score orders the units, which is what pruning uses), next to the same correlation for the
score that ignores an FFN output norm (``unscaled``: ||a_j|| ||W_D[:, j]||, what a Llama-only tool computes). Writes
bench/results/family_bounds.{json,md}. The models are the tests' (llm_bip.testing):

    python bench/family_bounds.py
"""

from __future__ import annotations

import torch
from bench_results import write_rows

from llm_bip.metrics import ScoreOptions, make_metric
from llm_bip.surgery import head_channels
from llm_bip.testing import VARIANTS, block_setup, output_change


def ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def measure(variant: str) -> dict:
    view, inputs, stats, y = block_setup(variant, layer=2, layers=3)  # the conformance suite's block
    channels = make_metric("bip", ScoreOptions()).score(view, stats, view.index).channels
    channel_change = torch.tensor([output_change(view, inputs, y, view.down.weight, [j])
                                   for j in range(view.widths.intermediate_size)], dtype=torch.float64)
    unscaled = stats.ffn_norms() * view.down.weight.detach().double().norm(dim=0)
    row = {"variant": variant, "family": VARIANTS[variant][0], "output_norms": view.ffn_out_norm is not None,
           **summary("ffn", channel_change / channels), "ffn_spearman": spearman(channels, channel_change),
           "ffn_spearman_unscaled": spearman(unscaled, channel_change)}
    if view.mlp_norm is None:  # OLMo 2: no certified head bound (and no head is removed)
        return row
    heads = make_metric("bip", ScoreOptions(lipschitz="certified")).score(view, stats, view.index).heads
    head_change = torch.tensor([output_change(view, inputs, y, view.o.weight, head_channels([h], view.head_dim))
                                for h in range(view.widths.num_heads)], dtype=torch.float64)
    return {**row, **summary("head", head_change / heads), "head_spearman": spearman(heads, head_change)}


def summary(kind: str, ratios: torch.Tensor) -> dict:
    return {f"{kind}_ratio_min": float(ratios.min()), f"{kind}_ratio_median": float(ratios.median()),
            f"{kind}_ratio_max": float(ratios.max())}


def main() -> None:
    rows = [measure(v) for v in sorted(VARIANTS)]
    columns = ["variant", "output_norms", "ffn_ratio_min", "ffn_ratio_max", "ffn_spearman", "ffn_spearman_unscaled",
               "head_ratio_min",
               "head_ratio_median", "head_ratio_max", "head_spearman"]
    print(write_rows("family_bounds", rows, columns))


if __name__ == "__main__":
    main()
