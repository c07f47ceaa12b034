"""The report of a run, for a person: report.md with a headline, tables, plots and sample answers.

transformers writes `trainer_state.json` and TensorBoard logs; neither says in one paragraph whether the
tuned model is better than the base, and neither puts data, training, evaluation and how to reproduce
on one page. `write_report` renders the run's summary dict (any section may be missing) into
`report.md` and draws `plots/loss.png` and `plots/eval.png` with matplotlib's Agg canvas (no pyplot,
no global backend switch). Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from seektune.rundir import RunDir, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MINUS = "−"  # U+2212, the typographic minus
MAX_SAMPLES = 5
MAX_SAMPLE_CHARS = 300
LOSS_PLOT = "loss.png"
EVAL_PLOT = "eval.png"


@dataclass(frozen=True)
class _Metric:
    label: str  # as written in tables and plot titles
    phrase: str  # as written in the headline sentence
    better: Literal["lower", "higher"] | None
    kind: Literal["number", "percent", "count"]
    change: Literal["relative", "absolute", "points"]


_METRICS: dict[str, _Metric] = {
    "perplexity": _Metric("Perplexity", "perplexity", "lower", "number", "relative"),
    "exact_match": _Metric("Exact match", "exact match", "higher", "percent", "points"),
    "token_f1": _Metric("Token F1", "token F1", "higher", "number", "absolute"),
    "accuracy": _Metric("Accuracy", "accuracy", "higher", "percent", "points"),
    "macro_f1": _Metric("Macro-F1", "macro-F1", "higher", "number", "absolute"),
    "rouge_1": _Metric("ROUGE-1", "ROUGE-1", "higher", "number", "absolute"),
    "rouge_2": _Metric("ROUGE-2", "ROUGE-2", "higher", "number", "absolute"),
    "rouge_l": _Metric("ROUGE-L", "ROUGE-L", "higher", "number", "absolute"),
    "bleu": _Metric("BLEU", "BLEU", "higher", "number", "absolute"),
    "chrf": _Metric("chrF", "chrF", "higher", "number", "absolute"),
    "eos_rate": _Metric("Answers ending with EOS", "answers ending with EOS", "higher", "percent", "points"),
    "mean_new_tokens": _Metric("Mean new tokens", "mean new tokens", None, "number", "absolute"),
    "n": _Metric("Examples", "examples", None, "count", "absolute"),
    "seconds": _Metric("Evaluation time (s)", "evaluation time", None, "number", "absolute"),
}
_PLOTTED = ("perplexity", "rouge_l", "eos_rate", "mean_new_tokens")

# ---------------------------------------------------------------------------------------------------------
# Number formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _signed(value: float, text: str) -> str:
    """`text` (an absolute value) with a + or − sign taken from `value`."""
    return f"{'+' if value >= 0 else MINUS}{text}"


def _fmt_num(value: Any) -> str:
    """Three significant digits, thousands separated; '—' when missing."""
    if value is None:
        return "—"
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace("-", MINUS)
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2e}".replace("-", MINUS)
    return f"{value:.3g}".replace("-", MINUS)


def _fmt_pct(fraction: Any) -> str:
    """A fraction as a percentage: 0.034 → '3.4%', 0.94 → '94%'."""
    if not _is_number(fraction):
        return _fmt_num(fraction)
    percent = fraction * 100
    text = f"{abs(percent):.0f}" if abs(percent) >= 10 or percent == round(percent) else f"{abs(percent):.1f}"
    return f"{MINUS if percent < 0 else ''}{text}%"


def _fmt_count(value: Any) -> str:
    """Large counts in k/M/B: 1_234_567 → '1.23M'."""
    if not _is_number(value):
        return _fmt_num(value)
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.0f}"


def _fmt_relative_change(base: float, tuned: float) -> str:
    """'−54%' for 12.3 → 5.6; the absolute difference when the base is 0."""
    if base == 0:
        return _fmt_absolute_change(base, tuned)
    change = (tuned - base) / abs(base) * 100
    text = f"{abs(change):.0f}" if abs(change) >= 10 else f"{abs(change):.1f}"
    return _signed(change, f"{text}%")


def _fmt_absolute_change(base: float, tuned: float) -> str:
    return _signed(tuned - base, _fmt_num(abs(tuned - base)))


def _fmt_points_change(base: float, tuned: float) -> str:
    points = (tuned - base) * 100
    return _signed(points, f"{abs(points):.0f} pp" if abs(points) >= 10 else f"{abs(points):.1f} pp")


def _fmt_duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return _fmt_num(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _metric(name: str) -> _Metric:
    return _METRICS.get(name, _Metric(name, name, None, "number", "absolute"))


def _fmt_value(name: str, value: Any) -> str:
    kind = _metric(name).kind
    if kind == "percent":
        return _fmt_pct(value)
    return _fmt_count(value) if kind == "count" and _is_number(value) and value >= 1e4 else _fmt_num(value)


_CHANGE_FORMATS: dict[str, Callable[[float, float], str]] = {
    "relative": _fmt_relative_change,
    "absolute": _fmt_absolute_change,
    "points": _fmt_points_change,
}


def _fmt_change(name: str, base: Any, tuned: Any) -> str:
    if not (_is_number(base) and _is_number(tuned)) or _metric(name).kind == "count":
        return "—"
    return _CHANGE_FORMATS[_metric(name).change](base, tuned)


def _verdict(name: str, base: Any, tuned: Any) -> Literal["better", "worse", "same"] | None:
    """Whether tuned is better than base on a metric with a direction (None: no direction or no values)."""
    better = _metric(name).better
    if better is None or not (_is_number(base) and _is_number(tuned)):
        return None
    if math.isclose(base, tuned, rel_tol=1e-9, abs_tol=1e-12):
        return "same"
    return "better" if (tuned < base) == (better == "lower") else "worse"


# ---------------------------------------------------------------------------------------------------------
# Markdown helpers


def _clip(text: Any, limit: int = MAX_SAMPLE_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _md_escape(text: Any) -> str:
    """Text safe inside a markdown paragraph or table cell: markup characters escaped, one line."""
    text = "" if text is None else str(text)
    text = text.replace("\\", "\\\\")
    for char in "`*_[]<>|~#":
        text = text.replace(char, "\\" + char)
    return text.replace("\r\n", "\n").replace("\n", " ↵ ")


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; `align` has one letter per column, 'l' or 'r'."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(rule)} |", *(f"| {' | '.join(r)} |" for r in rows)]


# ---------------------------------------------------------------------------------------------------------
# Headline


def _eval_models(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    models = (summary.get("eval") or {}).get("models") or {}
    return {name: values for name, values in models.items() if isinstance(values, dict)}


def _comparison_phrase(name: str, base: Any, tuned: Any) -> str:
    spec = _metric(name)
    text = f"{spec.phrase} {_fmt_value(name, base)} → {_fmt_value(name, tuned)}"
    return text if spec.kind == "percent" else f"{text} ({_fmt_change(name, base, tuned)})"


def _join(parts: list[str]) -> str:
    return ", ".join(parts)


def _verdict_sentence(better: list[str], worse: list[str], same: list[str]) -> str:
    unchanged = f"; unchanged: {_join(same)}" if same else ""
    if better and not worse:
        return f"the tuned model beats the base: {_join(better)}{unchanged}."
    if better and worse:
        return f"the tuned model beats the base on {_join(better)}, but not on {_join(worse)}{unchanged}."
    if worse:
        return f"the tuned model does not beat the base: it is worse on {_join(worse)}{unchanged}."
    return f"the tuned model does not beat the base: it scores the same on {_join(same)}."


def _compare_headline(
    base: dict[str, Any], tuned: dict[str, Any], significance: dict[str, str] | None = None
) -> str | None:
    """Base against tuned; with `significance` (metric -> the paired bootstrap's verdict) a metric counts
    as better or worse only when the difference is significant."""
    groups: dict[str, list[str]] = {"better": [], "worse": [], "same": []}
    insignificant: list[str] = []
    untested: list[str] = []  # with significance: metrics the bootstrap did not test (rates of answers)
    for name in _ordered_metrics([base, tuned]):
        verdict = _verdict(name, base.get(name), tuned.get(name))
        if verdict is None:
            continue
        phrase = _comparison_phrase(name, base.get(name), tuned.get(name))
        tested = (significance or {}).get(name)
        if significance and tested is None:
            untested.append(phrase)
        elif tested == "no significant difference":
            insignificant.append(_metric(name).phrase)
        else:
            if tested is not None:
                verdict = "better" if tested == "B better" else "worse"
            groups[verdict].append(phrase)
    if not any(groups.values()) and not insignificant:
        return f"{_join(untested)[:1].upper()}{_join(untested)[1:]}." if untested else None
    if any(groups.values()):
        sentence = _verdict_sentence(groups["better"], groups["worse"], groups["same"])
        if insignificant:
            sentence = f"{sentence[:-1]}; no significant difference in {_join(insignificant)}."
    else:
        sentence = (
            f"the tuned model does not beat the base: no significant difference in {_join(insignificant)}."
        )
    if significance:
        sentence = f"{sentence[:-1]} (paired bootstrap)."
    if untested:
        sentence += f" Also: {_join(untested)}."
    n = tuned.get("n") if _is_number(tuned.get("n")) else base.get("n")
    if _is_number(n):
        return f"On {_fmt_num(n)} test examples, {sentence}"
    return sentence[0].upper() + sentence[1:]


def _single_model_headline(name: str, values: dict[str, Any]) -> str | None:
    parts = [
        f"{_metric(m).phrase} {_fmt_value(m, values[m])}"
        for m in _ordered_metrics([values])
        if _metric(m).better is not None
    ]
    if not parts:
        return None
    subject = "The model" if name == "model" else f"The {name} model"
    return f"{subject} scores: {_join(parts)}. There is no other model to compare it with."


def _training_headline(train: dict[str, Any]) -> str | None:
    if not train:
        return None
    losses = [f"final train loss {_fmt_num(train.get('train_loss'))}"]
    if _is_number(train.get("eval_loss")):
        losses.append(f"validation loss {_fmt_num(train['eval_loss'])}")
    return f"Training finished with {' and '.join(losses)}; this run has no base-versus-tuned evaluation."


def _headline(summary: dict[str, Any]) -> str:
    models = _eval_models(summary)
    text = None
    comparison = ((summary.get("eval") or {}).get("evaluation") or {}).get("comparison") or {}
    if "base" in models and "tuned" in models:
        significance = {m: row["verdict"] for m, row in (comparison.get("metrics") or {}).items()}
        text = _compare_headline(models["base"], models["tuned"], significance or None)
    elif len(models) == 1:
        text = _single_model_headline(*next(iter(models.items())))
    text = (
        text or _training_headline(summary.get("train") or {}) or _search_headline(summary.get("tune") or {})
    )
    return text or "This run has no training or evaluation results yet."


def _search_headline(tune: dict[str, Any]) -> str | None:
    best = tune.get("best") or (tune.get("pareto") or [None])[0]
    if not best:
        return None
    trials = sum((tune.get("trials") or {}).values())
    values = ", ".join(f"{_md_escape(k)} {_fmt_num(v)}" for k, v in best["values"].items())
    gains = [
        f"{_fmt_pct(abs(change))} {'lower' if change < 0 else 'higher'} {_md_escape(name)}"
        for name, change in (tune.get("improvement") or {}).items()
        if _is_number(change) and change
    ]
    against = f", {_join(gains)} than the config's own values" if gains else ""
    return f"The search ran {trials} trials; the best, trial {best['number']}, reached {values}{against}."


# ---------------------------------------------------------------------------------------------------------
# Sections


def _ordered_metrics(models: list[dict[str, Any]]) -> list[str]:
    """Known metrics in their usual order, then any others, each once."""
    names = [m for m in _METRICS if any(m in values for values in models)]
    extra = [k for values in models for k in values if k not in _METRICS and _is_number(values[k])]
    return names + list(dict.fromkeys(extra))


def _run_section(info: dict[str, Any]) -> list[str]:
    fields = [
        ("Model", "model"),
        ("Method", "method"),
        ("Device", "device"),
        ("Dtype", "dtype"),
        ("Seed", "seed"),
        ("Started", "started_at"),
        ("Finished", "finished_at"),
    ]
    lines = [f"- {label}: {_md_escape(info[key])}" for label, key in fields if info.get(key) is not None]
    return [*lines, ""] if lines else []


def _data_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    splits = data.get("splits") or {}
    if splits:
        rows = [[_md_escape(name), _fmt_num(count)] for name, count in splits.items()]
        lines += [*_table(["Split", "Examples"], rows, "lr"), ""]
    for name, count in (data.get("sources") or {}).items():
        lines.append(f"- Source `{_md_escape(name)}`: {_fmt_num(count)} records read")
    removed = {k: v for k, v in (data.get("removed") or {}).items() if v}
    removed_text = ", ".join(f"`{k}`: {_fmt_num(v)}" for k, v in removed.items()) or "none"
    lines.append(f"- Removed: {removed_text}")
    pii = {k: v for k, v in (data.get("pii") or {}).items() if v}
    if pii:
        lines.append("- Personal data masked: " + ", ".join(f"`{k}`: {_fmt_num(v)}" for k, v in pii.items()))
    if _is_number(data.get("train_tokens")):
        lines.append(f"- Training tokens: {_fmt_num(data['train_tokens'])}")
    if _is_number(data.get("shift_auc")):
        lines.append(f"- Train/test shift (adversarial AUC, 0.5 = none): {data['shift_auc']:.2f}")
    if data.get("fingerprint"):
        lines.append(f"- Data fingerprint (sha256): `{data['fingerprint']}`")
    lines.append("- Full data report: [data/report.md](data/report.md)")
    return [*lines, ""]


def _params_line(train: dict[str, Any]) -> str | None:
    trainable, total = train.get("trainable_params"), train.get("total_params")
    if not _is_number(trainable):
        return None
    if _is_number(total) and total > 0:
        share = trainable / total * 100
        return f"- Trainable parameters: {_fmt_count(trainable)} of {_fmt_count(total)} ({share:.3g}%)"
    return f"- Trainable parameters: {_fmt_count(trainable)}"


def _training_section(train: dict[str, Any], loss_plot: str | None) -> list[str]:
    lines = ["## Training", ""]
    params = _params_line(train)
    lines += [params] if params else []
    if train.get("runtime_s") is not None:
        lines.append(f"- Runtime: {_fmt_duration(train['runtime_s'])}")
    if _is_number(train.get("tokens_per_s")):
        lines.append(f"- Throughput: {_fmt_num(train['tokens_per_s'])} tokens/s")
    if "train_loss" in train:
        lines.append(f"- Final train loss: {_fmt_num(train.get('train_loss'))}")
    if "eval_loss" in train:
        lines.append(f"- Final validation loss: {_fmt_num(train.get('eval_loss'))}")
    if _is_number(train.get("test_rewards/accuracies")):
        lines.append(
            f"- Test preference pairs ranked right (chosen above rejected): "
            f"{_fmt_pct(train['test_rewards/accuracies'])}, mean reward margin "
            f"{_fmt_num(train.get('test_rewards/margins'))}"
        )
    lines.append("")
    if loss_plot:
        lines += [f"![loss]({loss_plot})", ""]
    elif train.get("history") is not None:
        lines += ["No loss was logged, so there is no loss curve.", ""]
    return lines + _domain_shares_section(train.get("domain_shares") or [])


def _search_section(tune: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in (tune.get("trials") or {}).items() if n)
    lines = [
        "## Hyperparameter search",
        "",
        f"- Study `{_md_escape(tune.get('study'))}`: {counts or 'no trials'}.",
    ]
    best = tune.get("best") or (tune.get("pareto") or [None])[0]
    if best:
        params = ", ".join(f"`{k}` = {_fmt_num(v)}" for k, v in best["params"].items())
        lines.append(f"- Best trial {best['number']}: {params or 'the config as it is'}.")
    lines += [
        "- The whole search (history, importances, every trial): [tune/report.md](tune/report.md); the best "
        "trial's config, ready to train: [tune/best.yaml](tune/best.yaml).",
        "",
    ]
    return lines


def _domain_shares_section(history: list[dict[str, Any]]) -> list[str]:
    """Source shares of the dynamic mix (`data.mix.dynamic`): at the start and after each update."""
    if len(history) < 2:
        return []
    sources = list(history[0]["shares"])
    rows = [
        [_fmt_num(entry.get("step")), *(f"{entry['shares'].get(name, 0):.1%}" for name in sources)]
        for entry in history
    ]
    header = ["Step", *(_md_escape(name) for name in sources)]
    intro = "Source shares of the training mix, re-weighted from each source's validation loss:"
    return [intro, "", *_table(header, rows, "l" + "r" * len(sources)), ""]


def _metric_label(name: str) -> str:
    spec = _metric(name)
    arrow = {"lower": " ↓", "higher": " ↑"}.get(spec.better or "", "")
    return f"{_md_escape(spec.label)}{arrow}"


def _change_cell(name: str, base: Any, tuned: Any) -> str:
    change = _fmt_change(name, base, tuned)
    verdict = _verdict(name, base, tuned)
    return f"{change} ({verdict})" if verdict in ("better", "worse") else change


def _eval_table(models: dict[str, dict[str, Any]]) -> list[str]:
    names = list(models)
    compare = "base" in models and "tuned" in models
    header = ["Metric", *(_md_escape(n) for n in names), *(["Change"] if compare else [])]
    rows = []
    for metric in _ordered_metrics(list(models.values())):
        row = [_metric_label(metric), *(_fmt_value(metric, models[n].get(metric)) for n in names)]
        if compare:
            row.append(_change_cell(metric, models["base"].get(metric), models["tuned"].get(metric)))
        rows.append(row)
    return _table(header, rows, "l" + "r" * (len(header) - 1))


def _evaluation_section(evaluation: dict[str, Any], eval_plot: str | None) -> list[str]:
    models = {n: v for n, v in (evaluation.get("models") or {}).items() if isinstance(v, dict)}
    lines = ["## Evaluation", ""]
    if evaluation.get("evaluation"):  # the evaluation report's own summary: metrics with their verdicts
        from seektune.evaluate.report import eval_markdown_section

        lines += [*eval_markdown_section(evaluation["evaluation"], link_prefix="eval/"), ""]
    elif models:
        lines += [*_eval_table(models), "", "↓ lower is better, ↑ higher is better.", ""]
    if eval_plot:
        lines += [f"![eval]({eval_plot})", ""]
    return lines + _samples_section(evaluation.get("samples") or [])


def _samples_section(samples: list[dict[str, Any]]) -> list[str]:
    if not samples:
        return []
    shown = samples[:MAX_SAMPLES]
    lines = [
        "### Sample answers",
        "",
        f"The first {len(shown)} test questions; every answer is in `eval/`.",
        "",
    ]
    for index, sample in enumerate(shown, start=1):
        lines.append(f"**{index}. {_md_escape(_clip(sample.get('question')))}**")
        lines.append("")
        for key in ["reference", *(k for k in sample if k not in {"question", "reference"})]:
            if key in sample:
                text = _md_escape(_clip(sample.get(key))) or "*(empty)*"
                lines.append(f"- {key.capitalize()}: {text}")
        lines.append("")
    return lines


def _registry_section(versions: list[dict[str, Any]]) -> list[str]:
    """The versions this run registered, as a lineage line and a table, with the next commands."""
    chain = " → ".join(f"`{v['ref']}` ({v['kind']})" for v in versions)
    lines = ["## Registry", "", f"Registered: {chain}.", ""]
    rows = [
        [
            f"`{v['ref']}`",
            v["kind"],
            _fmt_value("perplexity", v["metrics"].get("perplexity")),
            f"{v['size_bytes'] / 1e6:.2f}",
        ]
        for v in versions
    ]
    lines += [*_table(["Version", "Kind", "Perplexity", "Size MB"], rows, "llrr"), ""]
    first = versions[0]["ref"]
    lines += [
        f"`seektune registry lineage {versions[-1]['ref']}` shows where it came from; "
        f"`seektune registry promote {first} staging` puts it up for an A/B test.",
        "",
    ]
    return lines


def _environment_section(run: RunDir, command: str) -> list[str]:
    lines = ["## Environment", ""]
    env = _read_environment(run)
    if env:
        packages = env.get("packages") or {}
        versions = [f"Python {env.get('python')}", f"torch {env.get('torch')}"]
        versions += [f"{name} {ver}" for name, ver in packages.items() if ver and name != "seektune"]
        lines.append(f"- Versions: {_md_escape(', '.join(versions))}")
        lines += _machine_line(env)
        if env.get("git_commit"):
            dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
            lines.append(f"- Git commit: `{env['git_commit']}`{dirty}")
        lines.append(f"- Seed: {env.get('seed')}; device: {_md_escape(env.get('device'))}")
    else:
        lines.append("- No environment.json was recorded.")
    lines += ["", "## Reproduce", "", f"The resolved config is `{run.config_path}`. Re-run it with:", ""]
    return [*lines, "```", f"seektune {command} {run.config_path}", "```", ""]


def _machine_line(env: dict[str, Any]) -> list[str]:
    gpu = env.get("cuda_device_name") or ("none" if env.get("cuda_available") is False else None)
    parts = [
        f"{label}: {_md_escape(value)}"
        for label, value in (("Platform", env.get("platform")), ("CPUs", env.get("cpu_count")), ("GPU", gpu))
        if value is not None
    ]
    return [f"- {'; '.join(parts)}"] if parts else []


def _read_environment(run: RunDir) -> dict[str, Any]:
    try:
        loaded = json.loads(run.environment_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Plots


def _new_figure(width: float, height: float) -> Figure:
    """A figure on matplotlib's Agg canvas (imported here: matplotlib takes ~0.4 s to import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if _is_number(h.get(key)) and _is_number(h.get("step"))]
    return [p[0] for p in points], [p[1] for p in points]


def _running_mean(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards zero."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def _plot_loss(history: list[dict[str, Any]], path: Path) -> bool:
    """Train loss line, validation loss points and learning rate on a twin axis; False if no loss."""
    train_x, train_y = _series(history, "loss")
    eval_x, eval_y = _series(history, "eval_loss")
    if not train_x and not eval_x:
        return False
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    handles = []
    if train_x:
        # Batches grouped by length make the logged loss saw-toothed: show it faint, and a running mean.
        ax.plot(train_x, train_y, color="tab:blue", alpha=0.25, linewidth=1)
        handles += ax.plot(
            train_x, _running_mean(train_y), color="tab:blue", label="train loss (running mean)"
        )
    if eval_x:
        handles += ax.plot(eval_x, eval_y, "o--", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_x, lr_y = _series(history, "learning_rate")
    if lr_x:
        twin = ax.twinx()
        handles += twin.plot(lr_x, lr_y, color="tab:gray", alpha=0.6, label="learning rate")
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(handles=handles, loc="upper right")
    ax.set_title("Training loss")
    _save_png(fig, path)
    return True


def _plot_eval(models: dict[str, dict[str, Any]], path: Path) -> bool:
    """One panel per metric with a bar per model; False when there is nothing to draw."""
    metrics = [m for m in _PLOTTED if any(_is_number(v.get(m)) for v in models.values())]
    if not metrics:
        return False
    fig = _new_figure(3.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = {"base": "tab:gray", "tuned": "tab:green"}
    for ax, metric in zip(axes, metrics, strict=True):
        names = [n for n, v in models.items() if _is_number(v.get(metric))]
        values = [models[n][metric] for n in names]
        spec = _metric(metric)
        scale = 100 if spec.kind == "percent" else 1
        bars = ax.bar(names, [v * scale for v in values], color=[colours.get(n, "tab:blue") for n in names])
        ax.bar_label(bars, labels=[_fmt_value(metric, v) for v in values])
        if spec.kind == "percent":
            ax.set_ylabel("%")
        ax.set_title(f"{spec.label}\n({spec.better} is better)" if spec.better else spec.label, fontsize=9)
        ax.margins(y=0.15)
    _save_png(fig, path)
    return True


def _draw_plots(run: RunDir, summary: dict[str, Any]) -> tuple[str | None, str | None]:
    """Draw the plots that the summary has data for; returns their links relative to report.md."""
    plots_link = run.plots_dir.relative_to(run.path).as_posix()
    history = (summary.get("train") or {}).get("history") or []
    loss = _plot_loss(history, run.plots_dir / LOSS_PLOT)
    evaluation = _plot_eval(_eval_models(summary), run.plots_dir / EVAL_PLOT)
    return (
        f"{plots_link}/{LOSS_PLOT}" if loss else None,
        f"{plots_link}/{EVAL_PLOT}" if evaluation else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Entry point


def render_report(run: RunDir, summary: dict[str, Any], loss_plot: str | None, eval_plot: str | None) -> str:
    """The markdown of report.md (plots are linked, not drawn, here)."""
    info = summary.get("run") or {}
    lines = [f"# seektune run: {_md_escape(info.get('name') or run.path.name)}", "", _headline(summary), ""]
    lines += _run_section(info)
    if summary.get("data"):
        lines += _data_section(summary["data"])
    if summary.get("tune"):
        lines += _search_section(summary["tune"])
    if summary.get("train"):
        lines += _training_section(summary["train"], loss_plot)
    if summary.get("continual"):
        from seektune.train.continual import continual_markdown_section

        lines += continual_markdown_section(summary["continual"])
    if summary.get("eval"):
        lines += _evaluation_section(summary["eval"], eval_plot)
    if summary.get("compress"):
        from seektune.compress.report import compress_markdown_section

        lines += compress_markdown_section(summary["compress"])
    if summary.get("registry"):
        lines += _registry_section(summary["registry"]["versions"])
    lines += _environment_section(run, info.get("command_verb", "run"))
    return "\n".join(lines).rstrip() + "\n"


def write_report(run: RunDir, summary: dict[str, Any]) -> Path:
    """Write `report.md` and its plots (`plots/loss.png`, `plots/eval.png`) into the run directory."""
    loss_plot, eval_plot = _draw_plots(run, summary)
    atomic_write_text(run.report_path, render_report(run, summary, loss_plot, eval_plot))
    return run.report_path
