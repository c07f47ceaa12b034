"""The evaluation report's sections as blocks, in reading order: headline, models, metrics, scorecard,
robustness, efficiency, explainability, fairness, adaptability, human review, the examples where two
models differ most, and the missing metrics and warnings.

A section whose part of the evaluation dict is absent is left out; a plot is shown only when it was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any

from seektune.evaluate.report_blocks import (
    Block,
    Bullets,
    Cell,
    Code,
    Example,
    Heading,
    Image,
    Inline,
    Paragraph,
    TableBlock,
)
from seektune.evaluate.report_cells import (
    DIMENSION_LABELS,
    EVAL_DIR,
    compared_pair,
    headline,
    metric_label,
    metric_names,
    metrics_table,
    model_entries,
    model_sections,
    ordered_dimensions,
    ordered_metrics,
    overall_cell,
    primary_metric,
    signed_num,
)
from seektune.report import (
    _clip,
    _fmt_count,
    _fmt_duration,
    _fmt_num,
    _fmt_pct,
    _fmt_value,
    _is_number,
    _metric,
)

EXAMPLE_CHARS = 600  # model outputs and prompts shown per example are clipped to this many characters

_SCORECARD_NOTE = (
    "Each dimension is normalised to 0..1 (1 is best); the overall score is the weighted mean over the "
    "dimensions measured."
)
_ROBUSTNESS_NOTE = (
    "test prompts with noise on the last user message. Each cell is the drop from clean input "
    "(clean − noisy; noisy − clean for a lower-is-better metric): positive is worse; in brackets relative "
    "to the clean value."
)


def _at_rate(mapping: dict[str, Any], rate: float) -> Any:
    """`mapping[str(rate)]`, tolerant of how the rate was written as a key ('0.1', '0.10')."""
    for key, value in (mapping or {}).items():
        try:
            if math.isclose(float(key), rate):
                return value
        except ValueError:
            continue
    return None


def _ms(value: Any) -> str:
    return f"{_fmt_num(value)} ms" if _is_number(value) else "—"


def _mb(value: Any) -> str:
    return f"{_fmt_num(value)} MB" if _is_number(value) else "—"


def _models_section(evaluation: dict[str, Any]) -> list[Block]:
    rows = [
        [
            Cell(name),
            Cell(str(entry.get("model") or "—")),
            Cell(_fmt_num((entry.get("metrics") or {}).get("n"))),
            Cell(_fmt_duration(entry["seconds"]) if _is_number(entry.get("seconds")) else "—"),
        ]
        for name, entry in model_entries(evaluation).items()
    ]
    if not rows:
        return []
    return [Heading(2, "Models"), TableBlock(["Model", "Loaded", "Test examples", "Time"], rows, "llrr")]


def _metrics_section(evaluation: dict[str, Any], plots: Collection[str]) -> list[Block]:
    if not metric_names(evaluation):
        return []
    blocks: list[Block] = [Heading(2, "Metrics"), metrics_table(evaluation)]
    notes: list[Inline] = ["↓ lower is better, ↑ higher is better."]
    comparison = evaluation.get("comparison") or {}
    if compared_pair(evaluation):
        samples = comparison.get("samples")
        notes.append(
            f" Change: {comparison['b']} − {comparison['a']}, with a paired-bootstrap confidence interval"
            f"{f' ({_fmt_num(samples)} resamples)' if _is_number(samples) else ''}; a verdict where the "
            "interval excludes 0, otherwise no significant difference. Metrics without statistics show "
            "the plain difference."
        )
    blocks.append(Paragraph(notes, "note"))
    if "metrics" in plots:
        blocks.append(Image("metrics", "one panel per metric, a bar per model"))
    return blocks


def _scorecard_cell(scorecard: dict[str, Any], dim: str) -> Cell:
    entry = (scorecard.get("dimensions") or {}).get(dim)
    if not isinstance(entry, dict):
        return Cell("—")
    if not _is_number(entry.get("score")):
        return Cell(f"not measured: {entry.get('reason') or 'no value'}", "missing")
    return Cell(_fmt_num(entry["score"]))


def _scorecard_section(evaluation: dict[str, Any], plots: Collection[str]) -> list[Block]:
    cards = model_sections(evaluation, "scorecard")
    if not cards:
        return []
    dims = ordered_dimensions(cards.values())
    rows = [
        [
            Cell(DIMENSION_LABELS.get(dim, dim)),
            Cell(_fmt_num(_dimension_field(cards, dim, "weight"))),
            *(_scorecard_cell(c, dim) for c in cards.values()),
        ]
        for dim in dims
    ]
    rows.append([Cell("Overall"), Cell(""), *(overall_cell(c) for c in cards.values())])
    blocks: list[Block] = [
        Heading(2, "Scorecard"),
        TableBlock(["Dimension", "Weight", *cards], rows, "lr" + "r" * len(cards)),
        Paragraph([_SCORECARD_NOTE], "note"),
    ]
    details = [_scorecard_details(cards, dim) for dim in dims]
    blocks += [Bullets([d for d in details if d])] if any(details) else []
    return blocks + (
        [Image("scorecard", "scorecard: a bar per dimension and model")] if "scorecard" in plots else []
    )


def _dimension_field(cards: dict[str, dict[str, Any]], dim: str, key: str) -> Any:
    """`key` of dimension `dim` in the first scorecard that has it."""
    found = (((c.get("dimensions") or {}).get(dim) or {}).get(key) for c in cards.values())
    return next((value for value in found if value is not None), None)


def _scorecard_details(cards: dict[str, dict[str, Any]], dim: str) -> list[Inline]:
    """'Robustness: base …; tuned …': what each measured score stands for (empty when none says)."""
    details = [
        f"{name} {entry['detail']}"
        for name, card in cards.items()
        if _is_number((entry := (card.get("dimensions") or {}).get(dim) or {}).get("score"))
        and entry.get("detail")
    ]
    return [f"{DIMENSION_LABELS.get(dim, dim)}: {'; '.join(details)}."] if details else []


def _rates(sections: Iterable[dict[str, Any]]) -> list[float]:
    rates = {float(r) for s in sections for r in (s.get("rates") or []) if _is_number(r)}
    return sorted(rates)


def _drop_cell(section: dict[str, Any], kind: str, rate: float) -> Cell:
    drop = _at_rate((section.get("drop") or {}).get(kind) or {}, rate)
    if not _is_number(drop):
        return Cell("—")
    relative = _at_rate((section.get("relative_drop") or {}).get(kind) or {}, rate)
    return Cell(signed_num(drop) + (f" ({_fmt_pct(relative)})" if _is_number(relative) else ""))


def _robustness_section(evaluation: dict[str, Any], plots: Collection[str]) -> list[Block]:
    sections = model_sections(evaluation, "robustness")
    if not sections:
        return []
    first = next(iter(sections.values()))
    metric = first.get("metric") or primary_metric(evaluation) or ""
    rates = _rates(sections.values())
    kinds = list(dict.fromkeys(k for s in sections.values() for k in (s.get("drop") or {})))
    blocks: list[Block] = [
        Heading(2, "Robustness"),
        Paragraph([f"{_metric(metric).label} on the first {_fmt_num(first.get('n'))} {_ROBUSTNESS_NOTE}"]),
    ]
    if kinds and rates:
        rows = [
            [Cell(kind), Cell(name), *(_drop_cell(s, kind, rate) for rate in rates)]
            for kind in kinds
            for name, s in sections.items()
            if kind in (s.get("drop") or {})
        ]
        header = ["Noise", "Model", *(f"Drop at {_fmt_pct(rate)}" for rate in rates)]
        blocks.append(TableBlock(header, rows, "ll" + "r" * len(rates)))
    blocks.append(Bullets(_robustness_notes(sections, metric)))
    if "robustness" in plots:
        blocks.append(Image("robustness", f"{_metric(metric).label} against noise rate"))
    return blocks + _noise_examples(first)


def _robustness_notes(sections: dict[str, dict[str, Any]], metric: str) -> list[list[Inline]]:
    notes: list[list[Inline]] = []
    for name, section in sections.items():
        clean = (section.get("clean") or {}).get(metric)
        score = section.get("score")
        why = section.get("reason") or "no kind changed any prompt"
        score_text = _fmt_num(score) if _is_number(score) else f"not measured ({why})"
        notes.append(
            [
                f"{name}: clean {_metric(metric).label} {_fmt_num(clean)}; robustness score {score_text} "
                "(mean over kinds and rates of noisy / clean, capped at 1; 1 = unaffected)."
            ]
        )
        notes += [[f"{name}: {kind} skipped: {why}."] for kind, why in (section.get("skipped") or {}).items()]
    return notes


def _noise_examples(section: dict[str, Any]) -> list[Block]:
    examples = [e for e in section.get("examples") or [] if isinstance(e, dict)]
    blocks: list[Block] = [
        Example(
            f"{e.get('kind')} at {_fmt_pct(e.get('rate'))}",
            [
                ("Clean", _clip(e.get("clean"), EXAMPLE_CHARS)),
                ("Noisy", _clip(e.get("noisy"), EXAMPLE_CHARS)),
            ],
        )
        for e in examples
    ]
    return [Heading(3, "Noise examples"), *blocks] if blocks else []


_EFFICIENCY_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("Device", lambda e: str(e.get("device") or "—")),
    (
        "Time to first token (median / p90)",
        lambda e: f"{_ms(e.get('ttft_ms'))} / {_ms(e.get('ttft_ms_p90'))}",
    ),
    (
        "Per-token latency (median / p90)",
        lambda e: f"{_ms(e.get('ms_per_token'))} / {_ms(e.get('ms_per_token_p90'))}",
    ),
    ("Tokens/s, batch 1", lambda e: _fmt_num(e.get("tokens_per_s_batch1"))),
    ("Tokens/s, batched", lambda e: _batched(e)),
    ("Peak memory", lambda e: _peak_memory(e)),
    ("Size on disk", lambda e: _mb(e.get("size_on_disk_mb"))),
    ("Parameters", lambda e: _fmt_count(e.get("parameters"))),
]


def _batched(section: dict[str, Any]) -> str:
    value = _fmt_num(section.get("tokens_per_s_batched"))
    size = section.get("batch_size")
    return f"{value} (batch {_fmt_num(size)})" if _is_number(size) and value != "—" else value


def _peak_memory(section: dict[str, Any]) -> str:
    peak, before = section.get("peak_memory_mb"), section.get("memory_before_mb")
    if _is_number(peak) and _is_number(before):
        return f"{_mb(peak)} ({signed_num(peak - before)} MB over {_mb(before)} before)"
    return _mb(peak)


def _efficiency_section(evaluation: dict[str, Any], plots: Collection[str]) -> list[Block]:
    sections = model_sections(evaluation, "efficiency")
    if not sections:
        return []
    rows = [[Cell(label), *(Cell(value(s)) for s in sections.values())] for label, value in _EFFICIENCY_ROWS]
    first = next(iter(sections.values()))
    how = (
        f"Greedy decoding of exactly {_fmt_num(first.get('new_tokens'))} new tokens for each of "
        f"{_fmt_num(first.get('prompts'))} test prompts, one at a time (latency) and batched (throughput)."
    )
    blocks: list[Block] = [
        Heading(2, "Efficiency"),
        Paragraph([how]),
        TableBlock(["Measure", *sections], rows, "l" + "r" * len(sections)),
    ]
    folders: list[list[Inline]] = [
        [f"{name}: {folder} {_mb(mb)}"]
        for name, s in sections.items()
        for folder, mb in (s.get("size_on_disk") or {}).items()
    ]
    if folders:
        blocks += [Paragraph(["Weight files on disk:"], "note"), Bullets(folders)]
    return blocks + ([Image("latency", "latency distribution per model")] if "latency" in plots else [])


def _explainability_section(evaluation: dict[str, Any]) -> list[Block]:
    sections = model_sections(evaluation, "explainability")
    if not sections:
        return []
    rows = []
    for name, section in sections.items():
        value = section.get("attention_on_prompt")
        if not _is_number(value):
            reason = Cell(f"not measured: {section.get('reason') or 'no value'}", "missing")
            rows.append([Cell(name), reason, Cell("—"), Cell("—")])
            continue
        layers = ", ".join(_fmt_num(v) for v in section.get("per_layer") or [])
        rows.append(
            [Cell(name), Cell(_fmt_num(value)), Cell(_fmt_num(section.get("n"))), Cell(layers or "—")]
        )
    method = next((s["method"] for s in sections.values() if s.get("method")), None)
    text = "Where the model looks while it writes its answer: the " + (
        str(method) if method else "share of attention from answer tokens to prompt tokens"
    )
    return [
        Heading(2, "Explainability"),
        Paragraph([text + "."]),
        TableBlock(["Model", "Attention on prompt", "Examples", "Per layer"], rows, "lrrr"),
    ]


def _fairness_section(evaluation: dict[str, Any]) -> list[Block]:
    sections = model_sections(evaluation, "fairness")
    if not sections:
        return []
    first = next(iter(sections.values()))
    metric = first.get("metric") or primary_metric(evaluation) or ""
    groups = list(dict.fromkeys(g for s in sections.values() for g in (s.get("groups") or {})))
    rows = []
    for group in groups:
        found = [s["groups"][group] for s in sections.values() if group in (s.get("groups") or {})]
        cells = [_group_value(s, group, metric) for s in sections.values()]
        rows.append([Cell(str(group)), Cell(_fmt_num(found[0].get("n"))), *cells])
    rows.append(
        [Cell("Gap (max − min)"), Cell(""), *(Cell(_fmt_num(s.get("gap"))) for s in sections.values())]
    )
    text = f"{_metric(metric).label} per group of the test examples' "
    blocks: list[Block] = [
        Heading(2, "Fairness"),
        Paragraph([text, Code(str(first.get("attribute"))), "; a smaller gap is fairer."]),
        TableBlock(["Group", "Examples", *sections], rows, "lr" + "r" * len(sections)),
    ]
    left_out = first.get("left_out") or {}
    if left_out:
        groups_text = ", ".join(f"{g} ({_fmt_num(n)})" for g, n in left_out.items())
        blocks.append(Paragraph([f"Left out, with too few test examples: {groups_text}."], "note"))
    reasons = dict.fromkeys(
        str(s["reason"]) for s in sections.values() if not _is_number(s.get("gap")) and s.get("reason")
    )
    return blocks + [Paragraph([f"No gap: {reason}."], "note") for reason in reasons]


def _group_value(section: dict[str, Any], group: str, metric: str) -> Cell:
    value = ((section.get("groups") or {}).get(group) or {}).get("value")
    return Cell(_fmt_value(metric, value)) if _is_number(value) else Cell("—")


def _adaptability_section(evaluation: dict[str, Any]) -> list[Block]:
    sections = model_sections(evaluation, "adaptability")
    if not sections:
        return []
    models = model_entries(evaluation)
    first = next(iter(sections.values()))
    names = ordered_metrics(
        [k for s in sections.values() for k, v in (s.get("metrics") or {}).items() if _is_number(v)]
        + [k for s in sections.values() for k in s.get("missing") or {}]
    )
    rows = [
        [Cell(metric_label(m)), *(_shifted_cell(s, models[name], m) for name, s in sections.items())]
        for m in names
        if m != "n"
    ]
    text = f"The same metrics on a second domain, source {first.get('source')} ({_fmt_num(first.get('n'))} "
    return [
        Heading(2, "Adaptability"),
        Paragraph([text + "examples); in brackets the value on the test split."]),
        TableBlock(["Metric", *sections], rows, "l" + "r" * len(sections)),
    ]


def _shifted_cell(section: dict[str, Any], entry: dict[str, Any], metric: str) -> Cell:
    reason = (section.get("missing") or {}).get(metric)
    if reason is not None:
        return Cell(f"missing: {reason}", "missing")
    value = (section.get("metrics") or {}).get(metric)
    if not _is_number(value):
        return Cell("—")
    home = (entry.get("metrics") or {}).get(metric)
    in_domain = f" ({_fmt_value(metric, home)})" if _is_number(home) else ""
    return Cell(_fmt_value(metric, value) + in_domain)


def _review_parts(review: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(export, scores): the sheet written, and the imported scores, in whichever form the dict holds them."""
    scores = review.get("scores") if isinstance(review.get("scores"), dict) else None
    if scores is None and isinstance(review.get("models"), dict):
        scores = review
    export = review.get("export") if isinstance(review.get("export"), dict) else None
    if export is None and isinstance(review.get("models"), list):
        export = review
    return export, scores


