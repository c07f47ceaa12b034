"""A/B comparison of two models on the same test examples: paired bootstrap over per-example statistics.

Each metric arrives as `ExampleStats` (one row of sufficient statistics per example, see `stats.py`), so a
resample is a vector of counts over the examples and its value is `reduce(counts @ stats)`: a corpus metric
(BLEU, chrF, perplexity, macro-F1) is recomputed from the summed statistics of the resampled examples,
never averaged from per-example values. Model A and model B are resampled with the same counts (paired),
which is what makes the test sensitive: the examples' own difficulty cancels out.

sacrebleu ships a paired bootstrap (`sacrebleu.significance`), but only for its own metrics and from
hypothesis strings, with a Python loop per resample; scipy's `bootstrap` resamples per-example values and
cannot reduce a corpus statistic. Neither takes our `ExampleStats`, so the resampling is ours (about
twenty lines of numpy, vectorised: a (samples, n) count matrix times the (n, k) statistics).

Definitions (B is compared with A, `diff = B - A`; d*_1..d*_S the S resampled differences, d*_(j) the
j-th smallest, confidence c, level alpha = 1 - c rounded to 12 decimals so that 0.95 gives exactly 0.05):
- p-value (two-sided paired bootstrap test, after Koehn 2004): with L = #{i : d*_i <= 0} and
  U = #{i : d*_i >= 0} (ties at 0 count on both sides), p = p(min(L, U)) where p(m) = min(1, 2 (m + 1) /
  (S + 1)). The "+1" (as in sacrebleu's `_compute_p_value`) keeps p above 0 with finitely many resamples.
  The count is taken on the side of 0 where fewer resamples lie; that is the side opposite the observed
  difference unless the resamples mostly land across 0 from it (a biased corpus metric on few examples).
- confidence interval: [d*_(k), d*_(S+1-k)], order statistics of the sorted resampled differences (no
  interpolation), where k is the number of counts m = 0, 1, ... with p(m) < alpha, evaluated with the same
  p(m). For S = 1000 and c = 0.95, k = 25: the 25th smallest and the 25th largest difference.
- verdict: "B better" when the interval excludes 0 on B's favourable side (above 0 when higher is better,
  below when lower is better), "A better" when it excludes 0 on the other side, otherwise
  "no significant difference".
These agree by construction: d*_(k) > 0 iff L < k iff p(L) < alpha, and d*_(S+1-k) < 0 iff U < k iff
p(U) < alpha (p is increasing in m); both at once is impossible, as 2k <= S <= L + U. So p < 1 - c exactly
when the interval excludes 0, i.e. when the verdict is not "no significant difference". E.g. at S = 1000,
c = 0.95: 24 resamples <= 0 give p = 50/1001 = 0.04995 and "B better", 25 give p = 52/1001 = 0.052 and no
significant difference. Too few resamples for c (k = 0: S + 1 <= 2 / alpha, where even p(0) >= alpha) is
a `UserError`. A resample whose value is NaN (0/0 in a corpus metric) makes the test undefined: the interval
is NaN, p = 1 and there is no significant difference.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from seektune.config import CompareConfig
from seektune.errors import UserError
from seektune.evaluate.stats import ExampleStats

logger = logging.getLogger(__name__)

B_BETTER = "B better"
A_BETTER = "A better"
NO_DIFFERENCE = "no significant difference"
MINUS = "−"  # U+2212, as in seektune.report

METRIC_LABELS = {
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "rouge_1": "ROUGE-1",
    "rouge_2": "ROUGE-2",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "eos_rate": "answers ending with EOS",
    "mean_new_tokens": "mean new tokens",
}
_CELLS_PER_CHUNK = 4_000_000  # resamples x examples held at once (32 MB of float64)


def metric_label(metric: str) -> str:
    """How a metric is written in sentences and tables ('rouge_l' -> 'ROUGE-L')."""
    return METRIC_LABELS.get(metric, metric)


# ---------------------------------------------------------------------------------------------------------
# Paired bootstrap


def paired_bootstrap(a: ExampleStats, b: ExampleStats, samples: int, confidence: float, seed: int) -> dict:
    """Paired bootstrap of metric B - A over the same examples (see the module docstring for definitions)."""
    if a.n != b.n:
        raise ValueError(f"{a.metric}: model A has {a.n} examples and model B {b.n}; pair the same examples")
    if a.metric != b.metric or a.higher_is_better != b.higher_is_better:
        raise ValueError(f"cannot compare {a.metric} of A with {b.metric} of B")
    if a.n == 0:
        raise ValueError(f"{a.metric}: no examples to compare")
    value_a, value_b = a.value(), b.value()
    diff = value_b - value_a
    test = bootstrap_test(_resampled_differences(a, b, samples, seed), confidence)
    return {
        "metric": a.metric,
        "a": value_a,
        "b": value_b,
        "diff": diff,
        "relative_diff": diff / abs(value_a) if value_a != 0 else None,
        "ci_low": test["ci_low"],
        "ci_high": test["ci_high"],
        "p_value": test["p_value"],
        "higher_is_better": a.higher_is_better,
        "verdict": _verdict(test["ci_low"], test["ci_high"], a.higher_is_better),
        "n": a.n,
    }


def bootstrap_test(diffs: np.ndarray, confidence: float) -> dict[str, float]:
    """{"ci_low", "ci_high", "p_value"} of resampled differences, defined so that p < 1 - confidence
    exactly when the interval excludes 0 (see the module docstring)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diffs = np.sort(np.asarray(diffs, dtype=float))
    samples, alpha = len(diffs), round(1.0 - confidence, 12)
    k = _interval_rank(samples, alpha)
    if k == 0:
        needed = math.floor(2 / alpha)
        while _count_p_value(0, needed) >= alpha:
            needed += 1
        raise UserError(
            f"{samples} bootstrap resamples cannot show a difference at {confidence:g} confidence (the "
            f"smallest p-value is 2 / {samples + 1} = {_count_p_value(0, samples):.3g}): set "
            f"eval.compare.bootstrap_samples to at least {needed} or lower eval.compare.confidence"
        )
    if np.isnan(diffs).any():
        logger.warning("paired bootstrap: a resample has no defined value (NaN); no interval or verdict")
        return {"ci_low": math.nan, "ci_high": math.nan, "p_value": 1.0}
    below, above = int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0))
    return {
        "ci_low": float(diffs[k - 1]),
        "ci_high": float(diffs[samples - k]),
        "p_value": _count_p_value(min(below, above), samples),
    }


