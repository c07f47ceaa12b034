"""The report of a hyperparameter search, for a person: report.md, trials.csv and plots.

Optuna has the pieces (`optuna.visualization.matplotlib` draws the history, the Pareto front,
importances and slices; `optuna.importance.get_param_importances` ranks the parameters;
`Study.trials_dataframe` tabulates trials) but nothing that says in one page which trial won, by how
much it beat the config's own values, how many optimizer steps the search spent and how many of them
went to pruned trials. `write_tune_report` assembles that page from a finished or partly finished
study, using those Optuna functions for every figure and number they provide.

We write the CSV ourselves rather than with `trials_dataframe` so its columns stay the same whatever
user attributes a trial carries (`steps`, `runtime_s`, `pruned_at`, `error`, `baseline`, `model_dir`).

Optuna's matplotlib plots draw through pyplot and switch the global style to ggplot. We select the Agg
backend only when nobody has imported pyplot yet (a notebook keeps its backend), restore rcParams
after each plot and close every figure we open. A plot that cannot be made is skipped with a reason.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from seektune.report import _fmt_duration, _md_escape, _table
from seektune.rundir import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MINUS = "−"  # U+2212, the typographic minus, as in seektune.report
MAX_NOTE_CHARS = 80
STATE_ORDER = (
    TrialState.COMPLETE,
    TrialState.PRUNED,
    TrialState.FAIL,
    TrialState.RUNNING,
    TrialState.WAITING,
)
STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
BASELINE_VERBS = {
    "PRUNED": "was pruned",
    "FAIL": "failed",
    "RUNNING": "is still running",
    "WAITING": "is waiting",
}
CSV_ATTRS = ("steps", "runtime_s", "pruned_at", "error", "baseline", "model_dir")
_EQUAL_IMPORTANCES = "importances will be equal"  # Optuna's warning when its evaluator cannot rank


def write_tune_report(study: optuna.Study, out_dir: Path, metric_names: list[str]) -> dict[str, Any]:
    """Write report.md, trials.csv and plots/*.png for `study` into `out_dir`; return the summary.

    `metric_names` names the study's objectives in order (`study.directions` gives their directions).
    The summary is JSON-serialisable: study name, trial counts by state, the best trial (single
    objective) or the Pareto front (several), the baseline trial (user attr `baseline`) and the
    relative change of the best over it per metric ((best − baseline) / |baseline|, negative when
    lower), importances for the first objective, optimizer steps in all and in pruned trials, the
    plots written (relative to `out_dir`) and the reason for each plot skipped.
    """
    if len(metric_names) != len(study.directions):
        raise ValueError(f"{len(metric_names)} metric names for {len(study.directions)} objectives")
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    summary = _summarise(study, trials, metric_names)
    summary["importances"], importance_skip = _importances(study)
    summary["plots"], summary["skipped_plots"] = _draw_plots(
        study, out_dir / "plots", metric_names, summary["importances"], importance_skip
    )
    atomic_write_text(out_dir / "trials.csv", _trials_csv(trials, metric_names))
    atomic_write_text(out_dir / "report.md", _render_report(study, trials, metric_names, summary))
    logger.info("wrote the search report of study %s to %s", study.study_name, out_dir)
    return summary


# ---------------------------------------------------------------------------------------------------------
# The summary


def _summarise(study: optuna.Study, trials: list[FrozenTrial], metric_names: list[str]) -> dict[str, Any]:
    counts = {state.name: 0 for state in STATE_ORDER}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    summary: dict[str, Any] = {"study": study.study_name, "trials": counts}
    if len(study.directions) == 1:
        best = _complete_trial_or_none(study)
        summary["best"] = _trial_entry(best, metric_names) if best is not None else None
        chosen = best
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        summary["pareto"] = [_trial_entry(t, metric_names) for t in front]
        chosen = _best_on_first_objective(front, study.directions[0])
    baseline = _baseline_trial(trials)
    summary["baseline"] = _trial_entry(baseline, metric_names) if baseline is not None else None
    summary["improvement"] = _improvement(chosen, baseline, metric_names)
    summary["improvement_trial"] = chosen.number if chosen is not None and summary["improvement"] else None
    summary["steps"] = {
        "total": sum(_steps(t) for t in trials),
        "pruned": sum(_steps(t) for t in trials if t.state == TrialState.PRUNED),
    }
    return summary


def _complete_trial_or_none(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete (or no feasible) trial yet
        return None


def _best_on_first_objective(front: list[FrozenTrial], direction: StudyDirection) -> FrozenTrial | None:
    """The Pareto trial we compare with the baseline: the best on the first objective."""
    if not front:
        return None
    sign = 1 if direction == StudyDirection.MINIMIZE else -1
    return min(front, key=lambda t: (sign * t.values[0], t.number))


def _baseline_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The trial that ran the config's own values: a complete one when there is one, else the last."""
    marked = [t for t in trials if t.user_attrs.get("baseline") is True]
    complete = [t for t in marked if t.state == TrialState.COMPLETE]
    if complete:
        return complete[0]
    return marked[-1] if marked else None


def _trial_entry(trial: FrozenTrial, metric_names: list[str]) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": _values_by_metric(trial, metric_names),
        "params": dict(trial.params),
    }


def _values_by_metric(trial: FrozenTrial, metric_names: list[str]) -> dict[str, float | None]:
    values = trial.values or [None] * len(metric_names)
    if len(values) != len(metric_names):  # a pruned trial of a multi-objective study
        values = [None] * len(metric_names)
    return {name: _finite_or_none(value) for name, value in zip(metric_names, values, strict=True)}


def _improvement(
    best: FrozenTrial | None, baseline: FrozenTrial | None, metric_names: list[str]
) -> dict[str, float]:
    """Relative change of `best` over `baseline` per metric; {} when either has no values."""
    if best is None or baseline is None or baseline.state != TrialState.COMPLETE:
        return {}
    changes = {}
    new_values = _values_by_metric(best, metric_names)
    old_values = _values_by_metric(baseline, metric_names)
    for name in metric_names:
        new, old = new_values[name], old_values[name]
        if new is not None and old is not None and old != 0:
            changes[name] = (new - old) / abs(old)
    return changes


def _steps(trial: FrozenTrial) -> int:
    steps = trial.user_attrs.get("steps")
    return int(steps) if _is_number(steps) else 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


# ---------------------------------------------------------------------------------------------------------
# Importances


def _first_objective_target(study: optuna.Study) -> Callable[[FrozenTrial], float] | None:
    """None for a single objective; the first value for several, negated when it is maximised.

    PED-ANOVA (Optuna 5's default evaluator) takes lower `target` values as better, whatever the
    study's direction, so a maximised objective must be negated to rank what makes it high.
    """
    if len(study.directions) == 1:
        return None
    return _negated_first_value if study.directions[0] == StudyDirection.MAXIMIZE else _first_value


def _first_value(trial: FrozenTrial) -> float:
    return trial.values[0]


def _negated_first_value(trial: FrozenTrial) -> float:
    return -trial.values[0]


def _importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Importances of the parameters that vary, for the first objective, or ({}, why not)."""
    reason = _too_few_trials(study) or _no_varying_params(study)
    if reason:
        return {}, reason
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importances = optuna.importance.get_param_importances(
                study, params=_varying_params(study), target=_first_objective_target(study)
            )
    except Exception as exc:  # the evaluator's own limits; the report goes on without importances
        logger.warning("parameter importances failed: %s", exc)
        return {}, f"the importance evaluator failed: {type(exc).__name__}: {exc}"
    equal = [str(w.message) for w in caught if _EQUAL_IMPORTANCES in str(w.message).lower()]
    if equal:
        return {}, f"the importance evaluator could not rank the parameters: {equal[0]}"
    return {name: float(value) for name, value in importances.items()}, None


def _complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if t.values and all(_is_number(v) for v in t.values)]


def _varying_params(study: optuna.Study) -> list[str]:
    """Parameters that take at least two values over the complete trials, in order of appearance."""
    seen: dict[str, set[str]] = {}
    for trial in _complete_trials(study):
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(json.dumps(value, default=str))
    return [name for name, values in seen.items() if len(values) > 1]


def _too_few_trials(study: optuna.Study) -> str | None:
    count = len(_complete_trials(study))
    if count >= 2:
        return None
    return f"needs at least 2 complete trials; the study has {count}"


def _no_varying_params(study: optuna.Study) -> str | None:
    if _varying_params(study):
        return None
    return "every complete trial has the same parameter values, so there is nothing to compare"


# ---------------------------------------------------------------------------------------------------------
# Plots


def _draw_plots(
    study: optuna.Study,
    plots_dir: Path,
    metric_names: list[str],
    importances: dict[str, float],
    importance_skip: str | None,
) -> tuple[list[str], dict[str, str]]:
    """Draw every plot that can be drawn; the paths written and a reason for each one skipped."""
    written: list[str] = []
    skipped: dict[str, str] = {}
    for name, reason, draw in _plot_plan(study, metric_names, importances, importance_skip):
        path = plots_dir / f"{name}.png"
        reason = reason or _draw_one(draw, path)
        if reason:
            skipped[name] = reason
            path.unlink(missing_ok=True)  # a stale plot from an earlier report of this study
        else:
            written.append(f"plots/{name}.png")
    return written, skipped


PlotPlan = tuple[str, str | None, Callable[[], Any]]


def _plot_plan(
    study: optuna.Study, metric_names: list[str], importances: dict[str, float], importance_skip: str | None
) -> list[PlotPlan]:
    """(name, reason to skip or None, drawing function) for each plot that applies to this study."""
    from optuna.visualization import matplotlib as optuna_plt

    first, target = metric_names[0], _first_objective_target(study)
    few, constant = _too_few_trials(study), _no_varying_params(study)
    n_objectives = len(study.directions)
    if n_objectives == 1:
        plans = [("history", few, partial(optuna_plt.plot_optimization_history, study, target_name=first))]
    else:
        too_many = f"a Pareto front is drawn for 2 objectives only; this study has {n_objectives}"
        pareto_skip = few or (too_many if n_objectives > 2 else None)
        pareto_plot = partial(optuna_plt.plot_pareto_front, study, target_names=metric_names)
        plans = [("pareto", pareto_skip, pareto_plot)]
    importance_plot = partial(
        optuna_plt.plot_param_importances, study, params=list(importances), target=target, target_name=first
    )
    slice_target = None if target is None else _first_value
    slice_plot = partial(
        optuna_plt.plot_slice, study, params=_varying_params(study), target=slice_target, target_name=first
    )
    plans.append(("importance", few or constant or importance_skip, importance_plot))
    plans.append(("slice", few or constant, slice_plot))
    return plans


def _draw_one(draw: Callable[[], Any], path: Path) -> str | None:
    """Run one Optuna plot function and save its figure to `path`; the reason when it fails."""
    try:
        with _optuna_figures() as figures:
            draw()
            if not figures():
                return "Optuna drew no figure"
            atomic_write_bytes(path, _png_bytes(figures()[-1]))
    except Exception as exc:  # a plot is a nice-to-have: never lose the report for one
        logger.warning("could not draw %s: %s", path.name, exc)
        return f"drawing failed: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _optuna_figures() -> Iterator[Callable[[], list[Figure]]]:
    """Agg backend, Optuna's warnings silenced, rcParams restored; yields the figures opened since."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())

    def opened() -> list[Figure]:
        return [plt.figure(n) for n in plt.get_fignums() if n not in before]

    try:
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # Optuna's and matplotlib's notes on tiny data
            yield opened
    finally:
        for figure in opened():
            plt.close(figure)


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# trials.csv


def _trials_csv(trials: list[FrozenTrial], metric_names: list[str]) -> str:
    """One row per trial: number, state, a value per metric, `param.<name>` per parameter, user attrs."""
    param_names = _param_names(trials)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", *metric_names, *(f"param.{p}" for p in param_names), *CSV_ATTRS])
    for trial in trials:
        values = _values_by_metric(trial, metric_names)
        writer.writerow(
            [
                trial.number,
                trial.state.name,
                *(_csv_cell(values[m]) for m in metric_names),
                *(_csv_cell(trial.params.get(p)) for p in param_names),
                *(_csv_cell(trial.user_attrs.get(a)) for a in CSV_ATTRS),
            ]
        )
    return buffer.getvalue()


def _param_names(trials: list[FrozenTrial]) -> list[str]:
    return list(dict.fromkeys(name for trial in trials for name in trial.params))


def _csv_cell(value: Any) -> Any:
    return "" if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Formatting


def _fmt_num(value: Any) -> str:
    """Four significant digits (losses of close trials must stay apart); '—' when missing."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md_escape(value)
    if isinstance(value, int):
        return f"{value:,}".replace("-", MINUS)
    return f"{value:.4g}".replace("-", MINUS) if math.isfinite(value) else str(value)


def _fmt_pct(fraction: float) -> str:
    return f"{abs(fraction) * 100:.3g}%"


def _clip(text: str, limit: int = MAX_NOTE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _metric_header(name: str, direction: StudyDirection) -> str:
    return f"{_md_escape(name)} {'↓' if direction == StudyDirection.MINIMIZE else '↑'}"


# ---------------------------------------------------------------------------------------------------------
# report.md


def _render_report(
    study: optuna.Study, trials: list[FrozenTrial], metric_names: list[str], summary: dict[str, Any]
) -> str:
    lines = ["## Hyperparameter search", "", *_overview(study, trials, metric_names, summary)]
    if "best" in summary:
        lines += _best_section(summary["best"], metric_names)
    else:
        lines += _pareto_section(summary["pareto"], metric_names, study.directions)
    lines += _baseline_section(study, metric_names, summary)
    lines += _compute_section(trials, summary["steps"])
    lines += _importance_section(summary["importances"], metric_names[0])
    lines += _plots_section(summary["plots"], summary["skipped_plots"])
    lines += _trials_section(trials, metric_names, study.directions)
    return "\n".join(lines).rstrip() + "\n"


def _overview(
    study: optuna.Study, trials: list[FrozenTrial], metric_names: list[str], summary: dict[str, Any]
) -> list[str]:
    objectives = ", ".join(
        f"{direction.name.lower()} {_md_escape(name)}"
        for name, direction in zip(metric_names, study.directions, strict=True)
    )
    lines = [
        f"- Study: {_md_escape(study.study_name)}",
        f"- Objective{'s' if len(metric_names) > 1 else ''}: {objectives}",
    ]
    for key in ("sampler", "pruner"):
        if study.user_attrs.get(key):
            lines.append(f"- {key.capitalize()}: {_md_escape(study.user_attrs[key])}")
    counts = [f"{n} {STATE_WORDS.get(s, s.lower())}" for s, n in summary["trials"].items() if n]
    lines.append(f"- Trials: {len(trials)}" + (f" ({', '.join(counts)})" if counts else ""))
    lines.append("- Every trial: [trials.csv](trials.csv)")
    return [*lines, ""]


def _params_table(params: dict[str, Any]) -> list[str]:
    if not params:
        return []
    rows = [[_md_escape(name), _fmt_num(value)] for name, value in params.items()]
    return [*_table(["Parameter", "Value"], rows, "lr"), ""]


def _best_section(best: dict[str, Any] | None, metric_names: list[str]) -> list[str]:
    lines = ["### Best trial", ""]
    if best is None:
        return [*lines, "No trial has completed yet.", ""]
    value = best["values"][metric_names[0]]
    lines += [f"Trial {best['number']}: {_md_escape(metric_names[0])} {_fmt_num(value)}.", ""]
    return lines + _params_table(best["params"])


def _pareto_section(
    front: list[dict[str, Any]], metric_names: list[str], directions: list[StudyDirection]
) -> list[str]:
    lines = ["### Pareto front", ""]
    if not front:
        return [*lines, "No trial has completed yet.", ""]
    param_names = list(dict.fromkeys(p for entry in front for p in entry["params"]))
    header = ["Trial", *(_metric_header(m, d) for m, d in zip(metric_names, directions, strict=True))]
    header += [_md_escape(p) for p in param_names]
    rows = [
        [
            str(entry["number"]),
            *(_fmt_num(entry["values"][m]) for m in metric_names),
            *(_fmt_num(entry["params"].get(p)) for p in param_names),
        ]
        for entry in front
    ]
    intro = f"{len(front)} trial{'s' if len(front) > 1 else ''} that no other trial beats on every objective:"
    align = "r" * (1 + len(metric_names)) + "l" * len(param_names)
    return [*lines, intro, "", *_table(header, rows, align), ""]


def _baseline_section(study: optuna.Study, metric_names: list[str], summary: dict[str, Any]) -> list[str]:
    baseline = summary["baseline"]
    lines = ["### Against the config's own values", ""]
    if baseline is None:
        return [*lines, "No trial ran the config's own values, so there is no baseline to compare with.", ""]
    if baseline["state"] != "COMPLETE":
        verb = BASELINE_VERBS.get(baseline["state"], baseline["state"].lower())
        return [*lines, f"The trial of the config's own values (trial {baseline['number']}) {verb}.", ""]
    chosen = summary["improvement_trial"]
    if chosen is None:
        values = ", ".join(f"{_md_escape(m)} {_fmt_num(v)}" for m, v in baseline["values"].items())
        text = (
            f"Trial {baseline['number']} ran the config's own values ({values}): no relative change to show."
        )
        return [*lines, text, ""]
    if chosen == baseline["number"]:
        return [*lines, f"The config's own values (trial {chosen}) are the best the search found.", ""]
    if "pareto" in summary:
        lines += [f"Trial {chosen} is the Pareto trial best on {_md_escape(metric_names[0])}.", ""]
    new_values = _summary_values(summary, chosen)
    for name, direction in zip(metric_names, study.directions, strict=True):
        change = summary["improvement"].get(name)
        if change is not None:
            old, new = baseline["values"][name], new_values[name]
            lines.append(_change_sentence(chosen, baseline["number"], name, direction, change, old, new))
    return [*lines, ""]


def _summary_values(summary: dict[str, Any], number: int) -> dict[str, float | None]:
    entries = [summary["best"]] if "best" in summary else summary["pareto"]
    return next(entry["values"] for entry in entries if entry["number"] == number)


def _change_sentence(
    trial: int, baseline: int, name: str, direction: StudyDirection, change: float, old: Any, new: Any
) -> str:
    """'Trial 7 reached 25% lower eval_loss than the config's own values (trial 0: 2 → 1.5).'"""
    figures = f"(trial {baseline}: {_fmt_num(old)} → {_fmt_num(new)})"
    if change == 0:
        return f"- Trial {trial} reached the same {_md_escape(name)} as the config's own values {figures}."
    word = "lower" if change < 0 else "higher"
    worse = "" if (change < 0) == (direction == StudyDirection.MINIMIZE) else ", which is worse"
    phrase = f"{_fmt_pct(change)} {word} {_md_escape(name)} than the config's own values"
    return f"- Trial {trial} reached {phrase} {figures}{worse}."


def _compute_section(trials: list[FrozenTrial], steps: dict[str, int]) -> list[str]:
    lines = ["### Compute", ""]
    share = f" ({_fmt_pct(steps['pruned'] / steps['total'])})" if steps["total"] else ""
    total, pruned = steps["total"], steps["pruned"]
    lines.append(f"- Optimizer steps: {total:,} in all; pruned trials used {pruned:,} of them{share}.")
    runtimes = [t.user_attrs["runtime_s"] for t in trials if _is_number(t.user_attrs.get("runtime_s"))]
    if runtimes:
        lines.append(f"- Trial runtime: {_fmt_duration(sum(runtimes))} in all.")
    return [*lines, ""]


def _importance_section(importances: dict[str, float], first_metric: str) -> list[str]:
    if not importances:
        return []
    rows = [[_md_escape(name), f"{value:.2f}"] for name, value in importances.items()]
    intro = f"How much each parameter mattered for {_md_escape(first_metric)} (PED-ANOVA, sums to 1):"
    return ["### Parameter importances", "", intro, "", *_table(["Parameter", "Importance"], rows, "lr"), ""]


def _plots_section(plots: list[str], skipped: dict[str, str]) -> list[str]:
    lines = ["### Plots", ""]
    for path in plots:
        lines += [f"![{Path(path).stem}]({path})", ""]
    lines += [f"- No {name} plot: {_md_escape(reason)}." for name, reason in skipped.items()]
    return [*lines, ""] if skipped else lines


def _trials_section(
    trials: list[FrozenTrial], metric_names: list[str], directions: list[StudyDirection]
) -> list[str]:
    if not trials:
        return ["### All trials", "", "The study has no trials yet.", ""]
    param_names = _param_names(trials)
    header = [
        "Trial",
        "State",
        *(_metric_header(m, d) for m, d in zip(metric_names, directions, strict=True)),
    ]
    header += [*(_md_escape(p) for p in param_names), "Steps", "Runtime", "Note"]
    rows = [_trial_row(t, metric_names, param_names) for t in trials]
    align = "rl" + "r" * len(metric_names) + "l" * len(param_names) + "rrl"
    return ["### All trials", "", *_table(header, rows, align), ""]


def _trial_row(trial: FrozenTrial, metric_names: list[str], param_names: list[str]) -> list[str]:
    values = _values_by_metric(trial, metric_names)
    runtime = trial.user_attrs.get("runtime_s")
    return [
        str(trial.number),
        STATE_WORDS.get(trial.state.name, trial.state.name.lower()),
        *(_fmt_num(values[m]) for m in metric_names),
        *(_fmt_num(trial.params.get(p)) for p in param_names),
        _fmt_num(trial.user_attrs.get("steps")),
        _fmt_duration(runtime) if _is_number(runtime) else "—",
        _md_escape(_trial_note(trial)),
    ]


def _trial_note(trial: FrozenTrial) -> str:
    """Why a trial ended as it did: pruned at step N, its error, the baseline, a retry."""
    notes = []
    if trial.user_attrs.get("baseline") is True:
        notes.append("the config's own values")
    if trial.state == TrialState.PRUNED:
        step = trial.user_attrs.get("pruned_at", trial.last_step)
        notes.append(f"pruned at step {step}" if step is not None else "pruned")
    if trial.user_attrs.get("error"):
        notes.append(str(trial.user_attrs["error"]))
    if trial.user_attrs.get("retry_of") is not None:
        notes.append(f"retry of trial {trial.user_attrs['retry_of']}")
    return _clip("; ".join(notes))
