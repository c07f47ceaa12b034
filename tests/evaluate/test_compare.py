"""Paired bootstrap A/B comparison over per-example statistics."""

from __future__ import annotations

import numpy as np
import pytest

from seektune.config import CompareConfig
from seektune.errors import UserError
from seektune.evaluate import compare
from seektune.evaluate.compare import bootstrap_test, compare_models, paired_bootstrap
from seektune.evaluate.stats import ExampleStats, mean_stats


def _perplexity_stats(nll_per_token: np.ndarray, tokens: np.ndarray) -> ExampleStats:
    stats = np.stack([nll_per_token * tokens, tokens], axis=1).astype(float)
    return ExampleStats("perplexity", stats, lambda t: np.exp(t[..., 0] / t[..., 1]), higher_is_better=False)


def _ratio_stats(metric: str, matches: np.ndarray, totals: np.ndarray) -> ExampleStats:
    """A corpus metric: sum of matches / sum of totals (like an n-gram precision)."""
    stats = np.stack([matches, totals], axis=1).astype(float)
    return ExampleStats(metric, stats, lambda t: t[..., 0] / t[..., 1], higher_is_better=True)


def test_interval_contains_the_true_difference_and_covers_it_about_as_often_as_promised():
    rng = np.random.default_rng(1)
    effect, covered, trials = 0.05, 0, 60
    for trial in range(trials):
        a = rng.normal(0.5, 0.1, 150)
        b = a + effect + rng.normal(0, 0.05, 150)
        result = paired_bootstrap(mean_stats("rouge_l", a), mean_stats("rouge_l", b), 400, 0.9, seed=trial)
        covered += result["ci_low"] <= effect <= result["ci_high"]
        assert result["ci_low"] <= result["diff"] <= result["ci_high"]
    # a 90% interval should contain the true effect in about 54 of 60 datasets (binomial sd ~ 2.3)
    assert 48 <= covered <= 60


def test_clear_effect_is_b_better_with_the_observed_values():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.4, 200)
    b = a + 0.1 + rng.normal(0, 0.02, 200)
    result = paired_bootstrap(mean_stats("rouge_l", a), mean_stats("rouge_l", b), 1000, 0.95, seed=3)
    assert result["verdict"] == "B better"
    assert result["a"] == pytest.approx(a.mean())
    assert result["b"] == pytest.approx(b.mean())
    assert result["diff"] == pytest.approx(b.mean() - a.mean())
    assert result["relative_diff"] == pytest.approx((b.mean() - a.mean()) / a.mean())
    assert 0 < result["ci_low"] < result["diff"] < result["ci_high"]
    # no resample falls on the other side of 0: p is the floor 2 / (samples + 1)
    assert result["p_value"] == pytest.approx(2 / 1001)
    assert result["n"] == 200 and result["higher_is_better"] is True
    swapped = paired_bootstrap(mean_stats("rouge_l", b), mean_stats("rouge_l", a), 1000, 0.95, seed=3)
    assert swapped["verdict"] == "A better"
    assert swapped["ci_high"] < 0


def test_identical_models_and_pure_noise_show_no_significant_difference():
    rng = np.random.default_rng(4)
    scores = rng.uniform(0, 1, 100)
    same = paired_bootstrap(mean_stats("bleu", scores), mean_stats("bleu", scores), 500, 0.95, seed=0)
    assert same["verdict"] == "no significant difference"
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0 and same["p_value"] == 1.0

    a, b = rng.uniform(0, 1, 100), rng.uniform(0, 1, 100)  # two models of equal quality
    noise = paired_bootstrap(mean_stats("bleu", a), mean_stats("bleu", b), 1000, 0.95, seed=0)
    assert noise["verdict"] == "no significant difference"
    assert noise["ci_low"] < 0 < noise["ci_high"]
    assert noise["p_value"] > 0.05


def test_lower_perplexity_of_b_is_b_better():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 20, 120).astype(float)
    nll_a = 2.0 + rng.normal(0, 0.3, 120)
    nll_b = nll_a - 0.4 + rng.normal(0, 0.1, 120)
    a, b = _perplexity_stats(nll_a, tokens), _perplexity_stats(nll_b, tokens)
    result = paired_bootstrap(a, b, 1000, 0.95, seed=0)
    expected_a = np.exp((nll_a * tokens).sum() / tokens.sum())
    assert result["a"] == pytest.approx(expected_a)
    assert result["diff"] < 0 and result["ci_high"] < 0
    assert result["verdict"] == "B better"
    assert result["higher_is_better"] is False
    assert paired_bootstrap(b, a, 1000, 0.95, seed=0)["verdict"] == "A better"


