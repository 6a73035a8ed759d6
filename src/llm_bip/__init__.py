"""llm-bip: structured pruning of LLaMA-family models with block-wise forward importance propagation."""

from .config import PruneConfig
from .errors import PruneError
from .evaluation import perplexity
from .gguf_export import export_gguf
from .job import run_prune
from .loading import load_model, load_pruned
from .outputs import __version__, save_model
from .pipeline import run_prune_and_recover
from .pruner import PruneResult, prune
from .recovery import DistillConfig, FinetuneConfig, run_distill, run_finetune

__all__ = ["DistillConfig", "FinetuneConfig", "PruneConfig", "PruneError", "PruneResult", "__version__", "export_gguf",
           "load_model", "load_pruned", "perplexity", "prune", "run_distill", "run_finetune", "run_prune",
           "run_prune_and_recover", "save_model"]
