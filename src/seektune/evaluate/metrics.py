"""Task metrics of one model on the test split, each kept as per-example sufficient statistics.

Every metric returns an `ExampleStats` (see `stats.py`), so the value over any subset of the examples,
per group, or in a bootstrap resample is a reduce of summed rows, without scoring text again:

- perplexity: `(nll_sum, tokens)` per example over the answer tokens (the labels that are not -100,
  end-of-sentence included), so it measures exactly what training optimises; reduce `exp(nll / tokens)`.
- the reference metrics (exact_match, token_f1, ROUGE, BLEU, chrF) of generated answers: `text_metrics.py`.
- the label metrics (accuracy, macro_f1): `classify.py`.

`task_metrics` computes every requested metric of one model: answers generated with `generate.py`, where
`eos_rate` is the share of answers that produced the end-of-sentence token before `max_new_tokens`, the
check that a tuned model has learnt to stop. The per-example statistics and their reduces are ours: no
library keeps these metrics in a form that can be summed over examples and reduced again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seektune.config import EvalConfig
from seektune.data.prepare import IGNORE_INDEX, PreparedData, last_exchange, prompt_text
from seektune.evaluate.classify import (
    LABEL_METRICS,
    choice_predictions,
    classification_stats,
    label_from_text,
)
from seektune.evaluate.generate import Generation, eval_mode, generate_answers
from seektune.evaluate.stats import ExampleStats
from seektune.evaluate.text_metrics import REFERENCE_METRICS, ROUGE_TYPES, rouge_stats, text_metric_stats
from seektune.logs import log_event, progress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Perplexity


def perplexity_reduce(total: np.ndarray) -> np.ndarray:
    """exp(nll / tokens) of summed `(nll_sum, tokens)` statistics, over `(..., 2)`."""
    total = np.asarray(total, dtype=float)
    return np.exp(total[..., 0] / np.maximum(total[..., 1], 1.0))


@torch.no_grad()
def perplexity_stats(
    model: Any, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int
) -> ExampleStats:
    """Per-example `(summed NLL, label tokens)` of `rows` (right-padded batches); reduce: perplexity."""
    stats = np.zeros((len(rows), 2))
    with eval_mode(model), progress("perplexity", total=len(rows)) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            stats[start : start + len(batch)] = _batch_nll(model, batch, pad_id)
            bar.advance(len(batch))
    return ExampleStats("perplexity", stats, perplexity_reduce, higher_is_better=False)


def perplexity(model: Any, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> float:
    """exp(mean NLL) over every label token of `rows` (right-padded batches)."""
    return perplexity_stats(model, rows, batch_size, pad_id).value()


def _batch_nll(model: Any, batch: list[dict[str, list[int]]], pad_id: int) -> np.ndarray:
    """(len(batch), 2): each row's summed NLL of its label tokens, and how many there are."""
    device = next(model.parameters()).device
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    targets = labels[:, 1:].to(device)  # position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1), 0 where ignored
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return torch.stack([nll.double().sum(dim=1), counts.double()], dim=1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# The entry point: every requested metric of one model on the test split


@dataclass
class TaskResult:
    """Task metrics of one model on the first N test examples."""

    stats: dict[str, ExampleStats]  # metric -> stats over the examples it applies to
    scores: dict[str, float]  # metric -> value, plus n, eos_rate, mean_new_tokens
    missing: dict[str, str]  # metric -> why it could not be computed
    warnings: list[str]
    generations: list[Generation]  # one per conversation record, in order (empty when none generated)
    records: list[dict]  # the conversation records evaluated (same order)
    test_records: list[dict] = field(default_factory=list)  # every evaluated test record (perplexity's rows)
    # metric -> for each stats row, its index in test_records: perplexity covers every test row, the
    # reference metrics the conversations (= records), the label metrics the labelled conversations.
    test_index: dict[str, list[int]] = field(default_factory=dict)
    # the label predicted for each labelled conversation (None: no choice found), in test_index order
    predicted_labels: list[str | None] = field(default_factory=list)


def _needs_generation(cfg: EvalConfig) -> bool:
    by_generation = cfg.classify_by == "generate" and any(m in LABEL_METRICS for m in cfg.metrics)
    return by_generation or any(m in REFERENCE_METRICS for m in cfg.metrics)


def task_metrics(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    cfg: EvalConfig,
    system_prompt: str | None = None,
    label: str = "model",
    max_samples: int | None = None,
    always_generate: bool = False,
) -> TaskResult:
    """cfg.metrics of `model` on the first `max_samples` (default cfg.max_samples) test examples.

    Perplexity covers every test row; answers are generated for the conversations among them when a
    metric needs them (reference metrics, labels read from answers) or `always_generate` is set (for
    eos_rate and mean_new_tokens alone). A metric that cannot be computed is named in `missing` with the
    reason, never scored 0.
    """
    limit = max_samples or cfg.max_samples
    limit = min(len(data.records["test"]), limit or len(data.records["test"]))
    rows = list(data.tokenized["test"].select(range(limit)))
    evaluated = list(data.records["test"].select(range(limit)))
    conversations = [i for i, record in enumerate(evaluated) if record["messages"]]
    result = TaskResult({}, {"n": len(rows)}, {}, [], [], [evaluated[i] for i in conversations], evaluated)
    if not rows:
        result.missing = {
            m: "the test split is empty: add data or raise data.test_ratio (for a second domain: give "
            "eval.adaptability.source a file with examples)"
            for m in cfg.metrics
        }
        return result
    started = time.perf_counter()
    with eval_mode(model):
        if "perplexity" in cfg.metrics:
            result.stats["perplexity"] = perplexity_stats(model, rows, cfg.batch_size, tokenizer.pad_token_id)
            result.test_index["perplexity"] = list(range(len(rows)))
        prompts = [prompt_text(r["messages"], tokenizer, system_prompt) for r in result.records]
        if result.records and (always_generate or _needs_generation(cfg)):
            result.generations = generate_answers(model, tokenizer, prompts, cfg)
        _reference_metrics(result, cfg, conversations, evaluated)
        _label_metrics(result, model, tokenizer, prompts, cfg, conversations, evaluated)
    _summarise(result, label)
    log_event(logger, f"{label} evaluated", **result.scores, seconds=round(time.perf_counter() - started, 2))
    for warning in result.warnings:
        logger.warning(warning)
    return result


def _reference_metrics(
    result: TaskResult, cfg: EvalConfig, conversations: list[int], evaluated: list[dict]
) -> None:
    """Generated answers against the last assistant answers of the conversations."""
    wanted = [m for m in cfg.metrics if m in REFERENCE_METRICS]
    if not wanted:
        return
    if not result.records:
        kind = "documents only (no conversations)" if evaluated else "no examples"
        reason = (
            f"needs reference answers, but the test split holds {kind}: give the test split conversations "
            "with assistant answers, or remove the metric from eval.metrics"
        )
        result.missing.update(dict.fromkeys(wanted, reason))
        return
    predictions = [g.text for g in result.generations]
    references = [last_exchange(r["messages"])[2] for r in result.records]
    chinese = cfg.chinese_tokenization
    rouge = [m for m in wanted if m in ROUGE_TYPES]
    computed = rouge_stats(rouge, predictions, references, chinese) if rouge else {}
    for metric in wanted:
        if metric not in computed:
            computed[metric] = text_metric_stats(metric, predictions, references, chinese)
        result.stats[metric] = computed[metric]
        result.test_index[metric] = list(conversations)


def _label_metrics(
    result: TaskResult,
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: EvalConfig,
    conversations: list[int],
    evaluated: list[dict],
) -> None:
    """accuracy and macro_f1 of the labels predicted for the labelled conversations."""
    wanted = [m for m in cfg.metrics if m in LABEL_METRICS]
    if not wanted:
        return
    labelled = [j for j, record in enumerate(result.records) if record["label"]]
    if not labelled:
        result.missing.update(dict.fromkeys(wanted, _no_label_reason(evaluated)))
        return
    gold = [result.records[j]["label"] for j in labelled]
    choices = list(dict.fromkeys(cfg.choices)) if cfg.choices else sorted(set(gold))
    if cfg.classify_by == "loglik" and len(choices) < 2:
        reason = (
            f"eval.classify_by loglik needs at least 2 choices, but there is {len(choices)} "
            f"({', '.join(choices)}): list the labels in eval.choices or set eval.classify_by: generate"
        )
        result.missing.update(dict.fromkeys(wanted, reason))
        return
    if cfg.classify_by == "loglik":
        predicted: list[str | None] = list(
            choice_predictions(model, tokenizer, [prompts[j] for j in labelled], choices, cfg.batch_size)
        )
    else:
        predicted = [label_from_text(result.generations[j].text, choices) for j in labelled]
    _label_warnings(result, gold, predicted, choices, cfg)
    result.predicted_labels = predicted
    for metric in wanted:
        result.stats[metric] = classification_stats(metric, predicted, gold, choices)
        result.test_index[metric] = [conversations[j] for j in labelled]


def _no_label_reason(evaluated: list[dict]) -> str:
    if any(record["label"] for record in evaluated):
        return (
            "only test documents have labels, and classification needs a prompt: give the test split "
            "conversations with a label (data.sources[].fields.label)"
        )
    return "no test example has a label: map a label column (data.sources[].fields.label)"


def _label_warnings(
    result: TaskResult, gold: list[str], predicted: list[str | None], choices: list[str], cfg: EvalConfig
) -> None:
    unknown = Counter(label for label in gold if label not in choices)
    if cfg.choices and unknown:
        names = ", ".join(sorted(unknown))
        result.warnings.append(
            f"{sum(unknown.values())} of {len(gold)} test labels are not in eval.choices ({names}): "
            "they can never be predicted; add them to eval.choices"
        )
    unread = sum(p is None for p in predicted)
    if unread:
        result.warnings.append(f"{unread} of {len(predicted)} answers name none of the choices")


def _summarise(result: TaskResult, label: str) -> None:
    """Scores from the statistics, eos_rate and mean_new_tokens from the answers, empty-answer warnings."""
    for metric, stats in result.stats.items():
        if stats.n == 0:
            result.missing[metric] = "no test example to compute it on"
            continue
        result.scores[metric] = round(stats.value(), 4)
    result.stats = {m: s for m, s in result.stats.items() if s.n}
    generations = result.generations
    if generations:
        result.scores["eos_rate"] = round(sum(g.ended_with_eos for g in generations) / len(generations), 4)
        result.scores["mean_new_tokens"] = round(sum(g.new_tokens for g in generations) / len(generations), 2)
        empty = sum(not g.text.strip() for g in generations)
        if empty:
            result.warnings.insert(0, f"{empty} of {len(generations)} answers are empty")
    for warning in result.warnings:  # the report names the model beside each one
        logger.warning("%s: %s", label, warning)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    cfg: EvalConfig,
    system_prompt: str | None = None,
    label: str = "model",
) -> tuple[dict[str, float], list[Generation]]:
    """Scores of `model` on the test split and its generated answers (conversations only).

    The scores of `task_metrics`; answers are always generated for the conversations, so eos_rate and
    mean_new_tokens are there whatever the metrics.
    """
    result = task_metrics(model, tokenizer, data, cfg, system_prompt, label, always_generate=True)
    return result.scores, result.generations