def test_corpus_metric_is_reduced_from_resampled_example_statistics():
    # half the examples are short and all right (1 of 1), half long and mostly wrong (10 of 100): the corpus
    # ratio is 11/101 = 0.109, the mean of per-example ratios 0.55
    n = 200
    matches = np.where(np.arange(n) % 2 == 0, 1.0, 10.0)
    totals = np.where(np.arange(n) % 2 == 0, 1.0, 100.0)
    a = _ratio_stats("chrf", np.zeros(n), totals)
    b = _ratio_stats("chrf", matches, totals)
    result = paired_bootstrap(a, b, 1000, 0.95, seed=0)
    assert result["diff"] == pytest.approx(11 / 101)
    assert result["ci_low"] < 11 / 101 < result["ci_high"]
    assert result["ci_high"] < 0.2  # resampled per-example ratios would centre on 0.55


def test_resamples_are_deterministic_per_seed():
    rng = np.random.default_rng(5)
    a, b = mean_stats("token_f1", rng.uniform(0, 1, 50)), mean_stats("token_f1", rng.uniform(0, 1, 50))
    first = paired_bootstrap(a, b, 300, 0.95, seed=7)
    assert paired_bootstrap(a, b, 300, 0.95, seed=7) == first
    other = paired_bootstrap(a, b, 300, 0.95, seed=8)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])


def test_mismatched_examples_raise():
    with pytest.raises(ValueError, match="A has 3 examples and model B 4"):
        paired_bootstrap(mean_stats("rouge_l", [1, 0, 1]), mean_stats("rouge_l", [1, 0, 1, 1]), 100, 0.95, 0)


def _with_resampled_diffs(monkeypatch: pytest.MonkeyPatch, diffs: np.ndarray) -> None:
    """paired_bootstrap sees `diffs` as its resampled differences (the rest of it runs as usual)."""
    monkeypatch.setattr(compare, "_resampled_differences", lambda a, b, samples, seed: diffs[:samples])


def _excludes_zero(result: dict) -> bool:
    return result["ci_low"] > 0 or result["ci_high"] < 0


@pytest.mark.parametrize("at_zero", [False, True], ids=["below-0", "ties-at-0"])
@pytest.mark.parametrize(
    ("far_side", "verdict"),
    [(24, "B better"), (25, "no significant difference"), (26, "no significant difference")],
)
def test_p_value_and_verdict_agree_at_the_boundary(monkeypatch, far_side, verdict, at_zero):
    # 1000 resampled differences, `far_side` of them on the other side of 0 (or exactly 0, which counts
    # there too): p = 2 (far_side + 1) / 1001, below 0.05 for 24 (0.04995), not for 25 (0.052)
    rng = np.random.default_rng(far_side)
    near = np.linspace(0.01, 0.1, 1000 - far_side)
    diffs = rng.permutation(np.concatenate([np.full(far_side, 0.0 if at_zero else -0.01), near]))
    _with_resampled_diffs(monkeypatch, diffs)
    a = mean_stats("rouge_l", [0.2, 0.4, 0.6])
    b = mean_stats("rouge_l", [0.3, 0.5, 0.7])
    result = paired_bootstrap(a, b, 1000, 0.95, seed=0)
    assert result["p_value"] == pytest.approx(2 * (far_side + 1) / 1001)
    assert result["verdict"] == verdict
    assert (result["p_value"] < 0.05) == _excludes_zero(result) == (verdict != "no significant difference")
    # the bounds are order statistics: the 25th smallest and the 25th largest difference, not interpolated
    ordered = np.sort(diffs)
    assert (result["ci_low"], result["ci_high"]) == (ordered[24], ordered[975])
    # mirrored: B lower; on a lower-is-better metric that is B better, on a higher-is-better one A better
    _with_resampled_diffs(monkeypatch, -diffs)
    mirrored = paired_bootstrap(b, a, 1000, 0.95, seed=0)
    assert mirrored["p_value"] == result["p_value"]
    assert (mirrored["ci_low"], mirrored["ci_high"]) == (-ordered[975], -ordered[24])
    assert mirrored["verdict"] == {"B better": "A better"}.get(verdict, verdict)
    # the mirrored differences (B lower) on a lower-is-better metric: B better at 24
    lower_is_better = mean_stats("perplexity", [1.0, 2.0, 3.0], higher_is_better=False)
    assert paired_bootstrap(lower_is_better, lower_is_better, 1000, 0.95, seed=0)["verdict"] == verdict


