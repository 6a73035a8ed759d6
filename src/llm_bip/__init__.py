"""llm-bip: structured pruning of LLaMA-family models with block-wise forward importance propagation."""

__version__ = "0.1.0"

from .checkpoint import load_model, load_pruned, save_model  # noqa: E402
from .errors import PruneError  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .pruner import PruneConfig, PruneResult, prune  # noqa: E402

__all__ = ["PruneConfig", "PruneError", "PruneResult", "load_model", "load_pruned", "perplexity", "prune", "save_model"]