def _count_p_value(count: int, samples: int) -> float:
    """p(m): the two-sided p-value when `count` of `samples` resamples lie on the far side of 0."""
    return min(1.0, 2.0 * (count + 1) / (samples + 1))


def _interval_rank(samples: int, alpha: float) -> int:
    """k: how many counts m = 0, 1, ... have p(m) < alpha (p grows with m, so they are 0..k-1)."""
    k = 0
    while k < samples and _count_p_value(k, samples) < alpha:
        k += 1
    return k


def _resampled_differences(a: ExampleStats, b: ExampleStats, samples: int, seed: int) -> np.ndarray:
    """B - A on `samples` resamples of the examples, the same resampled examples for both models."""
    rng = np.random.default_rng(seed)
    n = a.n
    uniform = np.full(n, 1.0 / n)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    parts = []
    for start in range(0, samples, chunk):
        # counts[s, i]: how often example i is drawn in resample s (n draws with replacement)
        counts = rng.multinomial(n, uniform, size=min(chunk, samples - start)).astype(np.float64)
        values_a = np.asarray(a.reduce(counts @ a.stats), dtype=float)
        values_b = np.asarray(b.reduce(counts @ b.stats), dtype=float)
        parts.append(values_b - values_a)
    return np.concatenate(parts)


def _verdict(ci_low: float, ci_high: float, higher_is_better: bool) -> str:
    if ci_low > 0:
        return B_BETTER if higher_is_better else A_BETTER
    if ci_high < 0:
        return A_BETTER if higher_is_better else B_BETTER
    return NO_DIFFERENCE


# ---------------------------------------------------------------------------------------------------------
# Two models, every shared metric