def test_p_value_is_below_the_level_exactly_when_the_interval_excludes_zero():
    rng = np.random.default_rng(11)
    for trial in range(400):
        samples = int(rng.integers(100, 1500))
        confidence = float(rng.choice([0.8, 0.9, 0.95, 0.975, 0.99]))
        if samples + 1 <= 2 / round(1 - confidence, 12):
            continue  # too few resamples for this confidence: tested below
        spread = rng.uniform(0.1, 2.0)
        diffs = rng.normal(rng.uniform(-3, 3) * spread / np.sqrt(50), spread, samples)
        if trial % 4 == 0:
            diffs = np.round(diffs, 1)  # many ties, some at exactly 0
        test = bootstrap_test(diffs, confidence)
        excludes = test["ci_low"] > 0 or test["ci_high"] < 0
        assert (test["p_value"] < 1 - confidence) == excludes, (samples, confidence, test)
        assert test["ci_low"] <= test["ci_high"]
        assert test["ci_low"] in diffs and test["ci_high"] in diffs
    # and through the whole paired bootstrap, at sample sizes where the verdict varies
    for seed in range(40):
        a = rng.uniform(0, 1, 40)
        b = a + rng.normal(0.03, 0.1, 40)
        result = paired_bootstrap(mean_stats("rouge_l", a), mean_stats("rouge_l", b), 300, 0.9, seed=seed)
        significant = result["verdict"] != "no significant difference"
        assert (result["p_value"] < 0.1) == _excludes_zero(result) == significant


def test_too_few_resamples_for_the_confidence_is_a_user_error():
    diffs = np.linspace(0.1, 1.0, 100)  # every resample favours B: p = 2 / 101 = 0.0198 at best
    with pytest.raises(UserError, match="bootstrap_samples to at least 200"):
        bootstrap_test(diffs, 0.99)
    assert bootstrap_test(np.linspace(0.1, 1.0, 200), 0.99)["p_value"] == pytest.approx(2 / 201)
    # at 0.95: p(m) = 2 (m + 1) / 101 < 0.05 for m = 0, 1, so k = 2: the 2nd smallest and 2nd largest
    assert bootstrap_test(diffs, 0.95)["ci_low"] == diffs[1]
    assert bootstrap_test(diffs, 0.95)["ci_high"] == diffs[98]


def test_undefined_resamples_give_no_verdict(monkeypatch):
    diffs = np.concatenate([np.full(999, 0.5), [np.nan]])
    _with_resampled_diffs(monkeypatch, diffs)
    a, b = mean_stats("chrf", [0.1, 0.2]), mean_stats("chrf", [0.6, 0.7])
    result = paired_bootstrap(a, b, 1000, 0.95, seed=0)
    assert result["verdict"] == "no significant difference" and result["p_value"] == 1.0
    assert np.isnan(result["ci_low"]) and np.isnan(result["ci_high"])


def _texts(n: int) -> dict:
    return {
        "metric": "rouge_l",
        "prompts": [f"问题 {i}" for i in range(n)],
        "references": [f"ref {i}" for i in range(n)],
        "a_outputs": [f"a {i}" for i in range(n)],
        "b_outputs": [f"b {i}" for i in range(n)],
    }


