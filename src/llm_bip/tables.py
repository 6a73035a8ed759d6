"""Markdown tables, shared by every command that writes one."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(head: Sequence, rows: Sequence[Sequence]) -> str:
    """A pipe table: a header row, a separator row, one line per row; every cell is str()-ed."""
    lines = [head, *rows]
    text = ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join([text[0], "|" + "---|" * len(head), *text[1:]])
