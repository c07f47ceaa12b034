"""The evaluation report: eval/report.md, a self-contained eval/report.html, and a terminal table.

The input is the evaluation dict of a run (`models`, each with metrics, missing metrics, warnings and the
robustness, efficiency, explainability, fairness, adaptability and scorecard sections; `comparison`;
`review`), where any section may be absent. No library renders that dict, so the layout is ours; the rest
is not: numbers and Markdown are formatted with `seektune.report`'s helpers (the run report's), plots are
drawn on matplotlib's Agg canvas (no pyplot), the terminal table is a `rich` Table, and HTML text is
escaped with `html.escape` (model outputs are untrusted).

The report is first built as a list of blocks (headings, paragraphs, tables, images, examples), and the
Markdown and the HTML are two renderings of the same blocks, so both show the same cells. The HTML embeds
its plots as base64 data URIs and its CSS inline: one file that can be mailed, with nothing to fetch.
Every file is written atomically.

The parts: `report_blocks.py` (the blocks and their Markdown and HTML renderings), `report_cells.py` (the
evaluation dict read into cells), `report_sections.py` (the sections as blocks), `report_plots.py` (the
plots); this module writes the files and gives the run report's summary and the terminal table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seektune.evaluate.report_blocks import Block, Link, Paragraph, md_block, render_html, render_markdown
from seektune.evaluate.report_cells import (
    EVAL_DIR,
    headline,
    metric_names,
    metrics_table,
    model_sections,
    overall_cell,
)
from seektune.evaluate.report_plots import draw_plots
from seektune.evaluate.report_sections import document_blocks
from seektune.rundir import RunDir

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger(__name__)


def eval_markdown_section(evaluation: dict[str, Any], link_prefix: str = "eval/") -> list[str]:
    """The run report's summary of the evaluation: headline, metrics table, overall scores and links to the
    full report. No heading: it goes under the run report's own "## Evaluation"."""
    blocks: list[Block] = [Paragraph([headline(evaluation)])]
    if metric_names(evaluation):
        blocks += [metrics_table(evaluation), Paragraph(["↓ lower is better, ↑ higher is better."])]
    cards = model_sections(evaluation, "scorecard")
    if cards:
        scores = "; ".join(f"{name} {overall_cell(card).text}" for name, card in cards.items())
        blocks.append(Paragraph([f"Overall scorecard (0..1): {scores}."]))
    blocks.append(
        Paragraph(
            [
                "The full evaluation report, with every section and plot: ",
                Link(f"{link_prefix}report.md", f"{link_prefix}report.md"),
                ", or as one self-contained page: ",
                Link(f"{link_prefix}report.html", f"{link_prefix}report.html"),
                ".",
            ]
        )
    )
    lines: list[str] = []
    for block in blocks:
        lines += md_block(block, f"{link_prefix}plots/")
    return lines


def summary_table(evaluation: dict[str, Any]) -> Table:
    """Metrics as rows, models as columns, and the change with its verdict when two models were compared."""
    from rich.table import Table
    from rich.text import Text

    block = metrics_table(evaluation)
    table = Table(title="Evaluation", title_justify="left")
    for index, header in enumerate(block.header):
        table.add_column(header, justify="left" if block.align[index] == "l" else "right", overflow="fold")
    styles = {"better": "bold green", "worse": "bold red", "missing": "dim italic"}
    for row in block.rows:
        # Text, not markup: reasons and model names may hold [brackets] that rich would parse.
        table.add_row(*(Text(cell.text, style=styles.get(cell.tone or "", "")) for cell in row))
    return table


def write_eval_report(run: RunDir, evaluation: dict[str, Any]) -> dict[str, Path]:
    """Write eval/report.md, eval/report.html and eval/plots/*.png; returns {"markdown": .., "html": ..}."""
    plots = draw_plots(run, evaluation)
    blocks = document_blocks(evaluation, set(plots), run_ref=str(run.path))
    title = f"Evaluation: {run.path.name}"
    markdown = run.write_text(f"{EVAL_DIR}/report.md", render_markdown(title, blocks))
    images = {key: path.read_bytes() for key, path in plots.items()}
    page = run.write_text(f"{EVAL_DIR}/report.html", render_html(title, blocks, images))
    logger.info("evaluation report written to %s and %s", markdown, page)
    return {"markdown": markdown, "html": page}
