"""What a top-k teacher cache loses (issue 21): on training windows, the distillation loss and its gradient
from the teacher's k most likely tokens plus one bucket for the rest (what `--teacher-cache` stores),
against the full distribution, for several k; and the cache's size per training token.

    python bench/teacher_cache_topk.py RUNS/bip-20 [--windows 32] [--ks 1,8,32,64,256,1024]

Results: bench/results/teacher_cache_topk.json and .md.
"""

from __future__ import annotations

import argparse

import torch
from bench_results import write_rows

from llm_bip.loading import load_model
from llm_bip.losses import kl_sum, predicting, top_k
from llm_bip.training_data import build_training_data, read_data

BYTES_PER_ENTRY = 4 + 4  # an int32 token id and a float32 log-probability


def loss_and_gradient(student_logits: torch.Tensor, teacher, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The summed KL and its gradient with respect to the student's logits."""
    logits = student_logits.detach().requires_grad_(True)
    loss = kl_sum(logits, teacher, mask)
    loss.backward()
    return float(loss.detach()), logits.grad.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--data", default="warpeace")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ks", default="1,8,32,64,256,1024")
    args = parser.parse_args()
    student, tokenizer = load_model(args.student)
    teacher, _ = load_model(args.teacher)
    examples = build_training_data(tokenizer, read_data(args.data), args.seqlen, 0, limit=args.windows).examples
    rows = {int(k): {"k": int(k), "kl": 0.0, "dot": 0.0, "norm": 0.0} for k in args.ks.split(",")}
    full_kl, full_norm, positions = 0.0, 0.0, 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        mask = predicting(ids)
        with torch.no_grad():
            s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
        kl, grad = loss_and_gradient(s, t, mask)
        full_kl, full_norm, positions = full_kl + kl, full_norm + float(grad.pow(2).sum()), positions + int(mask.sum())
        for k, row in rows.items():
            kl_k, grad_k = loss_and_gradient(s, top_k(t, k), mask)
            row["kl"] += kl_k
            row["dot"] += float(grad_k @ grad)
            row["norm"] += float(grad_k.pow(2).sum())
        del s, t
    vocab = teacher.config.vocab_size
    results = [{"k": "full", "kl_per_token": full_kl / positions, "kl_share": 1.0, "gradient_cosine": 1.0,
                "gradient_norm_ratio": 1.0,
                "mib_per_1M_tokens": vocab * 4 / 2**20 * 1e6}]
    for k, row in rows.items():
        results.append({"k": k, "kl_per_token": row["kl"] / positions, "kl_share": row["kl"] / full_kl,
                        "gradient_cosine": row["dot"] / (row["norm"] * full_norm) ** 0.5,
                        "gradient_norm_ratio": (row["norm"] / full_norm) ** 0.5,
                        "mib_per_1M_tokens": (k * BYTES_PER_ENTRY + 4) / 2**20 * 1e6})
    print(f"{args.windows} windows of {args.seqlen} tokens, {positions} positions; vocabulary {vocab}")
    print(write_rows("teacher_cache_topk", results, ["k", "kl_per_token", "kl_share", "gradient_cosine",
                                                     "gradient_norm_ratio", "mib_per_1M_tokens"]))


if __name__ == "__main__":
    main()
