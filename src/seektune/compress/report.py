"""`compress/report.md`: what each compression step did, how its check went, and the before/after table.

The same pieces go into the run's report.md (`compress_markdown_section`), shorter.
"""

from __future__ import annotations

from typing import Any

from seektune.report import _fmt_num, _md_escape

_CHECK_FIGURES = (
    ("max_logit_diff", "largest logit difference"),
    ("perplexity_change", "perplexity change"),
    ("greedy_agreement", "greedy agreement (teacher-forced)"),
    ("exact_match", "identical greedy answers"),
    ("eos_rate_drop", "fall of the EOS rate"),
)


def _headline(results: dict[str, Any]) -> str:
    steps = [s["step"] for s in results.get("steps", [])]
    if results.get("status") == "failed":
        failed = steps[-1] if steps else "?"
        return (
            f"**The chain stopped at {failed}**: its result failed the check below and was set aside "
            "(`.rejected`); no compressed model was produced."
        )
    return f"Steps {' → '.join(steps) or 'none'}; the compressed model is `{results.get('final_model')}`."


def _check_lines(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    figures = check.get("figures") or {}
    parts = [f"{label} {_fmt_num(figures[key])}" for key, label in _CHECK_FIGURES if key in figures]
    verdict = "passed" if check.get("passed") else "**failed**"
    lines = [f"- Check {verdict}: {', '.join(parts) or 'no figures'}."]
    lines += [f"  - {_md_escape(reason)}" for reason in check.get("failures") or []]
    return lines


def _details_line(details: dict[str, Any]) -> str | None:
    shown = {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool)) and v is not None}
    if not shown:
        return None
    return "- " + "; ".join(f"{k.replace('_', ' ')}: {_fmt_num(v)}" for k, v in shown.items()) + "."


def _steps_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for step in results.get("steps", []):
        lines += [f"### {step['step']}", "", f"- Output: `{step.get('rejected_as') or step['model_dir']}`."]
        lines += [f"- File: `{f}`." for f in step.get("files") or []]
        details = _details_line(step.get("details") or {})
        if details:
            lines.append(details)
        lines += _check_lines(step.get("check"))
        lines.append("")
    return lines


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    from seektune.compress.table import before_after_markdown

    return [before_after_markdown(rows), ""]


def render_compress_report(results: dict[str, Any]) -> str:
    """The Markdown of compress/report.md from the chain's results (compress/results.json)."""
    lines = ["# Compression", "", _headline(results), "", f"Source: `{results.get('source')}`.", ""]
    rows = results.get("table") or []
    if rows:
        lines += ["## Before and after", "", *_table_lines(rows)]
    lines += ["## Steps", "", *_steps_section(results)]
    problems = results.get("vllm_problems") or []
    if results.get("final_model"):
        if problems:
            lines += ["## Serving with vLLM", "", "vLLM would not load the final folder as it is:", ""]
            lines += [f"- {_md_escape(p)}" for p in problems] + [""]
        else:
            lines += ["The final folder is a plain Hugging Face checkpoint (transformers, vLLM).", ""]
    return "\n".join(lines).rstrip() + "\n"


def compress_markdown_section(results: dict[str, Any]) -> list[str]:
    """The run report's section: headline, the table and a link to compress/report.md."""
    lines = ["## Compression", "", _headline(results), ""]
    lines += _table_lines(results.get("table") or [])
    lines += ["Every step, its check and its details: [compress/report.md](compress/report.md).", ""]
    return lines


def compress_table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the console table the CLI prints: model, size MB, ms/token, perplexity."""
    rows = []
    for row in results.get("table") or []:
        rows.append(
            [
                str(row.get("label")),
                _fmt_num(row.get("size_on_disk_mb")),
                _fmt_num(row.get("ms_per_token")),
                _fmt_num(row.get("perplexity")),
            ]
        )
    return rows
