"""Writing a benchmark's rows: bench/results/NAME.json (every field) and NAME.md (the chosen columns)."""

from __future__ import annotations

import json
from pathlib import Path

from llm_bip.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def write_rows(name: str, rows: list[dict], columns: list[str], folder: Path = RESULTS) -> str:
    """Write the rows (to bench/results unless ``folder`` says otherwise) and return the markdown table (absent
    fields as '-', floats to 3 significant digits)."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown_table(columns, [[_cell(row.get(c)) for c in columns] for row in rows])
    (folder / f"{name}.md").write_text(table + "\n")
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