def _review_section(review: dict[str, Any] | None, run_ref: str) -> list[Block]:
    if not isinstance(review, dict):
        return []
    export, scores = _review_parts(review)
    blocks: list[Block] = [Heading(2, "Human review")]
    if scores:
        rows = [
            [
                Cell(name),
                Cell(_fmt_num(s.get("mean"))),
                Cell(_fmt_num(s.get("n"))),
                Cell(_fmt_pct(s.get("win_rate"))),
            ]
            for name, s in (scores.get("models") or {}).items()
            if isinstance(s, dict)
        ]
        rated = f"{_fmt_num(scores.get('rated_rows'))} of {_fmt_num(scores.get('rows'))} rows rated"
        blocks += [
            Paragraph([f"Blinded reviewer scores (1-5), {rated}, from {scores.get('sheet')}."]),
            TableBlock(["Model", "Mean score", "Rated", "Win rate"], rows, "lrrr"),
        ]
    elif export:
        sheet = str(export.get("sheet") or f"{EVAL_DIR}/review.csv")
        count = len(export.get("models") or []) or "N"
        blocks.append(
            Paragraph(
                [
                    f"Sheet written to {sheet}: fill score_1..{count} (1-5) and run ",
                    Code(f"seektune review import {run_ref} SHEET"),
                    ".",
                ]
            )
        )
    else:
        return []
    return blocks


