"""The evaluation report's document: blocks (headings, paragraphs, tables, bullets, images, examples) and
their two renderings, Markdown and HTML.

The report is first built as a list of blocks, and the Markdown and the HTML are two renderings of the same
blocks, so both show the same cells. Markdown text is escaped and its tables laid out with
`seektune.report`'s helpers (the run report's); HTML text is escaped with `html.escape` (model outputs are
untrusted). The HTML embeds its plots as base64 data URIs and its CSS inline: one file that can be mailed,
with nothing to fetch. No library renders both from one description of the page, so the blocks are ours.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from seektune.report import _md_escape, _table


@dataclass(frozen=True)
class Code:
    """Inline code."""

    text: str


@dataclass(frozen=True)
class Link:
    """An inline link."""

    text: str
    href: str


Inline = str | Code | Link


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, and the tone it is shown in."""

    text: str
    tone: str | None = None  # "better", "worse" (a verdict) or "missing"


@dataclass
class Heading:
    """A section heading (level 2 or 3; the title is level 1)."""

    level: int
    text: str


@dataclass
class Paragraph:
    """A paragraph of inline parts."""

    parts: list[Inline]
    role: str | None = None  # "headline" or "note" (HTML styling only)


@dataclass
class TableBlock:
    """A table of cells under a header row."""

    header: list[str]
    rows: list[list[Cell]]
    align: str  # one letter per column: "l" or "r"


@dataclass
class Bullets:
    """A bullet list, each item inline parts."""

    items: list[list[Inline]]


@dataclass
class Image:
    """A drawn plot: linked from the Markdown, embedded in the HTML."""

    plot: str  # key of the drawn plot (file eval/plots/<plot>.png)
    alt: str


@dataclass
class Example:
    """A titled example of labelled texts (model outputs, prompts: untrusted)."""

    title: str
    fields: list[tuple[str, str]] = field(default_factory=list)  # (label, untrusted text)


Block = Heading | Paragraph | TableBlock | Bullets | Image | Example

# ---------------------------------------------------------------------------------------------------------
# Markdown


def _md_inline(parts: Iterable[Inline]) -> str:
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(f"`{part.text.replace('`', '')}`")
        elif isinstance(part, Link):
            out.append(f"[{_md_escape(part.text)}]({part.href})")
        else:
            out.append(_md_escape(part))
    return "".join(out)


def md_block(block: Block, plot_link: str) -> list[str]:
    """The Markdown lines of one block, plots linked under `plot_link`."""
    if isinstance(block, Heading):
        return ["#" * block.level + " " + _md_escape(block.text), ""]
    if isinstance(block, Paragraph):
        return [_md_inline(block.parts), ""]
    if isinstance(block, TableBlock):
        rows = [[_md_escape(c.text) for c in row] for row in block.rows]
        return [*_table([_md_escape(h) for h in block.header], rows, block.align), ""]
    if isinstance(block, Bullets):
        return [*(f"- {_md_inline(item)}" for item in block.items), ""]
    if isinstance(block, Image):
        return [f"![{_md_escape(block.alt)}]({plot_link}{block.plot}.png)", ""]
    lines = [f"**{_md_escape(block.title)}**", ""]
    return [*lines, *(f"- {_md_escape(label)}: {_md_escape(text)}" for label, text in block.fields), ""]


def render_markdown(title: str, blocks: list[Block], plot_link: str = "plots/") -> str:
    """eval/report.md: the blocks as Markdown, plots linked relative to the report."""
    lines = [f"# {_md_escape(title)}", ""]
    for block in blocks:
        lines += md_block(block, plot_link)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans",
  "Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei",
  sans-serif; color: #1f2328; background: #fff; line-height: 1.5;
  max-width: 1040px; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.6rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .5rem; }
p { margin: .5rem 0; }
.headline { font-size: 1.1rem; background: #eef5ff; border-left: 4px solid #0969da; padding: .75rem 1rem;
  border-radius: 0 6px 6px 0; }
.note { color: #59636e; font-size: .9rem; }
.table-wrap { overflow-x: auto; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .92rem; }
th, td { padding: .4rem .7rem; border-bottom: 1px solid #d8dee4; vertical-align: top; text-align: left; }
th { background: #f0f3f6; font-weight: 600; }
tbody tr:nth-child(even) { background: #f6f8fa; }
.r { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
td.missing { width: 13rem; }  /* a long reason wraps instead of squeezing the other columns */
.better { color: #116329; font-weight: 600; }
.worse { color: #b42318; font-weight: 600; }
.missing { color: #6e7781; font-style: italic; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em;
  background: #f0f3f6; padding: .1em .35em; border-radius: 4px; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 6px; }
ul { padding-left: 1.3rem; }
.example { border: 1px solid #d8dee4; border-radius: 6px; padding: .4rem 1rem .6rem; margin: .8rem 0; }
.example h4 { margin: .4rem 0; font-size: .98rem; }
.example dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem .9rem; margin: 0; }
.example dt { font-weight: 600; color: #59636e; }
.example dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
footer { margin-top: 2.5rem; color: #6e7781; font-size: .85rem; }
"""


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _html_inline(parts: Iterable[Inline]) -> str:
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(f"<code>{_esc(part.text)}</code>")
        elif isinstance(part, Link):
            out.append(f'<a href="{_esc(part.href)}">{_esc(part.text)}</a>')
        else:
            out.append(_esc(part))
    return "".join(out)


def _html_cell(tag: str, text: str, classes: list[str]) -> str:
    names = " ".join(c for c in classes if c)
    return f'<{tag} class="{names}">{_esc(text)}</{tag}>' if names else f"<{tag}>{_esc(text)}</{tag}>"


def _html_table(block: TableBlock) -> str:
    align = ["r" if a == "r" else "" for a in block.align]
    head = "".join(_html_cell("th", h, [a]) for h, a in zip(block.header, align, strict=False))
    body = "".join(
        "<tr>"
        + "".join(_html_cell("td", c.text, [a, c.tone or ""]) for c, a in zip(row, align, strict=False))
        + "</tr>"
        for row in block.rows
    )
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_esc(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        role = f' class="{block.role}"' if block.role else ""
        return f"<p{role}>{_html_inline(block.parts)}</p>"
    if isinstance(block, TableBlock):
        return _html_table(block)
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Image):
        data = base64.b64encode(images.get(block.plot, b"")).decode("ascii")
        return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(block.alt)}"></figure>'
    fields = "".join(f"<dt>{_esc(label)}</dt><dd>{_esc(text)}</dd>" for label, text in block.fields)
    return f'<div class="example"><h4>{_esc(block.title)}</h4><dl>{fields}</dl></div>'


def render_html(title: str, blocks: list[Block], images: dict[str, bytes]) -> str:
    """eval/report.html: the blocks as one self-contained page (inline CSS, images as data URIs)."""
    body = "\n".join(_html_block(block, images) for block in blocks)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_esc(title)}</h1>\n{body}\n</main>\n"
        "<footer>Written by seektune. The page is self-contained: it loads nothing from elsewhere.</footer>\n"
        "</body>\n</html>\n"
    )
