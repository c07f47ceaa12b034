"""Per-example sufficient statistics: the one form every task metric is computed in.

A metric's value over any subset of the test examples is `reduce(stats[subset].sum(0))`: a mean metric
keeps `(score, 1)` per example, perplexity `(nll, tokens)`, BLEU sacrebleu's n-gram counts, macro-F1 the
per-class true/false positives and false negatives. The same statistics give the corpus value, the value
per group (fairness), and the paired bootstrap of an A/B comparison, which resamples examples and reduces
their summed statistics (the way sacrebleu's own paired bootstrap does), without scoring any text again.
`reduce` is vectorised over leading dimensions: `(B, k) -> (B,)`.

No library offers this contract across ROUGE, BLEU, chrF, perplexity and F1 at once, so it is ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExampleStats:
    """Sufficient statistics of one metric, one row per test example."""

    metric: str
    stats: np.ndarray  # (n_examples, k) float64
    reduce: Callable[[np.ndarray], np.ndarray]  # (..., k) -> (...)
    higher_is_better: bool

    def __post_init__(self) -> None:
        if self.stats.ndim != 2:
            raise ValueError(f"{self.metric}: stats must be (n_examples, k), got shape {self.stats.shape}")

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def value(self, subset: np.ndarray | list[int] | None = None) -> float:
        """The metric over all examples, or over the examples at `subset` (indices)."""
        rows = self.stats if subset is None else self.stats[np.asarray(subset, dtype=int)]
        return float(self.reduce(rows.sum(axis=0)))

    def per_example(self) -> np.ndarray:
        """Each example's own value (for ranking where two models differ most)."""
        return np.asarray(self.reduce(self.stats), dtype=float)


def mean_reduce(total: np.ndarray) -> np.ndarray:
    """Mean of per-example scores kept as `(score, 1)`."""
    total = np.asarray(total, dtype=float)
    return total[..., 0] / np.maximum(total[..., 1], 1e-12)


def mean_stats(metric: str, scores: list[float] | np.ndarray, higher_is_better: bool = True) -> ExampleStats:
    """A metric that is the mean of one score per example."""
    values = np.asarray(scores, dtype=float).reshape(-1, 1)
    return ExampleStats(metric, np.hstack([values, np.ones_like(values)]), mean_reduce, higher_is_better)
