"""The report's markdown building blocks: table cells, tables of records and settings, sections, images."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .tables import markdown_table


def fmt(value: object) -> str:
    """A table cell: thousands separators for ints, five significant digits for small floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "-"
    if isinstance(value, dict):
        return fmt(json.dumps(value))
    return str(value).replace("|", "\\|")


def table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table of formatted cells."""
    return markdown_table(head, [[fmt(cell) for cell in row] for row in rows])


def is_scalar(value: object) -> bool:
    """Whether ``value`` fits one table cell."""
    return value is None or isinstance(value, (str, int, float))


def records_table(records: Sequence[dict]) -> str:
    """One row per record; columns: every scalar key, in order of first appearance."""
    columns = list(dict.fromkeys(k for r in records for k, v in r.items() if is_scalar(v)))
    return table(columns, [[r.get(c) for c in columns] for r in records])


def flatten(items: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of 'outer.inner' keys."""
    found = {}
    for key, value in items.items():
        if isinstance(value, dict):
            found.update(flatten(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def key_value_table(items: dict) -> str:
    """One row per (flattened) setting."""
    return table(["setting", "value"], list(flatten(items).items()))


def section(title: str, *parts: str) -> str:
    """A level-2 heading followed by the non-empty ``parts``."""
    return "\n\n".join([f"## {title}", *[p for p in parts if p]])


def image(name: str, alt: str) -> str:
    """A markdown image of a file in the report folder."""
    return f"![{alt}]({name})"
