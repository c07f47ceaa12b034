"""The evaluation dict read for its report: the models and sections it holds, its metrics in order, and the
cells shown for them (a metric's value or why it is missing, the paired-bootstrap change with its verdict,
the metrics table, the headline, the overall scorecard score).

The report's sections, its plots, the run report's summary and the terminal table all read the dict
through these, so each shows the same cells. Any section of the dict may be absent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from seektune.config import SCORECARD_DIMENSIONS
from seektune.evaluate.report_blocks import Cell, TableBlock
from seektune.report import (
    _METRICS,
    _fmt_change,
    _fmt_num,
    _fmt_pct,
    _fmt_points_change,
    _fmt_value,
    _is_number,
    _metric,
    _signed,
)

EVAL_DIR = "eval"
DIMENSION_LABELS = {dim: dim.capitalize() for dim in SCORECARD_DIMENSIONS}

# ---------------------------------------------------------------------------------------------------------
# Reading the evaluation dict


def model_entries(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each evaluated model's entry, by name."""
    models = evaluation.get("models") or {}
    return {name: entry for name, entry in models.items() if isinstance(entry, dict)}


def model_sections(evaluation: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """Each model's `key` section, for the models that have one."""
    return {n: e[key] for n, e in model_entries(evaluation).items() if isinstance(e.get(key), dict)}


def metric_label(name: str) -> str:
    """'ROUGE-L ↑': the metric's label and its direction."""
    spec = _metric(name)
    return spec.label + {"lower": " ↓", "higher": " ↑"}.get(spec.better or "", "")


def ordered_metrics(names: Iterable[str]) -> list[str]:
    """Known metrics in their usual order, then the others in the order given, each once."""
    names = list(dict.fromkeys(names))
    return [m for m in _METRICS if m in names] + [m for m in names if m not in _METRICS]


def metric_names(evaluation: dict[str, Any]) -> list[str]:
    """Every metric a model has a value or a missing reason for, in the usual order."""
    names: list[str] = []
    for entry in model_entries(evaluation).values():
        names += [k for k, v in (entry.get("metrics") or {}).items() if _is_number(v)]
        names += list(entry.get("missing") or {})
    return ordered_metrics(names)


def primary_metric(evaluation: dict[str, Any]) -> str | None:
    """The evaluation's primary metric, else the first one other than n (None when there is none)."""
    names = metric_names(evaluation)
    return evaluation.get("primary_metric") or next((m for m in names if m != "n"), None)


def ordered_dimensions(cards: Iterable[dict[str, Any]]) -> list[str]:
    """The scorecards' dimensions: the known ones in their usual order, then the others."""
    names = [dim for card in cards for dim in (card.get("dimensions") or {})]
    known = [d for d in SCORECARD_DIMENSIONS if d in names]
    return known + [d for d in dict.fromkeys(names) if d not in known]


def signed_num(value: float) -> str:
    """'+0.091', '−4.2', and '0' without a sign."""
    return "0" if value == 0 else _signed(value, _fmt_num(abs(value)))


# ---------------------------------------------------------------------------------------------------------
# Cells


def _metric_cell(entry: dict[str, Any], name: str) -> Cell:
    """The metric's value, or 'missing: <reason>' (a missing metric never shows as a number)."""
    reason = (entry.get("missing") or {}).get(name)
    if reason is not None:
        return Cell(f"missing: {reason}", "missing")
    value = (entry.get("metrics") or {}).get(name)
    return Cell(_fmt_value(name, value)) if _is_number(value) else Cell("—")


def compared_pair(evaluation: dict[str, Any]) -> tuple[str, str] | None:
    """(A, B) when two evaluated models were compared."""
    comparison = evaluation.get("comparison") or {}
    pair = comparison.get("a"), comparison.get("b")
    models = model_entries(evaluation)
    return (pair[0], pair[1]) if pair[0] in models and pair[1] in models else None


def _fmt_diff(name: str, value: float) -> str:
    """A signed difference in the metric's units: '+0.091', or '−2.0 pp' for a metric shown in percent;
    '0' / '0 pp' without a sign (an interval bound of exactly 0 is common for 0/1 scores, and '+0.0 pp'
    would read as above 0)."""
    if _metric(name).kind != "percent":
        return signed_num(value)
    return "0 pp" if value == 0 else _fmt_points_change(0.0, value)


def _significance_cell(name: str, result: dict[str, Any], confidence: Any, a: str, b: str) -> Cell:
    """'+0.091 (95% CI +0.05..+0.13) tuned better' from one metric of the paired bootstrap."""
    diff, low, high = result.get("diff"), result.get("ci_low"), result.get("ci_high")
    text = _fmt_diff(name, diff) if _is_number(diff) else "—"
    if _is_number(low) and _is_number(high):
        level = f"{confidence * 100:g}% " if _is_number(confidence) else ""
        text += f" ({level}CI {_fmt_diff(name, low)}..{_fmt_diff(name, high)})"
    verdict = result.get("verdict")
    if verdict == "B better":
        return Cell(f"{text} {b} better", "better")
    if verdict == "A better":
        return Cell(f"{text} {a} better", "worse")
    return Cell(f"{text} {verdict}" if verdict else text)


def _change_cell(evaluation: dict[str, Any], name: str) -> Cell:
    pair = compared_pair(evaluation)
    if pair is None:
        return Cell("—")
    comparison = evaluation["comparison"]
    result = (comparison.get("metrics") or {}).get(name)
    if isinstance(result, dict):
        return _significance_cell(name, result, comparison.get("confidence"), *pair)
    entries = [model_entries(evaluation)[n] for n in pair]
    if name == "n" or any(name in (e.get("missing") or {}) for e in entries):
        return Cell("—")
    values = [(e.get("metrics") or {}).get(name) for e in entries]
    return Cell(_fmt_change(name, *values))  # not bootstrapped: a plain difference, no verdict


def metrics_table(evaluation: dict[str, Any]) -> TableBlock:
    """Metrics as rows, models as columns, and the change when two models were compared."""
    models = model_entries(evaluation)
    pair = compared_pair(evaluation)
    header = ["Metric", *models, *([f"Change ({pair[1]} − {pair[0]})"] if pair else [])]
    rows = []
    for name in metric_names(evaluation):
        row = [Cell(metric_label(name)), *(_metric_cell(entry, name) for entry in models.values())]
        rows.append(row + ([_change_cell(evaluation, name)] if pair else []))
    return TableBlock(header, rows, "l" + "r" * (len(header) - 1))


def headline(evaluation: dict[str, Any]) -> str:
    """The comparison's summary sentence, else the primary metric of each model."""
    summary = (evaluation.get("comparison") or {}).get("summary")
    if summary:
        return str(summary)
    models, primary = model_entries(evaluation), primary_metric(evaluation)
    if not models or primary is None:
        return "No model was evaluated." if not models else "No metric was computed."
    better = _metric(primary).better
    values = "; ".join(f"{name} {_metric_cell(entry, primary).text}" for name, entry in models.items())
    return f"{_metric(primary).label}{f' ({better} is better)' if better else ''}: {values}."


def overall_cell(scorecard: dict[str, Any]) -> Cell:
    """The overall scorecard score, with the share of the weight measured when not all."""
    if not _is_number(scorecard.get("overall")):
        return Cell("not measured: no weighted dimension was measured", "missing")
    share = scorecard.get("weight_measured")
    of_weight = f" ({_fmt_pct(share)} of the weight measured)" if _is_number(share) and share < 1 else ""
    return Cell(_fmt_num(scorecard["overall"]) + of_weight)
