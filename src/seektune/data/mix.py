"""Class balancing, source mixing and the domain re-weighting rule of the dynamic mix.

* `balance` evens out the classes of a label field (`label`, `source` or `metadata.<key>`): over-sampling
  repeats every class up to the largest (whole copies plus a seeded random remainder), under-sampling cuts
  every class to the smallest. Records without a value are kept once, as they are.
* `mix_sources` sets the share of each source in the training split: `ratio` (the user's weights) or
  `temperature` (shares proportional to n_i^(1/T), as in multilingual pre-training mixes, e.g. XLM-R and
  mT5), reached by under-sampling (total N = min_i n_i/p_i, no repetition) or over-sampling (N = max_i
  n_i/p_i, the smaller sources repeated).
* `DomainWeights` is the arithmetic of the dynamic "domain fitness" schedule that a training callback
  applies between evaluations (see its docstring).

Everything works on `Dataset.select(indices)`, so no record is copied into Python: only the `source` (or
label) column is read, as Arrow, and grouped with `pyarrow.compute.dictionary_encode` (iterating a
`datasets` column in Python takes about 35 s per million rows here). Sampling with given shares and
whole-copy repetition is a few lines of NumPy; `datasets.interleave_datasets` samples by probability
(counts vary with the seed and it stops at the first or last exhausted source), which does not give the
exact counts a report can promise, hence our own.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from seektune.config import MixConfig
from seektune.errors import UserError
from seektune.logs import log_event

logger = logging.getLogger(__name__)

_RECORD_COLUMNS = ("label", "source", "split", "augmented", "origin")


# ---------------------------------------------------------------------------------------------------------
# Sampling helpers


def _repeat_to(indices: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """`target` indices drawn from `indices`: whole copies, then a random remainder without repetition."""
    whole, remainder = divmod(target, len(indices))
    extra = rng.choice(indices, size=remainder, replace=False)
    return np.concatenate([np.tile(indices, whole), extra])


def _sample(indices: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """`target` indices of `indices`: a random subset when fewer, repetition when more."""
    if target <= len(indices):
        return rng.choice(indices, size=target, replace=False)
    return _repeat_to(indices, target, rng)


def _column(dataset: Dataset, name: str) -> pa.Array:
    """One column as a single Arrow array (through the indices mapping; nulls read as "")."""
    column = dataset.with_format("arrow")[name]
    return pc.fill_null(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, "")


def _indices_by_value(values: pa.Array) -> dict[str, np.ndarray]:
    """Row indices of each distinct value, values in order of first appearance."""
    encoded = pc.dictionary_encode(values)
    names = encoded.dictionary.to_pylist()
    if not names:
        return {}
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]
    return dict(zip(names, np.split(order.astype(np.int64), bounds), strict=True))


def _select_shuffled(dataset: Dataset, parts: list[np.ndarray], rng: np.random.Generator) -> Dataset:
    indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return dataset.select(rng.permutation(indices))


# ---------------------------------------------------------------------------------------------------------
# Class balancing


def field_values(dataset: Dataset, field: str, config_key: str = "data.balance.field") -> pa.Array:
    """`records.field_value` of every row, read column-wise; an unknown field names `config_key`."""
    if field.startswith("metadata."):
        key = field.split(".", 1)[1]
        values = (json.loads(text or "{}").get(key) for text in _column(dataset, "metadata").to_pylist())
        return pa.array(["" if value is None else str(value) for value in values], type=pa.string())
    if field in _RECORD_COLUMNS:
        return _column(dataset, field)
    raise UserError(f"{config_key} {field!r} is not a record field: use label, source or metadata.<key>")


def balance(dataset: Dataset, field: str, strategy: str, seed: int) -> tuple[Dataset, dict]:
    """Equal class counts of `field`: 'oversample' up to the largest class, 'undersample' to the smallest.

    Records without a value for `field` are kept once and counted as `unlabelled` in the report. The
    result is shuffled with the seed (returned unchanged when the classes are already equal).
    Report: {field, strategy, before, after, unlabelled}.
    """
    if strategy not in ("oversample", "undersample"):
        raise ValueError(f"unknown balancing strategy {strategy!r}")
    groups = _indices_by_value(field_values(dataset, field))
    unlabelled = groups.pop("", np.zeros(0, dtype=np.int64))
    if not groups:
        raise UserError(
            f"data.balance.field {field!r} has no value in any training record: "
            "name a field the records carry (label, source or metadata.<key>) or remove data.balance"
        )
    before = {value: len(rows) for value, rows in groups.items()}
    target = max(before.values()) if strategy == "oversample" else min(before.values())
    rng = np.random.default_rng(seed)
    if all(count == target for count in before.values()):
        balanced = dataset
    else:
        parts = [_sample(rows, target, rng) for rows in groups.values()]
        balanced = _select_shuffled(dataset, [*parts, unlabelled], rng)
    report = {
        "field": field,
        "strategy": strategy,
        "before": before,
        "after": dict.fromkeys(before, target),
        "unlabelled": len(unlabelled),
    }
    log_event(logger, "balanced", **report)
    return balanced, report


# ---------------------------------------------------------------------------------------------------------
# Source mixing


def temperature_shares(counts: dict[str, int], temperature: float) -> dict[str, float]:
    """Shares proportional to n_i^(1/T): T=1 keeps the natural shares, a large T tends to uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    weights = {name: n ** (1.0 / temperature) if n > 0 else 0.0 for name, n in counts.items()}
    total = sum(weights.values())
    if total == 0:
        raise ValueError("temperature_shares needs at least one non-empty source")
    return {name: weight / total for name, weight in weights.items()}


