"""llm-bip: structured pruning of decoder LLMs with block-wise forward importance propagation.

One job per command: ``run_prune``, ``run_eval``, ``run_compare``, ``run_finetune``, ``run_distill``,
``run_prune_and_recover``, ``run_export``, ``run_bench_speed``, ``run_report``. Progress goes to the
``llm_bip`` logger (``logs.console_output`` prints it as the CLI does)."""

from .compare import CompareSpec, run_compare
from .config import PruneConfig, PrunePlan
from .errors import PruneError
from .eval_job import EvalConfig, run_eval
from .evaluation import perplexity
from .gguf_export import run_export
from .job import run_prune
from .loading import load_model, load_pruned
from .outputs import __version__, save_model
from .pipeline import run_prune_and_recover
from .pruner import PruneResult, prune
from .recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune
from .report import run_report
from .speed import SpeedSettings, run_bench_speed

__all__ = ["CompareSpec", "DistillConfig", "EvalConfig", "FinetuneConfig", "PruneConfig", "PruneError", "PrunePlan",
           "PruneResult", "SpeedSettings", "__version__", "load_model", "load_pruned", "perplexity", "prune",
           "run_bench_speed", "run_compare", "run_distill", "run_eval", "run_export", "run_finetune", "run_prune",
           "run_prune_and_recover", "run_report", "save_model"]
