"""llm-bip's one progress channel: Python ``logging`` under the ``llm_bip`` logger.

Every module logs through ``logging.getLogger(__name__)``: progress lines at INFO, notes (slow settings,
choices made for the user) at WARNING. One handler sits on the ``llm_bip`` logger from the first import,
so a library call shows its notes on stderr even where the root logger has handlers (pytest's, an
application's) and Python's last-resort handler stays silent; INFO lines are dropped there, as the
logger's level is left to the application. ``console_output`` (what the CLI runs its commands in, and
what a script may use to see the same lines) turns the handler into the console's: INFO lines to
stdout, notes to stderr after ``llm-bip: note: ``. Both streams are looked up when a line is written, so
a swapped ``sys.stdout`` (pytest's capsys) gets it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER_NAME = "llm_bip"
NOTE_PREFIX = "llm-bip: note: "


class ConsoleHandler(logging.Handler):
    """Notes to ``sys.stderr``; with ``console`` set, INFO lines to ``sys.stdout`` too and notes prefixed."""

    def __init__(self) -> None:
        super().__init__()
        self.console = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not self.console:
            return  # a library call's progress: the application's handlers decide
        try:
            note = record.levelno >= logging.WARNING
            stream = sys.stderr if note else sys.stdout
            stream.write(f"{NOTE_PREFIX if note and self.console else ''}{self.format(record)}\n")
            stream.flush()  # long runs are often logged to a file: each line as it comes
        except Exception:
            self.handleError(record)


def console_handler() -> ConsoleHandler:
    """The handler on the ``llm_bip`` logger, added on first use: one per process, however often called."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler
    handler = ConsoleHandler()
    logger.addHandler(handler)
    return handler


@contextmanager
def console_output() -> Iterator[None]:
    """Inside: llm-bip's progress lines on stdout and its notes on stderr (``llm-bip: note: ...``), as the CLI
    prints them, and nowhere else (not propagated to the root logger's handlers); restored afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = console_handler()
    before = handler.console, logger.level, logger.propagate
    handler.console, logger.propagate = True, False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.console, logger.propagate = before[0], before[2]
        logger.setLevel(before[1])


console_handler()  # library calls show their notes from the first import of llm_bip