def _ratio_shares(counts: dict[str, int], ratios: dict[str, float] | None) -> dict[str, float]:
    ratios = ratios or {}
    unknown = sorted(set(ratios) - set(counts))
    if unknown:
        raise UserError(
            f"data.sources[].ratio is set for source {unknown[0]!r}, which has no training records "
            f"(sources with records: {', '.join(counts)}): fix the source name or remove its ratio"
        )
    missing = [name for name in counts if name not in ratios]
    if missing:
        raise UserError(
            f"data.mix.strategy 'ratio' needs a ratio for every source; {missing[0]!r} has none: "
            "set data.sources[].ratio for it, or use data.mix.strategy concat or temperature"
        )
    bad = [name for name, weight in ratios.items() if not (weight > 0 and math.isfinite(weight))]
    if bad:
        raise UserError(f"data.sources[].ratio of {bad[0]!r} must be a positive number, got {ratios[bad[0]]}")
    total = sum(ratios.values())
    return {name: ratios[name] / total for name in counts}


def _mix_targets(counts: dict[str, int], shares: dict[str, float], fill: str) -> dict[str, int]:
    """Records to take from each source so that the shares hold; see `mix_sources`."""
    scale = [counts[name] / share for name, share in shares.items() if share > 0]
    total = min(scale) if fill == "undersample" else max(scale)
    targets = {name: round(share * total) for name, share in shares.items()}
    if fill == "undersample":  # float error must never ask for more than there is
        targets = {name: min(n, counts[name]) for name, n in targets.items()}
    return targets


def mix_sources(
    dataset: Dataset, cfg: MixConfig, ratios: dict[str, float] | None, seed: int
) -> tuple[Dataset, dict]:
    """Sample the records of each `source` so that the sources have the configured shares.

    'concat' returns `dataset` unchanged; 'ratio' normalises `ratios` (source -> positive weight);
    'temperature' uses `temperature_shares(counts, cfg.temperature)`. Fill 'undersample': total
    N = min_i n_i/p_i and round(p_i·N) records of source i, none repeated; 'oversample': N = max_i n_i/p_i,
    smaller sources repeated (whole copies + a seeded random remainder). The result is shuffled with the
    seed. Report: {strategy, fill, target_shares, before, after, shares_after}.
    """
    groups = _indices_by_value(_column(dataset, "source"))
    before = {name: len(rows) for name, rows in groups.items()}
    if cfg.strategy == "concat" or not before:
        shares = {name: n / max(1, len(dataset)) for name, n in before.items()}
        return dataset, _mix_report(cfg, shares, before, before)
    if cfg.strategy == "ratio":
        shares = _ratio_shares(before, ratios)
    elif cfg.strategy == "temperature":
        shares = temperature_shares(before, cfg.temperature)
    else:
        raise ValueError(f"unknown mix strategy {cfg.strategy!r}")
    targets = _mix_targets(before, shares, cfg.fill)
    rng = np.random.default_rng(seed)
    mixed = _select_shuffled(dataset, [_sample(groups[name], n, rng) for name, n in targets.items()], rng)
    report = _mix_report(cfg, shares, before, targets)
    log_event(logger, "sources mixed", **report)
    return mixed, report


