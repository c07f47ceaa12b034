"""The evaluation report's plots, drawn into eval/plots/ on matplotlib's Agg canvas (no pyplot) with
`seektune.report`'s figure helpers: a bar per model for each metric, the scorecard, the primary metric
against noise rate, and the latency distributions.

A plot is drawn only when the evaluation has data for it; a file left by an earlier report is removed
otherwise, since it would no longer be true.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seektune.evaluate.report_cells import (
    DIMENSION_LABELS,
    EVAL_DIR,
    metric_names,
    model_entries,
    model_sections,
    ordered_dimensions,
)
from seektune.report import _fmt_num, _fmt_value, _is_number, _metric, _new_figure, _save_png
from seektune.rundir import RunDir

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOTS_DIR = f"{EVAL_DIR}/plots"

_MODEL_COLOURS = {"base": "#8c8c8c", "tuned": "#2a9d4b"}
_OTHER_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#17becf", "#bcbd22")
_KIND_COLOURS = {
    "typo": "#1f77b4",
    "chinese": "#d62728",
    "punctuation": "#ff7f0e",
    "casing": "#9467bd",
    "distractor": "#17becf",
}


def _colour(name: str, index: int) -> str:
    return _MODEL_COLOURS.get(name) or _OTHER_COLOURS[index % len(_OTHER_COLOURS)]


def _plot_metrics(evaluation: dict[str, Any], path: Path) -> bool:
    """One small panel per metric with a bar per model (a metric missing for a model says so)."""
    models = model_entries(evaluation)
    names = [
        m
        for m in metric_names(evaluation)
        if m != "n" and any(_plotted_value(e, m) is not None for e in models.values())
    ]
    if not names:
        return False
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig = _new_figure(2.6 * columns + 0.4, 2.5 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, names, strict=False):
        _metric_panel(ax, models, metric)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    _save_png(fig, path)
    return True


def _plotted_value(entry: dict[str, Any], metric: str) -> float | None:
    value = (entry.get("metrics") or {}).get(metric)
    return value if _is_number(value) and metric not in (entry.get("missing") or {}) else None


def _metric_panel(ax: Axes, models: dict[str, dict[str, Any]], metric: str) -> None:
    spec = _metric(metric)
    scale = 100 if spec.kind == "percent" else 1
    names = list(models)
    values = [_plotted_value(models[n], metric) for n in names]
    heights = [v * scale if v is not None else 0 for v in values]
    bars = ax.bar(range(len(names)), heights, color=[_colour(n, i) for i, n in enumerate(names)], width=0.6)
    ax.bar_label(
        bars, labels=[_fmt_value(metric, v) if v is not None else "missing" for v in values], fontsize=8
    )
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{spec.label} ({spec.better} is better)" if spec.better else spec.label, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("%" if spec.kind == "percent" else "", fontsize=8)
    ax.margins(y=0.2)
    ax.spines[["top", "right"]].set_visible(False)


def _plot_robustness(evaluation: dict[str, Any], path: Path) -> bool:
    """The primary metric against noise rate: a line per kind per model, the clean value at rate 0."""
    sections = model_sections(evaluation, "robustness")
    lines = [(name, kind, points) for name, s in sections.items() for kind, points in _curves(s)]
    if not lines:
        return False
    metric = next(iter(sections.values())).get("metric") or ""
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    styles = ["--", "-", ":", "-."]
    model_index = {name: i for i, name in enumerate(sections)}
    for name, kind, points in lines:
        xs, ys = zip(*points, strict=True)
        style = styles[model_index[name] % len(styles)] if len(sections) > 1 else "-"
        ax.plot(
            [x * 100 for x in xs],
            ys,
            style,
            marker="o",
            markersize=4,
            color=_KIND_COLOURS.get(kind, "#444444"),
            label=f"{name}: {kind}",
        )
    ax.set_xlabel("noise rate (%)")
    ax.set_ylabel(_metric(metric).label)
    better = _metric(metric).better
    ax.set_title(f"{_metric(metric).label} under noise" + (f" ({better} is better)" if better else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if len(lines) > 5 else 1, loc="best")
    _save_png(fig, path)
    return True


def _curves(section: dict[str, Any]) -> list[tuple[str, list[tuple[float, float]]]]:
    """(kind, [(rate, value), ...]) with the clean value at rate 0, for each kind measured."""
    metric = section.get("metric")
    clean = (section.get("clean") or {}).get(metric)
    out = []
    for kind, by_rate in (section.get("curves") or {}).items():
        points = []
        for key, values in (by_rate or {}).items():
            value = (values or {}).get(metric) if isinstance(values, dict) else None
            if _is_number(value):
                points.append((float(key), float(value)))
        points.sort()
        if points:
            out.append((kind, ([(0.0, float(clean))] if _is_number(clean) else []) + points))
    return out


def _plot_latency(evaluation: dict[str, Any], path: Path) -> bool:
    """Box plots of the per-token latency and the time to first token, a box per model."""
    sections = model_sections(evaluation, "efficiency")
    panels = [
        (title, [(n, [v for v in s.get(key) or [] if _is_number(v)]) for n, s in sections.items()])
        for title, key in (
            ("Per-token latency (ms)", "token_ms_all"),
            ("Time to first token (ms)", "ttft_ms_all"),
        )
    ]
    panels = [(title, [(n, v) for n, v in data if v]) for title, data in panels]
    panels = [(title, data) for title, data in panels if data]
    if not panels:
        return False
    fig = _new_figure(3.6 * len(panels) + 0.4, 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    order = list(sections)
    for ax, (title, data) in zip(axes, panels, strict=True):
        boxes = ax.boxplot(
            [v for _, v in data], tick_labels=[n for n, _ in data], patch_artist=True, widths=0.5
        )
        for patch, (name, _) in zip(boxes["boxes"], data, strict=True):
            patch.set_facecolor(_colour(name, order.index(name)))
            patch.set_alpha(0.6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ms", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path)
    return True


def _plot_scorecard(evaluation: dict[str, Any], path: Path) -> bool:
    """Horizontal bars: a group per dimension (and the overall score), a bar per model."""
    cards = model_sections(evaluation, "scorecard")
    if not cards:
        return False
    dims = [*ordered_dimensions(cards.values()), "overall"]
    fig = _new_figure(7, 0.45 * len(dims) * max(1, len(cards)) ** 0.5 + 1.2)
    ax = fig.add_subplot()
    height = 0.8 / len(cards)
    for index, (name, card) in enumerate(cards.items()):
        values = [_card_score(card, dim) for dim in dims]
        ys = [d + index * height for d in range(len(dims))]
        ax.barh(ys, [v or 0 for v in values], height=height * 0.9, color=_colour(name, index), label=name)
        for y, value in zip(ys, values, strict=True):
            ax.text(
                (value or 0) + 0.01,
                y,
                _fmt_num(value) if value is not None else "not measured",
                va="center",
                fontsize=7,
                color="#333333" if value is not None else "#888888",
            )
    ax.set_yticks(
        [d + height * (len(cards) - 1) / 2 for d in range(len(dims))],
        [DIMENSION_LABELS.get(d, d.capitalize()) for d in dims],
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("score (0..1, higher is better)")
    ax.set_title("Scorecard")
    ax.legend(fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    _save_png(fig, path)
    return True


def _card_score(card: dict[str, Any], dim: str) -> float | None:
    value = (
        card.get("overall")
        if dim == "overall"
        else ((card.get("dimensions") or {}).get(dim) or {}).get("score")
    )
    return float(value) if _is_number(value) else None


_PLOTTERS: dict[str, Callable[[dict[str, Any], Path], bool]] = {
    "metrics": _plot_metrics,
    "scorecard": _plot_scorecard,
    "robustness": _plot_robustness,
    "latency": _plot_latency,
}


def draw_plots(run: RunDir, evaluation: dict[str, Any]) -> dict[str, Path]:
    """Draw every plot the evaluation has data for into eval/plots/; returns {plot: path} of those drawn."""
    drawn = {}
    for key, plot in _PLOTTERS.items():
        path = run.resolve(f"{PLOTS_DIR}/{key}.png")
        if plot(evaluation, path):
            drawn[key] = path
        else:
            path.unlink(missing_ok=True)  # a plot left from an earlier report would no longer be true
    return drawn