def compare_models(
    stats_a: dict[str, ExampleStats],
    stats_b: dict[str, ExampleStats],
    names: tuple[str, str],
    cfg: CompareConfig,
    seed: int,
    texts: dict | None = None,
) -> dict:
    """The comparison section: a paired bootstrap per metric both models have, a summary sentence, and the
    examples where one metric differs most.

    `texts` = {"metric", "prompts", "references", "a_outputs", "b_outputs"}, aligned with the examples of
    `metric`, the one the examples are ranked by (for a label metric the references are the gold labels and
    the outputs the predicted ones); without it no examples are listed. That metric is compared first and
    recorded as "examples_metric" (None without texts), so that the report labels the scores with it.
    """
    shared = [metric for metric in stats_a if metric in stats_b]
    primary = texts["metric"] if texts else None
    if primary in shared:
        shared.remove(primary)
        shared.insert(0, primary)
    metrics = {
        metric: paired_bootstrap(
            stats_a[metric], stats_b[metric], cfg.bootstrap_samples, cfg.confidence, seed
        )
        for metric in shared
    }
    examples: list[dict[str, Any]] = []
    if texts is not None and primary in shared and cfg.examples > 0:
        examples = differing_examples(stats_a[primary], stats_b[primary], texts, cfg.examples)
    return {
        "a": names[0],
        "b": names[1],
        "confidence": cfg.confidence,
        "samples": cfg.bootstrap_samples,
        "metrics": metrics,
        "summary": summary_sentence(metrics, names, cfg.confidence),
        "examples_metric": primary,
        "examples": examples,
    }


def differing_examples(a: ExampleStats, b: ExampleStats, texts: dict, count: int) -> list[dict[str, Any]]:
    """The `count` examples where the per-example metric of B and A differ most (largest |b - a| first)."""
    columns = ("prompts", "references", "a_outputs", "b_outputs")
    lengths = {column: len(texts[column]) for column in columns}
    if any(length != a.n for length in lengths.values()):
        raise ValueError(f"texts of {a.metric} must hold {a.n} entries each, got {lengths}")
    scores_a, scores_b = a.per_example(), b.per_example()
    gaps = np.nan_to_num(np.abs(scores_b - scores_a), nan=-1.0)
    order = np.argsort(-gaps, kind="stable")[:count]
    return [
        {
            "index": int(i),
            "prompt": texts["prompts"][i],
            "reference": texts["references"][i],
            "a_output": texts["a_outputs"][i],
            "b_output": texts["b_outputs"][i],
            "a_score": float(scores_a[i]),
            "b_score": float(scores_b[i]),
        }
        for i in order
    ]


# ---------------------------------------------------------------------------------------------------------
# The summary sentence


def summary_sentence(metrics: dict[str, dict], names: tuple[str, str], confidence: float) -> str:
    """'tuned is better than base on ROUGE-L (+0.091, 95% CI +0.05..+0.13); no significant difference in
    BLEU.' Metrics in the order given; significant ones carry their difference and interval."""
    a, b = names
    if not metrics:
        return f"{a} and {b} have no metric in common to compare."
    level = f"{confidence * 100:g}%"
    groups: dict[str, list[str]] = {B_BETTER: [], A_BETTER: [], NO_DIFFERENCE: []}
    for metric, result in metrics.items():
        label = metric_label(metric)
        if result["verdict"] != NO_DIFFERENCE:
            ci = f"{_signed(result['ci_low'], 2)}..{_signed(result['ci_high'], 2)}"
            label = f"{label} ({_signed(result['diff'], 3)}, {level} CI {ci})"
        groups[result["verdict"]].append(label)
    clauses = []
    if groups[B_BETTER]:
        clauses.append(f"{b} is better than {a} on {_join(groups[B_BETTER])}")
    if groups[A_BETTER]:
        clauses.append(f"{b} is worse than {a} on {_join(groups[A_BETTER])}")
    if groups[NO_DIFFERENCE]:
        prefix = "no significant difference" if clauses else f"no significant difference between {a} and {b}"
        clauses.append(f"{prefix} in {_join(groups[NO_DIFFERENCE])}")
    return "; ".join(clauses) + "."


def _signed(value: float, digits: int) -> str:
    """'+0.091', '−3.2' (typographic minus), with `digits` significant digits."""
    if not math.isfinite(value):
        return str(value)
    text = f"{abs(value):.{digits}g}"
    return f"{MINUS if value < 0 else '+'}{text}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