def test_compare_models_summary_and_most_different_examples():
    rng = np.random.default_rng(0)
    n = 80
    rouge_a = rng.uniform(0.1, 0.3, n)
    rouge_b = rouge_a + 0.1 + rng.normal(0, 0.01, n)
    rouge_b[[5, 17]] = rouge_a[[5, 17]] + [0.6, -0.5]  # the two examples that differ most
    bleu = rng.uniform(0, 1, n)
    tokens = np.full(n, 10.0)
    nll = rng.uniform(1.0, 3.0, n)
    stats_a = {
        "perplexity": _perplexity_stats(nll, tokens),
        "bleu": mean_stats("bleu", bleu),
        "rouge_l": mean_stats("rouge_l", rouge_a),
        "chrf": mean_stats("chrf", bleu),  # only in A: not compared
    }
    stats_b = {
        "rouge_l": mean_stats("rouge_l", rouge_b),
        "perplexity": _perplexity_stats(nll - 0.5, tokens),
        "bleu": mean_stats("bleu", rng.permutation(bleu)),
    }
    cfg = CompareConfig(bootstrap_samples=500, examples=2)
    result = compare_models(stats_a, stats_b, ("base", "tuned"), cfg, seed=0, texts=_texts(n))
    assert result["a"] == "base" and result["b"] == "tuned"
    assert result["confidence"] == 0.95 and result["samples"] == 500
    assert list(result["metrics"]) == ["rouge_l", "perplexity", "bleu"]  # primary first, then A's order
    assert result["metrics"]["perplexity"]["verdict"] == "B better"
    assert result["metrics"]["bleu"]["verdict"] == "no significant difference"
    summary = result["summary"]
    assert summary.startswith("tuned is better than base on ROUGE-L (+0.")
    assert "95% CI +0." in summary
    assert "and perplexity (−" in summary
    assert summary.endswith("; no significant difference in BLEU.")
    assert result["examples_metric"] == "rouge_l"
    examples = result["examples"]
    assert [e["index"] for e in examples] == [5, 17]
    assert examples[0]["prompt"] == "问题 5" and examples[0]["b_output"] == "b 5"
    assert examples[0]["b_score"] - examples[0]["a_score"] == pytest.approx(0.6)

    without_texts = compare_models(stats_a, stats_b, ("base", "tuned"), cfg, seed=0)
    assert without_texts["examples"] == [] and without_texts["examples_metric"] is None
    assert without_texts["metrics"]["rouge_l"] == result["metrics"]["rouge_l"]


def test_summary_names_a_worse_model_and_no_shared_metric():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.4, 0.6, 60)
    cfg = CompareConfig(bootstrap_samples=200, examples=0)
    worse = compare_models(
        {"exact_match": mean_stats("exact_match", a)},
        {"exact_match": mean_stats("exact_match", a - 0.2)},
        ("v1", "v2"), cfg, seed=0,
    )  # fmt: skip
    assert worse["summary"].startswith("v2 is worse than v1 on exact match (−0.2, 95% CI −0.2..−0.2)")
    none = compare_models({}, {"bleu": mean_stats("bleu", a)}, ("v1", "v2"), cfg, seed=0)
    assert none["metrics"] == {} and none["summary"] == "v1 and v2 have no metric in common to compare."


def test_examples_are_ranked_and_recorded_by_the_texts_metric_not_the_first_metric():
    # metrics [accuracy, rouge_l]: the answers are ranked by ROUGE-L, and the result says so
    rng = np.random.default_rng(3)
    n = 30
    rouge_a = rng.uniform(0.2, 0.3, n)
    rouge_b = rouge_a.copy()
    rouge_b[12] += 0.5
    correct_a = np.ones(n)
    correct_b = np.ones(n)
    correct_b[4] = 0.0  # accuracy differs most at example 4, ROUGE-L at example 12
    stats_a = {"accuracy": mean_stats("accuracy", correct_a), "rouge_l": mean_stats("rouge_l", rouge_a)}
    stats_b = {"accuracy": mean_stats("accuracy", correct_b), "rouge_l": mean_stats("rouge_l", rouge_b)}
    cfg = CompareConfig(bootstrap_samples=200, examples=1)
    result = compare_models(stats_a, stats_b, ("base", "tuned"), cfg, seed=0, texts=_texts(n))
    assert result["examples_metric"] == "rouge_l"
    assert [e["index"] for e in result["examples"]] == [12]
    assert result["examples"][0]["b_score"] == pytest.approx(rouge_b[12])

    # a label metric: references are the gold labels, outputs the predicted ones, per-example scores 0/1
    labels = {
        "metric": "accuracy",
        "prompts": [f"问题 {i}" for i in range(n)],
        "references": ["positive"] * n,
        "a_outputs": ["positive"] * n,
        "b_outputs": ["negative" if i == 4 else "positive" for i in range(n)],
    }
    by_label = compare_models(stats_a, stats_b, ("base", "tuned"), cfg, seed=0, texts=labels)
    assert by_label["examples_metric"] == "accuracy"
    assert list(by_label["metrics"]) == ["accuracy", "rouge_l"]
    (example,) = by_label["examples"]
    assert (example["index"], example["a_score"], example["b_score"]) == (4, 1.0, 0.0)
    assert (example["reference"], example["b_output"]) == ("positive", "negative")
