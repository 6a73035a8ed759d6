"""Environment switches read at call time."""

import os

TRUE = {"1", "true", "yes", "on"}


def offline(*names: str) -> bool:
    """True when any of the given variables (e.g. HF_HUB_OFFLINE) is set to a true value."""
    return any(os.environ.get(n, "").strip().lower() in TRUE for n in names)
