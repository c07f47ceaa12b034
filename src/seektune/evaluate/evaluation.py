"""One model's whole evaluation, and the comparison of two: the order of the evaluation steps.

`evaluate_model_fully` runs, on one model: the task metrics (`metrics.task_metrics`), robustness to noisy
prompts, efficiency, attention on the prompt, the primary metric per group of a protected attribute
(fairness) and on a second domain (adaptability), then the scorecard. `finish_evaluation` compares two
models with a paired bootstrap, writes the human review sheet, `eval/results.json` and the report. Each
step lives in its own module; this one only decides what runs on which examples and where it is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seektune.config import EvalConfig
from seektune.data.encode import encode_chat, last_exchange, prompt_text
from seektune.data.prepare import PreparedData
from seektune.data.records import field_value
from seektune.evaluate.classify import (
    LABEL_METRICS,
    choice_predictions,
    classification_stats,
    label_from_text,
)
from seektune.evaluate.generate import eval_mode, generate_answers
from seektune.evaluate.metrics import TaskResult, perplexity_stats, task_metrics
from seektune.evaluate.stats import ExampleStats
from seektune.evaluate.text_metrics import REFERENCE_METRICS, text_metric_stats
from seektune.logs import log_event
from seektune.rundir import RunDir

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval/results.json"
_NO_LIMIT = 1 << 30  # robustness re-encodes whole conversations: no truncation


@dataclass
class ModelEvaluation:
    """One evaluated model: its section of `eval/results.json` and what the comparison needs."""

    name: str
    entry: dict[str, Any]
    task: TaskResult


def evaluate_model_fully(
    name: str,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    cfg: EvalConfig,
    seed: int,
    system_prompt: str | None = None,
    model_label: str = "",
    model_dirs: list[Path] | None = None,
    second_domain: PreparedData | None = None,
) -> ModelEvaluation:
    """Every dimension of the evaluation of one model on the test split (and a second domain)."""
    from seektune.evaluate.scorecard import build_scorecard

    started = time.perf_counter()
    with eval_mode(model):  # the base goes on to train afterwards: its mode is given back
        task = task_metrics(model, tokenizer, data, cfg, system_prompt, label=name, always_generate=True)
        prompts = [prompt_text(r["messages"], tokenizer, system_prompt) for r in task.records]
        entry: dict[str, Any] = {
            "model": model_label or name,
            "metrics": task.scores,
            "missing": task.missing,
            "warnings": task.warnings,
            "robustness": _robustness(model, tokenizer, task, cfg, seed, system_prompt),
            "efficiency": _efficiency(model, tokenizer, prompts, cfg, model_dirs or []),
            "explainability": _explainability(model, tokenizer, prompts, task, cfg),
            "fairness": _fairness(task, cfg),
            "adaptability": _adaptability(model, tokenizer, second_domain, cfg, system_prompt, name),
        }
    entry["scorecard"] = build_scorecard(entry, cfg)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    log_event(
        logger, f"{name} fully evaluated", seconds=entry["seconds"], overall=entry["scorecard"]["overall"]
    )
    return ModelEvaluation(name, entry, task)


# ---------------------------------------------------------------------------------------------------------
# The primary metric on any list of conversations (robustness re-scores perturbed prompts with it)


def score_conversations(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    golds: list[str],
    cfg: EvalConfig,
    system_prompt: str | None,
    choices: list[str],
) -> ExampleStats:
    """The primary metric of `conversations` (references: the last assistant turns, `golds` the labels)."""
    metric = cfg.primary()
    if metric == "perplexity":
        rows = [encode_chat(c, tokenizer, _NO_LIMIT, system_prompt)[0] for c in conversations]
        rows = [r for r in rows if r is not None]
        return perplexity_stats(model, rows, cfg.batch_size, tokenizer.pad_token_id)
    prompts = [prompt_text(c, tokenizer, system_prompt) for c in conversations]
    if metric in LABEL_METRICS and cfg.classify_by == "loglik":
        predicted: list[str | None] = list(
            choice_predictions(model, tokenizer, prompts, choices, cfg.batch_size)
        )
        return classification_stats(metric, predicted, golds, choices)
    answers = [g.text for g in generate_answers(model, tokenizer, prompts, cfg)]
    if metric in LABEL_METRICS:
        return classification_stats(metric, [label_from_text(a, choices) for a in answers], golds, choices)
    references = [last_exchange(c)[2] for c in conversations]
    return text_metric_stats(metric, answers, references, cfg.chinese_tokenization)


def _scored_records(task: TaskResult, metric: str) -> list[dict[str, Any]]:
    """The records behind the rows of `task.stats[metric]`, in order."""
    return [task.test_records[i] for i in task.test_index[metric]]


def _choices(task: TaskResult, cfg: EvalConfig) -> list[str]:
    return list(cfg.choices) if cfg.choices else sorted({r["label"] for r in task.records if r["label"]})


def _robustness(
    model: Any, tokenizer: Any, task: TaskResult, cfg: EvalConfig, seed: int, system_prompt: str | None
) -> dict[str, Any] | None:
    from seektune.evaluate.robustness import distractor_sentences, measure_robustness

    metric = cfg.primary()
    if not cfg.robustness.enabled:
        return None
    if metric not in task.stats:
        why = task.missing.get(metric, "it was not computed")
        return {"metric": metric, "score": None, "reason": f"the primary metric {metric} is missing: {why}"}
    records = [r for r in _scored_records(task, metric) if r["messages"]]
    if not records:
        return {"metric": metric, "score": None, "reason": "no test example is a conversation to perturb"}
    golds = [r["label"] for r in records]
    choices = _choices(task, cfg)  # the perturbed conversations keep their order: golds align by position
    greedy = cfg.model_copy(update={"do_sample": False})  # a drop, not sampling noise

    def score(conversations: list[list[dict[str, str]]]) -> dict[str, float]:
        stats = score_conversations(
            model, tokenizer, conversations, golds[: len(conversations)], greedy, system_prompt, choices
        )
        return {metric: stats.value()}

    distractors = distractor_sentences([last_exchange(r["messages"])[2] for r in task.records])
    return measure_robustness(
        score,
        [r["messages"] for r in records],
        None,
        cfg.robustness,
        seed,
        metric,
        task.stats[metric].higher_is_better,
        distractors,
    )


def _efficiency(
    model: Any, tokenizer: Any, prompts: list[str], cfg: EvalConfig, model_dirs: list[Path]
) -> dict[str, Any] | None:
    from seektune.evaluate.efficiency import measure_efficiency

    if not cfg.efficiency.enabled:
        return None
    if not prompts:
        return {"reason": "no test example is a conversation whose answer could be timed"}
    return measure_efficiency(model, tokenizer, prompts[: cfg.efficiency.prompts], cfg.efficiency, model_dirs)


def _explainability(
    model: Any, tokenizer: Any, prompts: list[str], task: TaskResult, cfg: EvalConfig
) -> dict[str, Any] | None:
    from seektune.evaluate.explain import attention_on_prompt

    if not cfg.explainability.enabled:
        return None
    if not task.generations:
        return {"attention_on_prompt": None, "reason": "no answer was generated (no test conversation)"}
    answers = [g.token_ids for g in task.generations]
    return attention_on_prompt(model, tokenizer, prompts, answers, cfg.explainability.max_samples)


def _fairness(task: TaskResult, cfg: EvalConfig) -> dict[str, Any] | None:
    """The primary metric in each group of `eval.fairness.attribute`, and the gap between groups.

    A record without a value for the attribute belongs to no group: it is counted under "left_out".
    """
    attribute, metric = cfg.fairness.attribute, cfg.primary()
    if attribute is None:
        return None
    if metric not in task.stats:
        why = task.missing.get(metric, "it was not computed")
        return {
            "attribute": attribute,
            "metric": metric,
            "gap": None,
            "reason": f"{metric} is missing: {why}",
        }
    stats = task.stats[metric]
    groups: dict[str, list[int]] = {}
    without = 0
    for index, record in enumerate(_scored_records(task, metric)):
        group = field_value(record, attribute)
        if group:
            groups.setdefault(group, []).append(index)
        else:
            without += 1
    kept = {g: rows for g, rows in groups.items() if len(rows) >= cfg.fairness.min_group_size}
    left_out = {g: len(rows) for g, rows in groups.items() if g not in kept}
    if without:
        left_out["(no value)"] = without
    values = {g: {"value": round(stats.value(rows), 4), "n": len(rows)} for g, rows in sorted(kept.items())}
    section: dict[str, Any] = {
        "attribute": attribute,
        "metric": metric,
        "groups": values,
        "left_out": left_out,
        "gap": None,
    }
    if not groups:
        section["reason"] = (
            f"no test example has a value for {attribute}: check the field name (records carry label, "
            "source and metadata.<key>) or unset eval.fairness.attribute"
        )
    elif len(values) < 2:
        found = ", ".join(f"{g}: {len(r)}" for g, r in sorted(groups.items()))
        section["reason"] = (
            f"fewer than 2 groups of {attribute} have {cfg.fairness.min_group_size} or more test examples "
            f"(found {found}): lower eval.fairness.min_group_size or add test data"
        )
    else:
        numbers = [v["value"] for v in values.values()]
        section["gap"] = round(max(numbers) - min(numbers), 4)
    return section


def _adaptability(
    model: Any,
    tokenizer: Any,
    second_domain: PreparedData | None,
    cfg: EvalConfig,
    system_prompt: str | None,
    name: str,
) -> dict[str, Any] | None:
    """The task metrics on the second-domain source (no robustness or efficiency there)."""
    if second_domain is None or cfg.adaptability.source is None:
        return None
    task = task_metrics(model, tokenizer, second_domain, cfg, system_prompt, label=f"{name} (second domain)")
    source = cfg.adaptability.source
    return {
        "source": source.name or source.path,
        "n": task.scores.get("n", 0),
        "metrics": task.scores,
        "missing": task.missing,
    }


# ---------------------------------------------------------------------------------------------------------
# After every model: comparison, review sheet, results and report


def finish_evaluation(
    run: RunDir, evaluated: list[ModelEvaluation], cfg: EvalConfig, seed: int
) -> dict[str, Any]:
    """Compare the first two models, write the review sheet, eval/results.json and the eval report."""
    from seektune.evaluate.report import write_eval_report

    evaluation: dict[str, Any] = {
        "primary_metric": cfg.primary(),
        "models": {e.name: e.entry for e in evaluated},
        "comparison": _comparison(evaluated, cfg, seed) if len(evaluated) >= 2 else None,
        "review": _review_sheet(run, evaluated, cfg, seed),
    }
    run.write_json(RESULTS_FILE, evaluation)
    write_eval_report(run, evaluation)
    return evaluation


def _comparison(evaluated: list[ModelEvaluation], cfg: EvalConfig, seed: int) -> dict[str, Any]:
    """A against B on every metric both have, and the examples where they differ most by the primary
    metric when it scores answers or labels, else by the first metric that does."""
    from seektune.evaluate.compare import compare_models

    a, b = evaluated[0], evaluated[1]
    shown = [
        m
        for m in (cfg.primary(), *a.task.stats)
        if m in (*REFERENCE_METRICS, *LABEL_METRICS) and m in b.task.stats
    ]
    texts = _example_texts(a.task, b.task, shown[0]) if shown else None
    return compare_models(a.task.stats, b.task.stats, (a.name, b.name), cfg.compare, seed, texts)


def _example_texts(a: TaskResult, b: TaskResult, metric: str) -> dict[str, Any]:
    """Questions, references and both models' outputs, aligned with the rows of `metric`'s statistics:
    answers for a reference metric, predicted against gold labels for a label metric."""
    exchanges = [last_exchange(r["messages"]) for r in _scored_records(a, metric)]
    if metric in LABEL_METRICS:
        references = [r["label"] for r in _scored_records(a, metric)]
        outputs = [[label or "(no label)" for label in t.predicted_labels] for t in (a, b)]
    else:
        references = [reference for _, _, reference in exchanges]
        outputs = [[g.text for g in t.generations] for t in (a, b)]
    return {
        "metric": metric,
        "prompts": [question for _, question, _ in exchanges],
        "references": references,
        "a_outputs": outputs[0],
        "b_outputs": outputs[1],
    }


def _review_sheet(run: RunDir, evaluated: list[ModelEvaluation], cfg: EvalConfig, seed: int) -> Any:
    from seektune.evaluate.review import export_review

    if not cfg.review.enabled or not evaluated or not evaluated[0].task.records:
        return None
    records = evaluated[0].task.records
    outputs = {e.name: [g.text for g in e.task.generations] for e in evaluated if e.task.generations}
    return export_review(
        run,
        [last_exchange(r["messages"])[1] for r in records],
        [last_exchange(r["messages"])[2] for r in records],
        outputs,
        cfg.review,
        seed,
    )


def import_review_scores(run: RunDir, sheet: Path) -> dict[str, Any]:
    """Read a filled-in review sheet into the run's results and re-render its eval report."""
    from seektune.errors import UserError
    from seektune.evaluate.report import write_eval_report
    from seektune.evaluate.review import import_review

    if not (run.path / RESULTS_FILE).is_file():
        raise UserError(
            f"{run.path} has no {RESULTS_FILE}: give the run directory whose evaluation wrote the sheet"
        )
    evaluation = run.read_json(RESULTS_FILE)
    scores = import_review(run, sheet)
    evaluation["review"] = {**(evaluation.get("review") or {}), "scores": scores}
    run.write_json(RESULTS_FILE, evaluation)
    write_eval_report(run, evaluation)
    return scores
