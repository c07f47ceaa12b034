"""Data quality report: split statistics against hand-computed values, adversarial validation, report.md."""

from __future__ import annotations

import random
import re

import pytest
from datasets import Dataset
from rich.console import Console

from seektune.data.records import COLUMNS, RECORD_FEATURES, make_record, rows_batch
from seektune.data.report import (
    chinese_word_counts,
    describe_splits,
    distribution_shift,
    length_stats,
    print_data_report,
    render_data_report,
    shift_verdict,
    write_data_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_dict(rows_batch(rows, COLUMNS), features=RECORD_FEATURES)


@pytest.fixture(scope="module")
def small_splits() -> dict[str, Dataset]:
    # record_text lengths: 11, 12 ("北京\n我来到北京清华大学"), 17, 13 ("Hi | there\nok").
    train = [
        make_record(text="Hello world", source="a", label="pos", metadata={"topic": "x"}),
        make_record(messages=_chat("北京", "我来到北京清华大学"), source="b", label="neg"),
        make_record(text="hello HELLO don't", source="a", label="pos", augmented="swap"),
        make_record(messages=_chat("Hi | there", "ok"), source="a", metadata={"topic": "y"}),
    ]
    test = [make_record(text="one two", source="b", label="neg")]
    return {"train": _dataset(train), "test": _dataset(test)}


@pytest.fixture(scope="module")
def detail(small_splits) -> dict:
    return describe_splits(small_splits, {"train": [5, 10, 15, 20], "test": [3]}, "label", seed=0)


def test_length_percentiles_and_histogram_equal_hand_computed_values(detail):
    chars = detail["train"]["chars"]
    # sorted 11, 12, 13, 17; linear interpolation: p10 at rank 0.3, p50 at 1.5, p90 at 2.7
    assert {k: chars[k] for k in ("min", "p10", "p50", "p90", "max", "mean")} == pytest.approx(
        {"min": 11, "p10": 11.3, "p50": 12.5, "p90": 15.8, "max": 17, "mean": 13.25}
    )
    assert chars["histogram"]["counts"] == [1, 1, 1, 0, 0, 0, 1]  # one bin per length, 11..17
    assert chars["histogram"]["edges"][0] == 11 and chars["histogram"]["edges"][-1] == 18
    assert detail["train"]["tokens"]["p50"] == pytest.approx(12.5)
    assert detail["test"]["tokens"] == length_stats([3])
    assert length_stats([]) is None


def test_vocabulary_and_jieba_counts(detail):
    # English: hello, world, don't, hi, there, ok, lower-cased; Chinese (jieba): 北京 ×2, 我, 来到, 清华大学
    assert detail["train"]["vocabulary"] == 10
    assert detail["train"]["chinese"] == {
        "words": 5,
        "distinct": 4,
        "top": [["北京", 2], ["我", 1], ["来到", 1], ["清华大学", 1]],
        "texts": 4,
    }
    assert detail["test"]["chinese"]["words"] == 0 and detail["test"]["vocabulary"] == 2


def test_labels_sources_kinds_and_augmented_shares(detail):
    train = detail["train"]
    assert train["records"] == 4 and train["sampled"] == 4
    assert train["labels"]["field"] == "label"
    assert train["labels"]["counts"] == {"pos": 2, "": 1, "neg": 1}
    assert train["labels"]["shares"]["pos"] == pytest.approx(0.5)
    assert train["sources"]["counts"] == {"a": 3, "b": 1}
    assert train["sources"]["shares"] == pytest.approx({"a": 0.75, "b": 0.25})
    assert train["kinds"] == {"conversations": 2, "documents": 2, "conversation_share": 0.5}
    assert train["augmented"] == {"count": 1, "share": 0.25, "methods": {"swap": 1}}


def test_chinese_segmentation_stops_at_its_character_budget():
    texts = ["北京", "hello", "清华大学", "北京"]
    assert chinese_word_counts(texts, max_chars=2) == ({"北京": 1}, 1)
    assert chinese_word_counts(texts, max_chars=3) == ({"北京": 1, "清华大学": 1}, 3)
    assert chinese_word_counts(texts) == ({"北京": 2, "清华大学": 1}, 4)
    detail = {
        "train": {"sampled": 10, "chinese": {"words": 4, "distinct": 1, "top": [["北京", 4]], "texts": 3}}
    }
    text = render_data_report({"splits_detail": detail}, {})
    assert "train from 3 of 10 texts" in text and "| 1 | 北京 (4) |" in text


def test_an_empty_split_has_counts_but_no_lengths():
    empty = describe_splits({"validation": _dataset([])}, {"validation": []}, "label", seed=0)["validation"]
    assert empty["records"] == 0 and empty["chars"] is None and empty["tokens"] is None
    assert empty["vocabulary"] == 0 and empty["sources"] == {"counts": {}, "shares": {}}
    assert empty["kinds"]["conversation_share"] is None


def test_metadata_label_field_and_no_label_field(small_splits):
    by_topic = describe_splits(small_splits, {}, "metadata.topic", seed=0)
    assert by_topic["train"]["labels"]["counts"] == {"": 2, "x": 1, "y": 1}
    assert by_topic["train"]["tokens"] is None
    assert "labels" not in describe_splits(small_splits, {}, None, seed=0)["train"]


def test_big_splits_are_sampled_reproducibly(small_splits):
    first = describe_splits(small_splits, {}, None, seed=3, max_texts=2)["train"]
    again = describe_splits(small_splits, {}, None, seed=3, max_texts=2)["train"]
    assert first["sampled"] == 2 and first["records"] == 4
    assert sum(first["chars"]["histogram"]["counts"]) == 2
    assert first["chars"] == again["chars"]
    assert first["sources"]["counts"] == {"a": 3, "b": 1}  # column counts always use every record


def _sentences(rng: random.Random, words: list[str], n: int, joiner: str = " ") -> list[str]:
    return [joiner.join(rng.choices(words, k=rng.randint(6, 14))) for _ in range(n)]


ENGLISH = [
    "the",
    "model",
    "learns",
    "from",
    "data",
    "and",
    "answers",
    "every",
    "question",
    "with",
    "care",
    "about",
    "code",
    "tests",
]
CHINESE = list("我们的模型从数据中学习并认真回答每一个关于代码和测试的问题")


def test_same_distribution_has_auc_near_one_half():
    rng = random.Random(0)
    shift = distribution_shift(_sentences(rng, ENGLISH, 300), _sentences(rng, ENGLISH, 300), seed=0)
    assert 0.35 < shift["auc"] < 0.65
    assert shift["n"] == 300 and shift["verdict"] == "no detectable shift"


def test_english_against_chinese_is_a_strong_shift():
    rng = random.Random(1)
    # the larger side is sampled down to the smaller one
    shift = distribution_shift(_sentences(rng, ENGLISH, 200), _sentences(rng, CHINESE, 80, ""), seed=0)
    assert shift["auc"] > 0.9 and shift["n"] == 80 and shift["verdict"] == "strong shift"


def test_tiny_inputs_give_no_auc():
    shift = distribution_shift(["a"] * 50, ["b"] * 9, seed=0)
    assert shift["auc"] is None and "at least 10" in shift["reason"]


def test_verdict_thresholds():
    assert [shift_verdict(a) for a in (0.5, 0.6, 0.74, 0.75)] == [
        "no detectable shift",
        "mild shift",
        "mild shift",
        "strong shift",
    ]


def _full_report(detail: dict) -> dict:
    return {
        "sources": [
            {"name": "a", "path": "a.jsonl", "records": 6, "skipped": 2, "skip_reasons": {"bad_json": 2}},
            {"name": "b", "path": "b.jsonl", "records": 2, "skipped": 0, "skip_reasons": {}},
        ],
        "steps": [
            {"step": "load", "in": 10, "out": 8, "removed": {"bad_json": 2}, "changed": {}},
            {"step": "clean", "in": 8, "out": 7, "removed": {"too_short": 1}, "changed": {"strip_html": 3}},
            {"step": "split", "in": 7, "out": 7, "removed": {}, "changed": {}},
            {"step": "tokenise", "in": 7, "out": 5, "removed": {"too_long": 2}, "changed": {"truncated": 0}},
        ],
        "removed_examples": {"too_short": ["hi | there"]},
        "pii": {"email": 4, "phone": 0},
        "duplicates": {
            "exact": 1,
            "near": 1,
            "clusters": [
                {"kind": "near", "size": 2, "kept": "a | b\nc", "removed": ["a | b\nd"], "similarity": 0.9}
            ],
        },
        "splits": {"train": 4, "test": 1},
        "balance": {"field": "label", "strategy": "oversample", "before": {"pos": 2}, "after": {"pos": 3}},
        "mix": {
            "strategy": "ratio",
            "target_shares": {"a": 0.5, "b": 0.5},
            "before": {"a": 3, "b": 1},
            "after": {"a": 1, "b": 1},
            "shares_after": {"a": 0.5, "b": 0.5},
        },
        "augmented": {"swap": 1},
        "train_tokens": 123456,
        "fingerprint": "abc123",
        "splits_detail": detail,
        "shift": {"auc": 0.812, "n": 40, "folds": 5, "verdict": "strong shift"},
    }


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_write_data_report_has_numbers_plots_and_escaped_snippets(detail, tmp_path):
    path = write_data_report(_full_report(detail), tmp_path / "data")
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "data" / "report.md"
    assert "**10 records read → 7 kept (70%)**" in text  # kept: what reaches the split
    assert "| too\\_short | “hi \\| there” |" in text
    assert "123k training tokens" in text and "`abc123`" in text
    assert "| tokenise | 7 | 5 | too\\_long 2 | — |" in text
    assert "| email | 4 |" in text and "phone" not in text
    assert "| 11 | 11.3 | 12.5 | 15.8 | 17 | 13.2 |" in text  # train character lengths
    assert "北京 (2)" in text and "ROC AUC 0.812: strong shift" in text
    assert "| a | 3 | 75% | 50% | 1 | 50% |" in text  # mixing: before, its share, target, after, share
    # snippets: pipes escaped, newlines shown as ↵, so the cluster row keeps the header's columns
    assert "“a \\| b ↵ c”" in text
    cluster_lines = [line for line in text.splitlines() if "“a \\|" in line]
    header = next(line for line in text.splitlines() if line.startswith("| # | Kind"))
    assert len(cluster_lines) == 1 and _unescaped_pipes(cluster_lines[0]) == _unescaped_pipes(header)
    for name in ("lengths_chars", "lengths_tokens", "sources", "labels"):
        assert f"(plots/{name}.png)" in text
        assert (tmp_path / "data" / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_report_without_optional_keys_still_renders(tmp_path):
    text = write_data_report({}, tmp_path).read_text(encoding="utf-8")
    assert text.startswith("# Data report") and "reported no counts" in text
    minimal = {"steps": [{"step": "load", "in": 3, "out": 3}], "splits": {"train": 3}}
    text = write_data_report(minimal, tmp_path).read_text(encoding="utf-8")
    assert "**3 records read → 3 kept (100%)**" in text and "| train | 3 |" in text
    assert not (tmp_path / "plots").exists()
    shift = {"shift": {"auc": None, "reason": "needs at least 10 records"}}
    assert "Not measured: needs at least 10 records." in write_data_report(shift, tmp_path).read_text()


def test_print_data_report_shows_steps_splits_and_shift(detail):
    console = Console(record=True, width=120)
    print_data_report(_full_report(detail), console)
    output = console.export_text()
    assert re.search(r"tokenise\s+│\s+7\s+│\s+5\s+│\s+too_long 2", output)
    assert "Splits: train 4, test 1; 123k training tokens" in output
    assert "AUC 0.81 (strong shift)" in output