def _mix_report(
    cfg: MixConfig, shares: dict[str, float], before: dict[str, int], after: dict[str, int]
) -> dict:
    total = sum(after.values())
    return {
        "strategy": cfg.strategy,
        "fill": cfg.fill,
        "target_shares": {name: round(share, 6) for name, share in shares.items()},
        "before": dict(before),
        "after": dict(after),
        "shares_after": {name: round(n / total, 6) if total else 0.0 for name, n in after.items()},
    }


# ---------------------------------------------------------------------------------------------------------
# Dynamic domain weights


class DomainWeights:
    """Sampling shares of training domains (sources), re-weighted from their validation losses.

    The rule is the exponentiated-gradient (multiplicative weights) step of DoReMi (Xie et al., 2023,
    "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining"), which raises the weight of
    domains where the model lags. DoReMi measures the lag as excess loss over a reference model; without a
    reference model we use the relative excess over the mean validation loss of the domains:

        w_i <- w_i * exp(step * (loss_i - mean) / mean)        for every domain i in `losses`
        w   <- w / sum(w)
        floor at min_share, renormalise the others             (DoReMi mixes with the uniform instead)

    Domains missing from `losses` keep their weight before renormalising. The floor is exact: floored
    domains get exactly `min_share` and the rest share the remaining mass in proportion to their weights,
    so every share is at least `min_share` and the shares sum to 1.
    """

    def __init__(self, shares: dict[str, float], step: float, min_share: float) -> None:
        if not shares or any(not (share >= 0 and math.isfinite(share)) for share in shares.values()):
            raise ValueError(f"domain shares must be non-negative numbers, got {shares}")
        if min_share * len(shares) > 1:
            raise UserError(
                f"data.mix.dynamic_min_share {min_share} is too large for {len(shares)} sources: "
                f"it must be at most 1/{len(shares)} = {1 / len(shares):.4f}"
            )
        self.step = step
        self.min_share = min_share
        self._shares = _with_floor(_normalised(shares), min_share)
        self.history: list[dict] = []

    @property
    def shares(self) -> dict[str, float]:
        """The current shares (a copy), summing to 1."""
        return dict(self._shares)

    def update(self, losses: dict[str, float]) -> dict[str, float]:
        """Re-weight from the validation loss of each domain; records {losses, shares} in `history`."""
        unknown = sorted(set(losses) - set(self._shares))
        if unknown:
            raise ValueError(f"losses for unknown domain(s) {unknown}; known: {sorted(self._shares)}")
        usable = {name: loss for name, loss in losses.items() if math.isfinite(loss)}
        mean = sum(usable.values()) / len(usable) if usable else 0.0
        weights = dict(self._shares)
        if mean > 0:
            for name, loss in usable.items():
                weights[name] *= math.exp(self.step * (loss - mean) / mean)
        self._shares = _with_floor(_normalised(weights), self.min_share)
        self.history.append({"losses": dict(losses), "shares": self.shares})
        return self.shares


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        return {name: 1 / len(weights) for name in weights}
    return {name: weight / total for name, weight in weights.items()}


def _with_floor(shares: dict[str, float], min_share: float) -> dict[str, float]:
    """Shares with every one at least `min_share`, the rest scaled down in proportion, summing to 1."""
    floored: set[str] = set()
    while True:
        free = {name: share for name, share in shares.items() if name not in floored}
        mass = 1 - min_share * len(floored)
        total = sum(free.values())
        scaled = {
            name: (share / total * mass if total > 0 else mass / len(free)) for name, share in free.items()
        }
        low = {name for name, share in scaled.items() if share < min_share}
        if not low:
            return {name: (min_share if name in floored else scaled[name]) for name in shares}
        floored |= low
        if len(floored) == len(shares):
            return dict.fromkeys(shares, 1 / len(shares))
