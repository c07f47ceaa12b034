"""The scorecard of one model: six dimensions, each normalised to 0..1, and their weighted overall score.

- accuracy: the primary metric (`EvalConfig.primary()`); for perplexity 1 / perplexity, the geometric-mean
  probability the model gives a reference token.
- robustness: the robustness section's score (mean of min(1, noisy / clean) over kinds and rates).
- efficiency: min(1, eval.efficiency.latency_budget_ms / measured ms per token at batch 1).
- explainability: the share of answer-token attention on the prompt.
- fairness: 1 - the gap (max - min) of the primary metric across groups; for perplexity the relative gap
  (max - min) / max, as perplexities are not bounded by 1.
- adaptability: the primary metric on the second-domain source (1 / perplexity likewise).

A dimension without a measurement is "not measured", with the reason and the config key that turns it on;
it never gets a made-up number. The overall score renormalises the weights over the measured dimensions.
No evaluation library defines such a scorecard, so it is ours.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from seektune.config import SCORECARD_DIMENSIONS, EvalConfig
from seektune.evaluate.compare import metric_label

_Score = tuple[float | None, str | None, str | None]  # (score, detail, reason)
_UNBOUNDED = ("perplexity",)  # metrics that are not fractions in 0..1
_PERPLEXITY_MEANING = "the geometric-mean probability of a reference token"


def build_scorecard(entry: dict, cfg: EvalConfig) -> dict:
    """The scorecard section of one model's evaluation entry."""
    primary = cfg.primary()
    measured = {
        "accuracy": _accuracy(entry, primary),
        "robustness": _robustness(entry.get("robustness"), cfg),
        "efficiency": _efficiency(entry.get("efficiency"), cfg),
        "explainability": _explainability(entry.get("explainability"), cfg),
        "fairness": _fairness(entry.get("fairness"), primary),
        "adaptability": _adaptability(entry.get("adaptability"), primary),
    }
    dimensions = {}
    for dim in SCORECARD_DIMENSIONS:
        score, detail, reason = measured[dim]
        weight = float(cfg.scorecard.weights.get(dim, 0.0))
        dimensions[dim] = {"score": score, "weight": weight, "detail": detail, "reason": reason}
    return {"dimensions": dimensions, **_overall(dimensions)}


