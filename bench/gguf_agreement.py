"""How exactly llama.cpp serves an exported model: a run exported at f32, then its next-token (top-1)
agreement with PyTorch, the largest logit difference and both perplexities over the whole PTB test split
(L = 128, llama.cpp's default f16 KV cache). Results: ``bench/results/gguf_agreement.json``.

    python bench/gguf_agreement.py runs/smollm2-bip-20 /tmp/smollm2-bip-20-f32.gguf
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_bip import load_model
from llm_bip.evaluation import text_windows
from llm_bip.gguf_export import run_export
from llm_bip.llamacpp import open_gguf, window_logits

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def agreement(run: str, gguf_file: Path, threads: int) -> dict:
    run_export(run, gguf_file, "f32", overwrite=True)
    model, tokenizer = load_model(run)
    windows = text_windows(tokenizer, "ptb", "test", 128, None)
    agree, largest, nll = 0, 0.0, {"pytorch": 0.0, "llama_cpp": 0.0}
    with open_gguf(gguf_file, context=128, threads=threads) as runner:
        for batch in windows.split(16):
            logits = {"pytorch": model(batch).logits.float(), "llama_cpp": window_logits(runner, batch)}
            agree += int((logits["pytorch"].argmax(-1) == logits["llama_cpp"].argmax(-1)).sum())
            largest = max(largest, float((logits["pytorch"] - logits["llama_cpp"]).abs().max()))
            for engine, values in logits.items():
                nll[engine] += float(F.cross_entropy(values[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                     reduction="sum"))
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return {"run": run, "windows": windows.shape[0], "positions": windows.numel(),
            "top1_agreement": agree / windows.numel(), "max_abs_logit_difference": largest,
            **{f"{engine}_ppl": math.exp(value / scored) for engine, value in nll.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a prune output folder (or any model llm-bip loads)")
    parser.add_argument("gguf", type=Path, help="where to write its f32 GGUF file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = agreement(args.run, args.gguf, args.threads)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_agreement.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