def _examples_section(comparison: dict[str, Any] | None) -> list[Block]:
    """The examples the comparison ranked by its `examples_metric` (not necessarily the primary metric),
    each titled with that metric's per-example value under A and B."""
    if not isinstance(comparison, dict) or not comparison.get("examples"):
        return []
    a, b = str(comparison.get("a")), str(comparison.get("b"))
    metric = comparison.get("examples_metric")
    label = _metric(metric).label if metric else "score"
    blocks: list[Block] = [
        Heading(2, f"Where {a} and {b} differ most"),
        Paragraph(
            [
                f"The test examples whose {label} differs most between the two models, largest difference "
                f"first; each title gives the example's own {label} under each model."
            ]
        ),
    ]
    for example in comparison["examples"]:
        scores = f"{a} {_fmt_num(example.get('a_score'))}, {b} {_fmt_num(example.get('b_score'))}"
        fields = [
            ("Prompt", example.get("prompt")),
            ("Reference", example.get("reference")),
            (a, example.get("a_output")),
            (b, example.get("b_output")),
        ]
        clipped = [(k, _clip(v, EXAMPLE_CHARS) or "(empty)") for k, v in fields]
        blocks.append(Example(f"Example {example.get('index')}, {label}: {scores}", clipped))
    return blocks