def _overall(dimensions: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    measured = [d for d in dimensions.values() if d["score"] is not None and d["weight"] > 0]
    weight_measured = sum(d["weight"] for d in measured)
    weight_all = sum(d["weight"] for d in dimensions.values())
    overall = sum(d["weight"] * d["score"] for d in measured) / weight_measured if weight_measured else None
    return {"overall": overall, "weight_measured": weight_measured / weight_all if weight_all else 0.0}


def _number(value: Any) -> float | None:
    """A finite real number, else None (missing values, NaN, strings)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metric_score(metric: str, value: float) -> tuple[float, str]:
    """A metric value as a 0..1 score and how it was obtained."""
    label = metric_label(metric)
    if metric == "perplexity":
        if value <= 0:
            raise ValueError(f"perplexity must be positive, got {value}")
        return 1.0 / value, f"1/{label} = 1/{value:.3g} = {1 / value:.3g}, {_PERPLEXITY_MEANING}"
    return value, f"{label} {value:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The six dimensions


def _accuracy(entry: dict, primary: str) -> _Score:
    value = _number((entry.get("metrics") or {}).get(primary))
    if value is None:
        why = (entry.get("missing") or {}).get(primary) or "it was not computed"
        return (
            None,
            None,
            f"the primary metric {primary} is missing: {why} (eval.metrics, eval.primary_metric)",
        )
    score, detail = _metric_score(primary, value)
    return score, detail, None


def _robustness(section: dict | None, cfg: EvalConfig) -> _Score:
    if section is None:
        return None, None, _off_reason("robustness", cfg.robustness.enabled, "eval.robustness.enabled")
    score = _number(section.get("score"))
    if score is None and section.get("reason"):
        return None, None, f"{section['reason']} (eval.robustness)"
    if score is None:
        skipped = "; ".join(f"{kind}: {why}" for kind, why in (section.get("skipped") or {}).items())
        why = (
            f"no perturbation could be measured ({skipped})"
            if skipped
            else "no perturbation could be measured"
        )
        return None, None, f"{why} (eval.robustness.perturbations)"
    kinds = len(section.get("drop") or {})
    rates = len(section.get("rates") or [])
    metric = metric_label(section.get("metric") or cfg.primary())
    detail = (
        f"{metric} under noise relative to clean input: {score:.3g} "
        f"(mean of min(1, noisy/clean) over {kinds} kinds × {rates} rates)"
    )
    return score, detail, None


def _efficiency(section: dict | None, cfg: EvalConfig) -> _Score:
    if section is None:
        return None, None, _off_reason("efficiency", cfg.efficiency.enabled, "eval.efficiency.enabled")
    ms = _number(section.get("ms_per_token"))
    if (ms is None or ms <= 0) and section.get("reason"):
        return None, None, f"{section['reason']} (eval.efficiency)"
    if ms is None or ms <= 0:
        return None, None, "the efficiency section has no per-token latency (ms_per_token) (eval.efficiency)"
    budget = cfg.efficiency.latency_budget_ms
    score = min(1.0, budget / ms)
    return score, f"{ms:.3g} ms per token at batch 1, budget {budget:g} ms", None


def _explainability(section: dict | None, cfg: EvalConfig) -> _Score:
    if section is None:
        reason = _off_reason("explainability", cfg.explainability.enabled, "eval.explainability.enabled")
        return None, None, reason
    share = _number(section.get("attention_on_prompt"))
    if share is None:
        why = section.get("reason") or "no attention weights were returned"
        return None, None, f"the model's attention could not be read: {why}"
    n = section.get("n")
    return (
        share,
        f"{share:.0%} of answer-token attention on the prompt" + (f" ({n} examples)" if n else ""),
        None,
    )


def _fairness(section: dict | None, primary: str) -> _Score:
    if section is None:
        return (
            None,
            None,
            "set eval.fairness.attribute to a record field (e.g. metadata.gender) to measure it",
        )
    metric = section.get("metric") or primary
    values = [_number((g or {}).get("value")) for g in (section.get("groups") or {}).values()]
    values = [v for v in values if v is not None]
    if len(values) < 2:
        why = section.get("reason") or "fewer than two groups with enough test examples"
        return None, None, f"{why} (eval.fairness.attribute, eval.fairness.min_group_size)"
    high, low = max(values), min(values)
    attribute = section.get("attribute") or "the attribute"
    if metric in _UNBOUNDED:
        gap = (high - low) / high if high > 0 else 0.0
        detail = (
            f"relative {metric_label(metric)} gap {gap:.3g} ((max − min) / max) "
            f"across {len(values)} groups of {attribute}"
        )
    else:
        gap = _number(section.get("gap"))
        gap = high - low if gap is None else gap
        detail = (
            f"{metric_label(metric)} gap {gap:.3g} (max − min) across {len(values)} groups of {attribute}"
        )
    return 1.0 - gap, detail, None


def _adaptability(section: dict | None, primary: str) -> _Score:
    if section is None:
        return None, None, "set eval.adaptability.source to a data source of another domain to measure it"
    value = _number((section.get("metrics") or {}).get(primary))
    source = section.get("source") or "the second domain"
    if value is None:
        why = (section.get("missing") or {}).get(primary) or section.get("reason") or "it was not computed"
        return None, None, f"{primary} on {source} is missing: {why} (eval.adaptability.source)"
    score, detail = _metric_score(primary, value)
    return score, f"{detail} on {source}", None


def _off_reason(name: str, enabled: bool, key: str) -> str:
    if not enabled:
        return f"turned off: set {key} to true to measure {name}"
    return f"no {name} result was recorded although {key} is on"
