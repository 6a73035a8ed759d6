"""run_prune, the prune job as a library call: the perplexity hook, progress lines and summary."""

from __future__ import annotations

import json
import logging

from llm_bip import PruneConfig, run_prune
from llm_bip.evaluation import Perplexity
from llm_bip.outputs import SUMMARY_FILE


def test_dense_and_pruned_perplexity_go_through_the_hook(tiny_model_dir, calib_text_file, tmp_path, caplog):
    calls = []

    def measure(model, tokenizer, dataset, split, seqlen, max_tokens):
        calls.append((sum(p.numel() for p in model.parameters()), dataset, split, seqlen, max_tokens))
        return Perplexity(dataset, split, seqlen, windows=1, tokens=10, ppl=40.0 + len(calls))

    config = PruneConfig(calibration=str(calib_text_file), n_samples=4, seqlen=16)
    with caplog.at_level(logging.INFO, logger="llm_bip"):
        summary = run_prune(str(tiny_model_dir), tmp_path / "out", config, eval_dataset="ptb", eval_seqlen=16,
                            eval_max_tokens=100, measure=measure)
    lines = [record.getMessage() for record in caplog.records if record.name == "llm_bip.job"]
    assert [call[1:] for call in calls] == [("ptb", "test", 16, 100)] * 2
    assert calls[0][0] == summary["parameters"]["model_before"] and calls[1][0] == summary["parameters"]["model_after"]
    assert lines == ["dense:  ptb/test perplexity 41.000 (L=16, 1 windows, 10 tokens scored)",
                     "pruned: ptb/test perplexity 42.000 (L=16, 1 windows, 10 tokens scored)"]
    assert summary["perplexity"]["pruned"]["ppl"] == 42.0 and not summary["offload"]
    assert {"load", "eval_dense", "scoring", "reconstruction", "eval_pruned"} <= set(summary["phases"])
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()) == summary