def _problems_section(evaluation: dict[str, Any]) -> list[Block]:
    items: list[list[Inline]] = []
    for name, entry in model_entries(evaluation).items():
        items += [
            [f"{name}: {_metric(m).label} missing: {why}"] for m, why in (entry.get("missing") or {}).items()
        ]
        items += [[f"{name}: {warning}"] for warning in entry.get("warnings") or []]
    items += [[str(warning)] for warning in evaluation.get("warnings") or []]
    body: Block = Bullets(items) if items else Paragraph(["No metric is missing and nothing was flagged."])
    return [Heading(2, "Missing metrics and warnings"), body]


def document_blocks(evaluation: dict[str, Any], plots: Collection[str], run_ref: str) -> list[Block]:
    """The whole report as blocks, in reading order."""
    return [
        Paragraph([headline(evaluation)], "headline"),
        *_models_section(evaluation),
        *_metrics_section(evaluation, plots),
        *_scorecard_section(evaluation, plots),
        *_robustness_section(evaluation, plots),
        *_efficiency_section(evaluation, plots),
        *_explainability_section(evaluation),
        *_fairness_section(evaluation),
        *_adaptability_section(evaluation),
        *_review_section(evaluation.get("review"), run_ref),
        *_examples_section(evaluation.get("comparison")),
        *_problems_section(evaluation),
    ]
