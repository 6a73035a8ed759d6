"""Run report: a prune / finetune / distill / eval run folder as markdown and HTML, with tables and PNG plots.

Every section is optional: a section appears when the run (or an extra eval / speed folder)
holds its data. The report goes to its own folder, written atomically; the run is only read.
Reading the run is report_data.py; the sections, their markdown parts and plots are report_sections.py,
report_format.py and report_plots.py; here they are put together as report.md and report.html.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from markdown_it import MarkdownIt

from .outputs import atomic_folder, check_output_folder
from .report_data import RunData, load_run
from .report_sections import (
    RECOVERY_SECTIONS,
    eval_section,
    parameters_section,
    perplexity_section,
    phases_section,
    recovery_section,
    scores_section,
    settings_section,
    speed_section,
    versions_line,
    widths_section,
)

REPORT_MD, REPORT_HTML = "report.md", "report.html"
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def report_markdown(data: RunData, out: Path) -> str:
    """The report's markdown; plots are written into ``out`` as a side effect."""
    summary = data.summary
    parts = [f"# llm-bip report: {data.name}", settings_section(summary), parameters_section(summary),
             perplexity_section(summary), widths_section(summary, out), scores_section(data.scores, out),
             *(recovery_section(name, summary.get(name, {}), out) for name in RECOVERY_SECTIONS),
             eval_section(data.evals),
             speed_section(data.speed, out), phases_section(summary), versions_line(summary)]
    return "\n\n".join(p for p in parts if p) + "\n"


def to_html(markdown_text: str, title: str) -> str:
    """The report's markdown as a standalone HTML page (raw HTML in the markdown stays text)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)  # names stay text
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}</body></html>\n")


def default_out(run: Path) -> Path:
    """``<RUN>-report`` beside the run folder."""
    run = run.resolve()
    return run.parent / f"{run.name}-report"


def run_report(run: Path, out: Path | None = None, speed: Path | None = None, evals: Sequence[Path] = (),
               overwrite: bool = False) -> Path:
    """The report job (``llm-bip report``): report.md, report.html and the plots of a run, written atomically.

    Args:
        run: a folder that ``prune``, ``finetune``, ``distill`` or ``eval`` wrote.
        out: the report folder (default: ``<RUN>-report``); never an input.
        speed: a ``bench-speed`` folder to add.
        evals: ``eval`` folders to add.
        overwrite: replace an existing ``out``.

    Returns:
        The report folder.
    """
    run = Path(run)
    data = load_run(run, speed, [Path(p) for p in evals])
    out = Path(out) if out is not None else default_out(run)
    check_output_folder(out, overwrite, inputs=[run, *([speed] if speed else []), *evals])
    with atomic_folder(out, overwrite) as tmp:
        text = report_markdown(data, tmp)
        (tmp / REPORT_MD).write_text(text)
        (tmp / REPORT_HTML).write_text(to_html(text, f"llm-bip report: {data.name}"))
    return out
