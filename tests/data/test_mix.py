"""Class balancing, source mixing and the domain re-weighting rule, against hand-computed counts."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from datasets import Dataset

from seektune.config import MixConfig
from seektune.data.mix import DomainWeights, balance, mix_sources, temperature_shares
from seektune.data.records import COLUMNS, RECORD_FEATURES, make_record, rows_batch
from seektune.errors import UserError


def _dataset(counts: dict[str, int], column: str = "source") -> Dataset:
    """`counts[value]` records per value of `column` (origins 'value:i'); '' values have no label."""
    rows = []
    for value, n in counts.items():
        for i in range(n):
            fields = {column: value} if column in ("source", "label") else {}
            metadata = {column.split(".", 1)[1]: value} if column.startswith("metadata.") and value else None
            rows.append(make_record(text=f"{value} {i}", origin=f"{value}:{i}", metadata=metadata, **fields))
    return Dataset.from_dict(rows_batch(rows, COLUMNS), features=RECORD_FEATURES)


def _per_value(dataset: Dataset, column: str = "source") -> dict[str, int]:
    return dict(Counter(dataset[column]))


# ---------------------------------------------------------------------------------------------------------
# Mixing


SOURCES = {"a": 100, "b": 50, "c": 10}
RATIOS = {"a": 7.0, "b": 2.0, "c": 1.0}


def test_ratio_undersample_takes_from_each_source_without_repetition() -> None:
    # N = min(100/0.7, 50/0.2, 10/0.1) = 100 -> 70, 20, 10
    mixed, report = mix_sources(_dataset(SOURCES), MixConfig(strategy="ratio"), RATIOS, seed=0)
    assert _per_value(mixed) == {"a": 70, "b": 20, "c": 10}
    assert len(set(mixed["origin"])) == 100  # nothing repeated
    assert report == {
        "strategy": "ratio",
        "fill": "undersample",
        "target_shares": {"a": 0.7, "b": 0.2, "c": 0.1},
        "before": SOURCES,
        "after": {"a": 70, "b": 20, "c": 10},
        "shares_after": {"a": 0.7, "b": 0.2, "c": 0.1},
    }


def test_ratio_oversample_repeats_whole_copies_then_a_remainder() -> None:
    # N = max(100/0.7, 50/0.2, 10/0.1) = 250 -> 175, 50, 25
    cfg = MixConfig(strategy="ratio", fill="oversample")
    mixed, report = mix_sources(_dataset(SOURCES), cfg, {"a": 0.7, "b": 0.2, "c": 0.1}, seed=0)
    assert report["after"] == {"a": 175, "b": 50, "c": 25} == _per_value(mixed)
    repeats = Counter(mixed["origin"])
    # c: 25 = 2 whole copies of its 10 records + 5 more, so five records appear 3 times and five twice
    assert sorted(repeats[f"c:{i}"] for i in range(10)) == [2] * 5 + [3] * 5
    # a: 175 = 1 copy + 75 -> 75 records twice, 25 once; b exactly once each
    assert Counter(repeats[f"a:{i}"] for i in range(100)) == {2: 75, 1: 25}
    assert {repeats[f"b:{i}"] for i in range(50)} == {1}


def test_temperature_shares() -> None:
    natural = temperature_shares(SOURCES, 1.0)
    assert natural == pytest.approx({"a": 100 / 160, "b": 50 / 160, "c": 10 / 160})
    assert temperature_shares(SOURCES, 1e6) == pytest.approx(dict.fromkeys(SOURCES, 1 / 3), abs=1e-4)
    root = math.sqrt(100) + math.sqrt(50) + math.sqrt(10)
    assert temperature_shares(SOURCES, 2.0) == pytest.approx(
        {k: math.sqrt(n) / root for k, n in SOURCES.items()}
    )


def test_temperature_mix_counts() -> None:
    # T=2: p_i = sqrt(n_i)/S, N = min n_i/p_i = sqrt(10)*S, so source i gets sqrt(10 n_i): 31.6, 22.4, 10
    mixed, report = mix_sources(
        _dataset(SOURCES), MixConfig(strategy="temperature", temperature=2.0), None, 0
    )
    assert report["after"] == {"a": 32, "b": 22, "c": 10} == _per_value(mixed)
    natural, _ = mix_sources(_dataset(SOURCES), MixConfig(strategy="temperature", temperature=1.0), None, 0)
    assert _per_value(natural) == SOURCES


def test_concat_is_unchanged_and_mixing_is_deterministic() -> None:
    data = _dataset(SOURCES)
    same, report = mix_sources(data, MixConfig(), None, seed=0)
    assert same is data and report["after"] == SOURCES and report["target_shares"]["a"] == 0.625
    cfg = MixConfig(strategy="ratio")
    first = mix_sources(data, cfg, RATIOS, seed=1)[0]["origin"]
    assert first == mix_sources(data, cfg, RATIOS, seed=1)[0]["origin"]
    assert first != mix_sources(data, cfg, RATIOS, seed=2)[0]["origin"]
    assert first[:70] != sorted(first[:70])  # shuffled, not grouped by source


def test_an_empty_split_mixes_to_nothing() -> None:
    mixed, report = mix_sources(_dataset({}), MixConfig(strategy="temperature"), None, seed=0)
    assert len(mixed) == 0 and report["after"] == {}


def test_ratio_errors_name_the_source() -> None:
    data = _dataset(SOURCES)
    with pytest.raises(UserError, match="ratio is set for source 'typo', which has no training records"):
        mix_sources(data, MixConfig(strategy="ratio"), {**RATIOS, "typo": 1.0}, seed=0)
    with pytest.raises(UserError, match=r"'c' has none: set data\.sources"):
        mix_sources(data, MixConfig(strategy="ratio"), {"a": 1.0, "b": 1.0}, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Balancing


def test_oversample_balances_to_the_largest_class() -> None:
    data = _dataset({"x": 6, "y": 3, "z": 1, "": 2}, column="label")
    balanced, report = balance(data, "label", "oversample", seed=0)
    assert report == {
        "field": "label",
        "strategy": "oversample",
        "before": {"x": 6, "y": 3, "z": 1},
        "after": {"x": 6, "y": 6, "z": 6},
        "unlabelled": 2,
    }
    assert _per_value(balanced, "label") == {"x": 6, "y": 6, "z": 6, "": 2}
    repeats = Counter(balanced["origin"])
    assert repeats["z:0"] == 6 and {repeats[f"y:{i}"] for i in range(3)} == {2}


def test_oversample_remainder_and_undersample_by_metadata() -> None:
    data = _dataset({"x": 6, "y": 4}, column="metadata.topic")
    balanced, _ = balance(data, "metadata.topic", "oversample", seed=3)
    assert sorted(Counter(o for o in balanced["origin"] if o.startswith("y")).values()) == [1, 1, 2, 2]
    smaller, report = balance(data, "metadata.topic", "undersample", seed=3)
    assert report["after"] == {"x": 4, "y": 4}
    topics = Counter(json.loads(m)["topic"] for m in smaller["metadata"])
    assert topics == {"x": 4, "y": 4} and len(set(smaller["origin"])) == 8


def test_balance_is_deterministic_and_reports_an_absent_field() -> None:
    data = _dataset({"x": 5, "y": 2}, column="label")
    first = balance(data, "label", "oversample", seed=1)[0]["origin"]
    assert first == balance(data, "label", "oversample", seed=1)[0]["origin"]
    assert first != balance(data, "label", "oversample", seed=2)[0]["origin"]
    with pytest.raises(UserError, match=r"data.balance.field 'metadata.topic' has no value in any"):
        balance(data, "metadata.topic", "oversample", seed=0)
    with pytest.raises(UserError, match=r"data.balance.field 'colour' is not a record field"):
        balance(data, "colour", "oversample", seed=0)


# ---------------------------------------------------------------------------------------------------------
# Dynamic domain weights


def test_domain_weights_raise_the_lagging_domain() -> None:
    weights = DomainWeights({"a": 0.5, "b": 0.5}, step=1.0, min_share=0.0)
    # mean 2: a *= e^(0.5), b *= e^(-0.5) -> a = 1 / (1 + e^-1)
    shares = weights.update({"a": 3.0, "b": 1.0})
    assert shares == pytest.approx({"a": 0.7310586, "b": 0.2689414})
    floored = DomainWeights({"a": 0.5, "b": 0.5}, step=1.0, min_share=0.3)
    assert floored.update({"a": 3.0, "b": 1.0}) == pytest.approx({"a": 0.7, "b": 0.3})


def test_missing_domains_keep_their_weight_and_history_is_kept() -> None:
    weights = DomainWeights({"a": 1, "b": 1, "c": 1}, step=1.0, min_share=0.0)
    shares = weights.update({"a": 2.0, "b": 1.0})  # mean 1.5: a *= e^(1/3), b *= e^(-1/3), c stays
    total = math.exp(1 / 3) + math.exp(-1 / 3) + 1
    assert shares == pytest.approx(
        {"a": math.exp(1 / 3) / total, "b": math.exp(-1 / 3) / total, "c": 1 / total}
    )
    assert weights.update({"a": 1.0, "b": 1.0, "c": 1.0}) == pytest.approx(shares)  # equal losses: no change
    assert [entry["losses"] for entry in weights.history] == [{"a": 2.0, "b": 1.0}, dict.fromkeys("abc", 1.0)]
    assert weights.history[0]["shares"] == pytest.approx(shares)


def test_floor_renormalises_until_every_share_reaches_it() -> None:
    # c is floored first; scaling a and b into the remaining 0.9 pushes b to 0.0918, so b is floored too
    weights = DomainWeights({"a": 0.88, "b": 0.10, "c": 0.02}, step=1.0, min_share=0.1)
    assert weights.shares == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.1})
    shares = weights.update({"a": 0.5, "b": 4.0, "c": 4.0})
    assert min(shares.values()) >= 0.1 - 1e-12 and sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(UserError, match=r"data\.mix\.dynamic_min_share 0\.4 is too large for 3 sources"):
        DomainWeights({"a": 1, "b": 1, "c": 1}, step=1.0, min_share=0.4)
