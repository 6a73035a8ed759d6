"""The one exception type the CLI turns into a one-line message."""


class PruneError(Exception):
    """A user-facing error: bad input, unsupported model, impossible budget."""
