"""The weighted scorecard of one model's evaluation entry."""

from __future__ import annotations

import pytest

from seektune.config import EvalConfig
from seektune.evaluate.scorecard import build_scorecard


def _full_entry() -> dict:
    return {
        "model": "tiny",
        "metrics": {"perplexity": 12.5, "rouge_l": 0.4, "eos_rate": 0.9, "n": 20},
        "missing": {},
        "robustness": {
            "metric": "rouge_l",
            "rates": [0.1, 0.2],
            "drop": {"typo": {}, "casing": {}},
            "score": 0.8,
        },
        "efficiency": {"ms_per_token": 100.0},
        "explainability": {"attention_on_prompt": 0.6, "n": 16},
        "fairness": {
            "attribute": "metadata.gender",
            "metric": "rouge_l",
            "groups": {"f": {"value": 0.45, "n": 10}, "m": {"value": 0.35, "n": 10}},
            "gap": 0.1,
        },
        "adaptability": {"source": "law", "n": 20, "metrics": {"rouge_l": 0.3, "perplexity": 20.0}},
    }


def _cfg(**kwargs) -> EvalConfig:
    return EvalConfig(metrics=["perplexity", "rouge_l"], **kwargs)


def test_full_entry_by_hand():
    card = build_scorecard(_full_entry(), _cfg())
    dims = card["dimensions"]
    expected = {
        "accuracy": 0.4,
        "robustness": 0.8,
        "efficiency": 0.5,  # budget 50 ms / 100 ms
        "explainability": 0.6,
        "fairness": 0.9,  # 1 - gap 0.1
        "adaptability": 0.3,
    }
    assert {dim: d["score"] for dim, d in dims.items()} == pytest.approx(expected)
    assert all(d["reason"] is None for d in dims.values())
    weights = {"accuracy": 0.3, "robustness": 0.2, "efficiency": 0.15, "explainability": 0.15,
               "fairness": 0.1, "adaptability": 0.1}  # fmt: skip
    assert {dim: d["weight"] for dim, d in dims.items()} == weights
    # 0.3*0.4 + 0.2*0.8 + 0.15*0.5 + 0.15*0.6 + 0.1*0.9 + 0.1*0.3 = 0.565 (weights sum to 1)
    assert card["overall"] == pytest.approx(0.565)
    assert card["weight_measured"] == pytest.approx(1.0)
    assert dims["accuracy"]["detail"] == "ROUGE-L 0.4"
    assert dims["efficiency"]["detail"] == "100 ms per token at batch 1, budget 50 ms"
    assert dims["fairness"]["detail"] == "ROUGE-L gap 0.1 (max − min) across 2 groups of metadata.gender"
    assert dims["adaptability"]["detail"] == "ROUGE-L 0.3 on law"
    assert "60%" in dims["explainability"]["detail"]


def test_fast_model_scores_full_efficiency():
    entry = _full_entry() | {"efficiency": {"ms_per_token": 10.0}}
    assert build_scorecard(entry, _cfg())["dimensions"]["efficiency"]["score"] == 1.0


def test_missing_dimensions_renormalise_the_weights_and_carry_reasons():
    entry = _full_entry() | {"robustness": None, "fairness": None, "adaptability": None}
    cfg = _cfg(robustness={"enabled": False})
    card = build_scorecard(entry, cfg)
    dims = card["dimensions"]
    for dim in ("robustness", "fairness", "adaptability"):
        assert dims[dim]["score"] is None and dims[dim]["detail"] is None
    assert "eval.robustness.enabled" in dims["robustness"]["reason"]
    assert dims["robustness"]["reason"].startswith("turned off")
    assert "eval.fairness.attribute" in dims["fairness"]["reason"]
    assert "eval.adaptability.source" in dims["adaptability"]["reason"]
    # (0.3*0.4 + 0.15*0.5 + 0.15*0.6) / (0.3 + 0.15 + 0.15)
    assert card["overall"] == pytest.approx(0.285 / 0.6)
    assert card["weight_measured"] == pytest.approx(0.6)


def test_reasons_for_sections_present_but_without_a_value():
    entry = _full_entry() | {
        "metrics": {"perplexity": 12.5},
        "missing": {"rouge_l": "needs reference answers"},
        "explainability": {"attention_on_prompt": None, "reason": "the model returned no attention weights"},
        "efficiency": None,
        "fairness": {"attribute": "metadata.gender", "groups": {"f": {"value": 0.4, "n": 9}}, "gap": None},
        "adaptability": {"source": "law", "metrics": {}, "missing": {"rouge_l": "no conversations"}},
        "robustness": {"metric": "rouge_l", "score": None, "skipped": {"chinese": "no Han text"}},
    }
    dims = build_scorecard(entry, _cfg())["dimensions"]
    assert dims["accuracy"]["reason"].startswith(
        "the primary metric rouge_l is missing: needs reference answers"
    )
    assert dims["explainability"]["reason"] == (
        "the model's attention could not be read: the model returned no attention weights"
    )
    assert "eval.efficiency.enabled" in dims["efficiency"]["reason"]
    assert "eval.fairness.min_group_size" in dims["fairness"]["reason"]
    assert (
        dims["adaptability"]["reason"]
        == "rouge_l on law is missing: no conversations (eval.adaptability.source)"
    )
    assert "chinese: no Han text" in dims["robustness"]["reason"]
    assert all(d["score"] is None for d in dims.values())
    card = build_scorecard(entry, _cfg())
    assert card["overall"] is None and card["weight_measured"] == 0.0


def test_explainability_turned_off_names_its_key():
    entry = _full_entry() | {"explainability": None}
    dims = build_scorecard(entry, _cfg(explainability={"enabled": False}))["dimensions"]
    assert "eval.explainability.enabled" in dims["explainability"]["reason"]


def test_perplexity_as_primary_uses_its_inverse_and_relative_gap():
    entry = _full_entry() | {
        "fairness": {
            "attribute": "label",
            "metric": "perplexity",
            "groups": {"a": {"value": 10.0, "n": 5}, "b": {"value": 8.0, "n": 5}},
            "gap": 2.0,
        }
    }
    card = build_scorecard(entry, EvalConfig(metrics=["perplexity"]))
    dims = card["dimensions"]
    assert dims["accuracy"]["score"] == pytest.approx(1 / 12.5)
    assert "geometric-mean probability of a reference token" in dims["accuracy"]["detail"]
    assert dims["fairness"]["score"] == pytest.approx(1 - 2.0 / 10.0)
    assert dims["fairness"]["detail"].startswith("relative perplexity gap 0.2")
    assert dims["adaptability"]["score"] == pytest.approx(1 / 20.0)


def test_weights_not_listed_keep_their_default_and_zero_drops_a_dimension():
    cfg = _cfg(scorecard={"weights": {"accuracy": 1.0, "efficiency": 3.0, "robustness": 0}})
    assert cfg.scorecard.weights["fairness"] == 0.1  # not listed: the default
    entry = _full_entry() | {"efficiency": None}
    card = build_scorecard(entry, cfg)
    assert card["dimensions"]["robustness"]["weight"] == 0.0
    assert card["dimensions"]["robustness"]["score"] == pytest.approx(0.8)  # measured, shown, not weighed
    # accuracy 0.4 (w 1), explainability 0.6 (0.15), fairness 0.9 (0.1), adaptability 0.3 (0.1)
    expected = (1.0 * 0.4 + 0.15 * 0.6 + 0.1 * 0.9 + 0.1 * 0.3) / 1.35
    assert card["overall"] == pytest.approx(expected)
    assert card["weight_measured"] == pytest.approx(1.35 / 4.35)
