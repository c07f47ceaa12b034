"""The data quality report: what the data stage read, removed, changed and kept, for a person.

`seektune data prepare` collects a report dict (sources, per-step counts, personal data found, duplicate
clusters, splits, mixing, augmentation); this module adds statistics of the prepared splits
(`describe_splits`) and an adversarial-validation check of train against test (`distribution_shift`),
then renders everything into `report.md` with plots (`write_data_report`) and a short terminal summary
(`print_data_report`).

Libraries do the work: numpy the percentiles and histograms, pyarrow the counts of whole columns, jieba
the Chinese word segmentation, scikit-learn the train-versus-test classifier, matplotlib (Agg canvas, no
pyplot) the plots, rich the terminal table. Ours is only the choice of statistics and the rendering,
which no library does for a fine-tuning data set; Markdown and plot helpers are shared with the run
report (`seektune.report`). Every file is written atomically.
"""

from __future__ import annotations

import functools
import heapq
import logging
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seektune.data.records import batch_rows, field_value, record_text
from seektune.report import (
    _clip,
    _fmt_count,
    _fmt_num,
    _fmt_pct,
    _md_escape,
    _new_figure,
    _save_png,
    _table,
)
from seektune.rundir import atomic_write_text

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from rich.console import Console

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 30
TOP_WORDS = 20
MAX_CLUSTERS = 10  # duplicate clusters shown in report.md
MAX_REMOVED_SNIPPETS = 2  # removed twins shown per cluster
SNIPPET_CHARS = 120
MAX_TABLE_ROWS = 30  # labels / sources listed before "… and N more"
MIN_SHIFT_TEXTS = 10
SHIFT_FOLDS = 5
SHIFT_TEXT_CHARS = 2000  # the classifier reads the start of each record
PLOTS_DIR = "plots"

_DIRECT_FIELDS = ("label", "source", "split", "augmented", "origin")
_ENGLISH_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "Arial Unicode MS",
)
_SHIFT_MEANING = {
    "no detectable shift": "the test split looks like the training split, so test scores measure the "
    "model on data like the data it learnt from.",
    "mild shift": "some test records differ in topic, style or source from the training records; test "
    "scores partly measure how well the model carries over to that difference.",
    "strong shift": "the test split differs clearly from the training split (other sources, languages or "
    "formats); expect test scores below validation scores, and check that this is intended.",
}

# ---------------------------------------------------------------------------------------------------------
# Statistics of the prepared splits


def describe_splits(
    records: dict[str, datasets.Dataset],
    token_lengths: dict[str, list[int]],
    label_field: str | None,
    seed: int,
    max_texts: int = 20000,
    *,
    max_chinese_chars: int = 500_000,
) -> dict[str, dict[str, Any]]:
    """Statistics of each split, keyed by split name.

    Per split: `records`; `sampled` (how many records the text statistics were computed on: all of them,
    or a seeded random `max_texts`); `chars` and `tokens` length statistics ({min, p10, p50, p90, max,
    mean, histogram: {edges, counts}}, None when empty; tokens from `token_lengths`, all records);
    `vocabulary` (distinct lower-cased English words and jieba Chinese words); `chinese` ({words,
    distinct, top: [[word, count], ...], texts}); `sources`, `kinds` (conversations / documents),
    `augmented` and, with `label_field`, `labels` — these four counted over every record of the split.

    jieba segments about 50–400k characters a second, so Chinese words come from the sampled texts, in
    seeded random order, until `max_chinese_chars` Han characters were segmented; `chinese.texts` says
    how many of the sampled texts that took.
    """
    return {
        split: _describe_split(
            dataset, token_lengths.get(split), label_field, seed, max_texts, max_chinese_chars
        )
        for split, dataset in records.items()
    }


def _describe_split(
    dataset: datasets.Dataset,
    tokens: list[int] | None,
    label_field: str | None,
    seed: int,
    max_texts: int,
    max_chinese_chars: int,
) -> dict[str, Any]:
    texts = sample_texts(dataset, max_texts, seed)
    # sample_texts keeps the dataset's order (often grouped by source): segment in a random order.
    chinese, segmented = chinese_word_counts(random.Random(seed).sample(texts, len(texts)), max_chinese_chars)
    return {
        "records": len(dataset),
        "sampled": len(texts),
        "chars": length_stats([len(text) for text in texts]),
        "tokens": length_stats(tokens) if tokens is not None else None,
        "vocabulary": len(english_words(texts) | set(chinese)),
        "chinese": {
            "words": sum(chinese.values()),
            "distinct": len(chinese),
            "top": [[word, count] for word, count in _most_common(chinese, TOP_WORDS).items()],
            "texts": segmented,
        },
        **_column_stats(dataset, label_field),
    }


def sample_texts(dataset: datasets.Dataset, max_texts: int, seed: int) -> list[str]:
    """The text (`records.record_text`) of every record, or of a seeded random `max_texts` of them."""
    if len(dataset) > max_texts:
        logger.debug("text statistics from a random %d of %d records", max_texts, len(dataset))
        dataset = dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), max_texts)))
    texts: list[str] = []
    for batch in dataset.select_columns(["messages", "text"]).with_format(None).iter(batch_size=1000):
        texts.extend(record_text(row) for row in batch_rows(batch))
    return texts


def length_stats(values: list[int]) -> dict[str, Any] | None:
    """{min, p10, p50, p90, max, mean} (percentiles linearly interpolated) and a histogram; None if empty.

    The histogram has at most HISTOGRAM_BINS bins from min to max + 1; when the lengths span fewer
    values, each bin is one length wide.
    """
    if values is None or len(values) == 0:
        return None
    lengths = np.asarray(values, dtype=np.int64)
    low, high = int(lengths.min()), int(lengths.max())
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    counts, edges = np.histogram(lengths, bins=min(HISTOGRAM_BINS, high - low + 1), range=(low, high + 1))
    return {
        "min": low,
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
        "max": high,
        "mean": float(lengths.mean()),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def english_words(texts: list[str]) -> set[str]:
    """Distinct lower-cased English words (letters, with inner apostrophes) of the texts."""
    words: set[str] = set()
    for text in texts:
        words.update(_ENGLISH_WORD.findall(text.lower()))
    return words


def chinese_word_counts(texts: list[str], max_chars: int | None = None) -> tuple[Counter[str], int]:
    """Chinese words as segmented by jieba (only runs of Han characters), and how many texts were read.

    Texts are read in order until `max_chars` Han characters have been segmented (None: all of them).
    """
    counts: Counter[str] = Counter()
    jieba, budget = None, max_chars if max_chars is not None else float("inf")
    for read, text in enumerate(texts):
        if budget <= 0:
            return counts, read
        runs = _HAN_RUN.findall(text)
        if not runs:
            continue
        jieba = jieba or _quiet_jieba()
        # One call per text; the newline keeps jieba from joining words across separate runs.
        counts.update(word for word in jieba.cut("\n".join(runs)) if not word.isspace())
        budget -= sum(map(len, runs))
    return counts, len(texts)


def _quiet_jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at DEBUG to stderr
    return jieba


def _most_common(counts: Counter[str], limit: int | None = None) -> dict[str, int]:
    """Counts by falling count, ties by key (so the order does not depend on the order of reading)."""
    items = counts.items()
    key = lambda item: (-item[1], item[0])  # noqa: E731
    ordered = sorted(items, key=key) if limit is None else heapq.nsmallest(limit, items, key=key)
    return dict(ordered)


def _column_stats(dataset: datasets.Dataset, label_field: str | None) -> dict[str, Any]:
    """Sources, conversations vs documents, augmented copies and labels, over every record."""
    import pyarrow.compute as pc

    sources, methods, labels = Counter(), Counter(), Counter()
    conversations = 0
    columns = _needed_columns(label_field)
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=50_000):
        conversations += pc.sum(pc.greater(pc.list_value_length(table["messages"]), 0)).as_py() or 0
        sources.update(_value_counts(table["source"]))
        methods.update(_value_counts(table["augmented"]))
        if label_field:
            labels.update(_label_counts(table, label_field))
    total = len(dataset)
    augmented = total - methods.pop("", 0)
    stats: dict[str, Any] = {
        "sources": _counts_and_shares(sources, total),
        "kinds": {
            "conversations": conversations,
            "documents": total - conversations,
            "conversation_share": _share(conversations, total),
        },
        "augmented": {
            "count": augmented,
            "share": _share(augmented, total),
            "methods": _most_common(methods),
        },
    }
    if label_field:
        stats["labels"] = {"field": label_field, **_counts_and_shares(labels, total)}
    return stats


def _needed_columns(label_field: str | None) -> list[str]:
    columns = ["messages", "source", "augmented"]
    if label_field is None:
        return columns
    if label_field.startswith("metadata."):
        return [*columns, "metadata"]
    if label_field not in _DIRECT_FIELDS:
        raise ValueError(f"unknown record field {label_field!r}: use label, source or metadata.<key>")
    return list(dict.fromkeys([*columns, label_field]))


def _value_counts(column: pa.ChunkedArray) -> Counter[str]:
    import pyarrow.compute as pc

    return Counter({(item["values"] or ""): item["counts"] for item in pc.value_counts(column).to_pylist()})


def _label_counts(table: pa.Table, label_field: str) -> Counter[str]:
    if label_field in _DIRECT_FIELDS:
        return _value_counts(table[label_field])
    return Counter(field_value({"metadata": m}, label_field) for m in table["metadata"].to_pylist())


def _counts_and_shares(counts: Counter[str], total: int) -> dict[str, dict[str, Any]]:
    ordered = _most_common(counts)
    return {"counts": ordered, "shares": {key: _share(n, total) for key, n in ordered.items()}}


def _share(part: float, total: float) -> float | None:
    return part / total if total else None


# ---------------------------------------------------------------------------------------------------------
# Distribution shift (adversarial validation)


def distribution_shift(
    train_texts: list[str], test_texts: list[str], seed: int, max_per_side: int = 2000
) -> dict[str, Any]:
    """How well a simple classifier tells train records from test records (adversarial validation).

    Both sides are sampled (seeded) to the size of the smaller one, at most `max_per_side`; a TF-IDF of
    character 1–3-grams of each text's first SHIFT_TEXT_CHARS characters (needs no word boundaries, so
    works for Chinese too) feeds a logistic regression, scored by stratified SHIFT_FOLDS-fold
    cross-validated ROC AUC. Returns {auc, n (texts per side), folds, verdict}, or {auc: None, reason}
    when a side has fewer than MIN_SHIFT_TEXTS texts.
    """
    smaller = min(len(train_texts), len(test_texts))
    if smaller < MIN_SHIFT_TEXTS:
        return {
            "auc": None,
            "reason": f"needs at least {MIN_SHIFT_TEXTS} records in both train and test "
            f"(has {len(train_texts)} and {len(test_texts)})",
        }
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n = min(smaller, max_per_side)
    rng = random.Random(seed)
    texts = [text[:SHIFT_TEXT_CHARS] for text in rng.sample(train_texts, n) + rng.sample(test_texts, n)]
    is_test = [0] * n + [1] * n
    # Fitted once on both sides: the vectoriser never sees which side a text is from, and fitting it per
    # fold would cost five times as long (it is most of the time).
    vectoriser = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, max_features=200_000)
    features = vectoriser.fit_transform(texts)
    folds = StratifiedKFold(n_splits=SHIFT_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_score(
        LogisticRegression(max_iter=1000), features, is_test, cv=folds, scoring="roc_auc"
    )
    auc = float(np.mean(scores))
    return {"auc": auc, "n": n, "folds": SHIFT_FOLDS, "verdict": shift_verdict(auc)}


def shift_verdict(auc: float) -> str:
    """'no detectable shift' below 0.6, 'mild shift' below 0.75, else 'strong shift'."""
    if auc < 0.6:
        return "no detectable shift"
    return "mild shift" if auc < 0.75 else "strong shift"


# ---------------------------------------------------------------------------------------------------------
# Markdown: summary and pipeline


def _n(value: Any) -> str:
    return _fmt_num(value)


def _code(text: Any) -> str:
    """An inline code span that survives backticks in `text` (and a table cell: pipes escaped)."""
    text = str(text).replace("\n", " ").replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if fence != "`" else f"`{text}`"


def _reasons(counts: dict[str, Any] | None) -> str:
    """'too\\_long 3 · too\\_short 1' for the non-zero counts, '—' when none."""
    parts = [f"{_md_escape(reason)} {_n(n)}" for reason, n in (counts or {}).items() if n]
    return " · ".join(parts) or "—"


def _records_in_out(report: dict[str, Any]) -> tuple[int | None, int | None]:
    """Records read, and records kept after cleaning and deduplication (before mixing and augmentation)."""
    steps = report.get("steps") or []
    sources = report.get("sources") or []
    records_in = steps[0].get("in") if steps else (sum(s.get("records", 0) for s in sources) or None)
    split_step = next((step for step in steps if step.get("step") == "split"), None)
    if split_step is not None:
        return records_in, split_step.get("in")
    splits = report.get("splits") or {}
    records_out = sum(splits.values()) if splits else (steps[-1].get("out") if steps else None)
    return records_in, records_out


def _summary_line(report: dict[str, Any]) -> str:
    records_in, records_out = _records_in_out(report)
    parts = []
    if records_in is not None and records_out is not None:
        kept = f" ({_fmt_pct(records_out / records_in)})" if records_in else ""
        parts.append(f"**{_n(records_in)} records read → {_n(records_out)} kept{kept}**")
    splits = report.get("splits") or {}
    if splits:
        parts.append("splits: " + ", ".join(f"{_md_escape(s)} {_n(n)}" for s, n in splits.items()))
    if report.get("train_tokens") is not None:
        parts.append(f"{_fmt_count(report['train_tokens'])} training tokens")
    if report.get("fingerprint"):
        parts.append(f"fingerprint {_code(report['fingerprint'])}")
    return " · ".join(parts) or "The data stage reported no counts."


def _removed_examples_section(examples: dict[str, list[str]]) -> list[str]:
    rows = [[_md_escape(reason), _snippet(text)] for reason, texts in examples.items() for text in texts]
    if not rows:
        return []
    title = "## Examples of removed records"
    return [title, "", "A few records of each removal reason, as they were when removed.", "",
            *_table(["Reason", "Record"], rows, "ll"), ""]  # fmt: skip


def _steps_section(steps: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            _md_escape(step.get("step")),
            _n(step.get("in")),
            _n(step.get("out")),
            _reasons(step.get("removed")),
            _reasons(step.get("changed")),
        ]
        for step in steps
    ]
    header = ["Step", "In", "Out", "Removed (by reason)", "Changed (by rule)"]
    return ["## Pipeline", "", *_table(header, rows, "lrrll"), ""]


def _sources_section(sources: list[dict[str, Any]], detail: dict[str, Any], plot: str | None) -> list[str]:
    lines = ["## Sources", ""]
    if sources:
        total = sum(s.get("records", 0) for s in sources)
        rows = [
            [
                _md_escape(s.get("name")),
                _code(s.get("path", "")),
                _n(s.get("records")),
                _fmt_pct(_share(s.get("records", 0), total)),
                _skipped_cell(s),
            ]
            for s in sources
        ]
        lines += [*_table(["Source", "Path", "Records", "Share", "Skipped"], rows, "llrrl"), ""]
    per_split = {split: d["sources"]["shares"] for split, d in detail.items() if d.get("sources")}
    if per_split:
        lines += ["Share of each source in the prepared splits:", ""]
        lines += [*_shares_table("Source", per_split), ""]
    if plot:
        lines += [f"![source shares]({plot})", ""]
    return lines


def _skipped_cell(source: dict[str, Any]) -> str:
    skipped = source.get("skipped") or 0
    reasons = source.get("skip_reasons") or {}
    return f"{_n(skipped)} ({_reasons(reasons)})" if skipped and reasons else _n(skipped)


def _shares_table(first: str, shares: dict[str, dict[str, Any]]) -> list[str]:
    """Rows: the keys of every split (most common first, at most MAX_TABLE_ROWS); columns: splits."""
    keys = list(dict.fromkeys(key for split_shares in shares.values() for key in split_shares))
    rows = [
        [_label(key), *(_fmt_pct(shares[s].get(key, 0)) for s in shares)] for key in keys[:MAX_TABLE_ROWS]
    ]
    lines = _table([first, *(_md_escape(s) for s in shares)], rows, "l" + "r" * len(shares))
    if len(keys) > MAX_TABLE_ROWS:
        lines += ["", f"… and {_n(len(keys) - MAX_TABLE_ROWS)} more."]
    return lines


def _label(key: Any) -> str:
    return _md_escape(key) if key not in ("", None) else "*(empty)*"


# ---------------------------------------------------------------------------------------------------------
# Markdown: privacy and duplicates


def _pii_section(pii: dict[str, int]) -> list[str]:
    lines = ["## Personal data", ""]
    found = {kind: n for kind, n in pii.items() if n}
    if not found:
        return [*lines, "No personal or secret data was found.", ""]
    rows = [[_md_escape(kind), _n(n)] for kind, n in found.items()]
    return [*lines, *_table(["Kind", "Found"], rows, "lr"), ""]


def _duplicates_section(duplicates: dict[str, Any]) -> list[str]:
    lines = ["## Duplicates", ""]
    lines += [
        f"- Exact duplicates removed: {_n(duplicates.get('exact', 0))}",
        f"- Near duplicates removed: {_n(duplicates.get('near', 0))}",
        "",
    ]
    clusters = duplicates.get("clusters") or []
    if not clusters:
        return lines
    shown = clusters[:MAX_CLUSTERS]
    more = f" (the first {len(shown)} of {_n(len(clusters))})" if len(clusters) > len(shown) else ""
    lines += [f"Examples of duplicate clusters{more}: *Kept* stayed in the data, *Removed* did not.", ""]
    rows = [_cluster_row(index, cluster) for index, cluster in enumerate(shown, start=1)]
    header = ["#", "Kind", "Records", "Similarity", "Kept", "Removed"]
    return [*lines, *_table(header, rows, "rlrrll"), ""]


def _cluster_row(index: int, cluster: dict[str, Any]) -> list[str]:
    removed = cluster.get("removed") or []
    cells = [_snippet(text) for text in removed[:MAX_REMOVED_SNIPPETS]]
    if len(removed) > MAX_REMOVED_SNIPPETS:
        cells.append(f"(+{_n(len(removed) - MAX_REMOVED_SNIPPETS)} more)")
    similarity = cluster.get("similarity")
    return [
        str(index),
        _md_escape(cluster.get("kind")),
        _n(cluster.get("size")),
        _n(similarity) if similarity is not None else "—",
        _snippet(cluster.get("kept")),
        " · ".join(cells) or "—",
    ]


def _snippet(text: Any) -> str:
    """A record excerpt in quotes, clipped and safe in a table cell (pipes escaped, newlines as ↵)."""
    return f"“{_md_escape(_clip(text, SNIPPET_CHARS))}”"


# ---------------------------------------------------------------------------------------------------------
# Markdown: splits, lengths, labels


def _splits_section(detail: dict[str, Any], splits: dict[str, int], plots: dict[str, str]) -> list[str]:
    lines = ["## Splits", ""]
    if not detail:
        rows = [[_md_escape(split), _n(n)] for split, n in splits.items()]
        return [*lines, *_table(["Split", "Records"], rows, "lr"), ""]
    rows = [_split_row(split, d) for split, d in detail.items()]
    header = ["Split", "Records", "Conversations", "Documents", "Augmented", "Vocabulary"]
    lines += [*_table(header, rows, "lrrrrr"), ""]
    lines += _sampling_note(detail)
    lines += _lengths_section(detail, "chars", "Length in characters", plots.get("chars"))
    return lines + _lengths_section(detail, "tokens", "Length in tokens", plots.get("tokens"))


def _split_row(split: str, d: dict[str, Any]) -> list[str]:
    kinds, augmented = d.get("kinds") or {}, d.get("augmented") or {}
    return [
        _md_escape(split),
        _n(d.get("records")),
        _count_share(kinds.get("conversations"), kinds.get("conversation_share")),
        _n(kinds.get("documents")),
        _count_share(augmented.get("count"), augmented.get("share")),
        _n(d.get("vocabulary")),
    ]


def _count_share(count: Any, share: Any) -> str:
    return f"{_n(count)} ({_fmt_pct(share)})" if share is not None else _n(count)


def _sampling_note(detail: dict[str, Any]) -> list[str]:
    sampled = [
        f"{_md_escape(split)} from {_n(d['sampled'])} of {_n(d['records'])} records"
        for split, d in detail.items()
        if d.get("sampled") is not None and d["sampled"] < (d.get("records") or 0)
    ]
    if not sampled:
        return []
    note = "; ".join(sampled)
    return [f"Text statistics (characters, vocabulary, Chinese words) come from a random sample: {note}.", ""]


def _lengths_section(detail: dict[str, Any], key: str, title: str, plot: str | None) -> list[str]:
    stats = {split: d[key] for split, d in detail.items() if d.get(key)}
    if not stats:
        return []
    rows = [
        [_md_escape(split), *(_n(s[k]) for k in ("min", "p10", "p50", "p90", "max", "mean"))]
        for split, s in stats.items()
    ]
    header = ["Split", "Min", "P10", "Median", "P90", "Max", "Mean"]
    lines = [f"### {title}", "", *_table(header, rows, "lrrrrrr"), ""]
    return lines + ([f"![{title.lower()}]({plot})", ""] if plot else [])


def _labels_section(detail: dict[str, Any], balance: dict[str, Any] | None, plot: str | None) -> list[str]:
    labels = {split: d["labels"] for split, d in detail.items() if d.get("labels")}
    if not labels and not balance:
        return []
    lines = ["## Label balance", ""]
    if labels:
        field = next(iter(labels.values())).get("field")
        lines += [f"Classes of {_code(field)} in each split:", ""]
        lines += [*_shares_table("Class", {s: v.get("shares") or {} for s, v in labels.items()}), ""]
    if plot:
        lines += [f"![label balance]({plot})", ""]
    if balance:
        lines += ["Balancing of the training split:", "", *_keyed_section(balance, "Class")]
    return lines


# ---------------------------------------------------------------------------------------------------------
# Markdown: balancing, mixing, augmentation, Chinese words, shift


def _keyed_section(info: dict[str, Any], first: str) -> list[str]:
    """Scalar entries as bullets, dict entries as the columns of one table keyed by their inner keys."""
    bullets = [f"- {_md_escape(k)}: {_md_escape(_n(v))}" for k, v in info.items() if not isinstance(v, dict)]
    columns = {k: v for k, v in info.items() if isinstance(v, dict)}
    lines = [*bullets, ""] if bullets else []
    if columns:
        keys = list(dict.fromkeys(key for column in columns.values() for key in column))
        rows = [
            [_label(key), *(_keyed_cell(name, column.get(key)) for name, column in columns.items())]
            for key in keys
        ]
        header = [first, *(_md_escape(name.replace("_", " ")) for name in columns)]
        lines += [*_table(header, rows, "l" + "r" * len(columns)), ""]
    return lines


def _keyed_cell(column: str, value: Any) -> str:
    if value is None:
        return "—"
    return _fmt_pct(value) if "share" in column else _n(value)


def _mix_section(mix: dict[str, Any]) -> list[str]:
    """Counts and shares of each source in the training split before and after mixing, and the targets."""
    before, after = mix.get("before") or {}, mix.get("after") or {}
    columns = {
        "before": before,
        "share_before": _shares_of(before),
        "target_share": mix.get("target_shares") or {},
        "after": after,
        "share_after": mix.get("shares_after") or _shares_of(after),
    }
    known = {"before", "after", "target_shares", "shares_after"}
    rest = {k: v for k, v in mix.items() if k not in known}
    return [
        "## Source mixing",
        "",
        *_keyed_section({**rest, **{k: v for k, v in columns.items() if v}}, "Source"),
    ]


def _shares_of(counts: dict[str, Any]) -> dict[str, float | None]:
    total = sum(n for n in counts.values() if isinstance(n, int | float))
    return {key: _share(n, total) for key, n in counts.items()}


def _augment_section(augmented: dict[str, int], detail: dict[str, Any]) -> list[str]:
    lines = ["## Augmentation", ""]
    rows = [[_md_escape(method), _n(n)] for method, n in augmented.items()]
    lines += [*_table(["Method", "Copies added"], rows, "lr"), ""] if rows else ["No copies were added.", ""]
    train = (detail.get("train") or {}).get("augmented") or {}
    if train.get("share") is not None:
        lines += [f"Augmented copies make up {_fmt_pct(train['share'])} of the training split.", ""]
    return lines


def _chinese_section(detail: dict[str, Any]) -> list[str]:
    chinese = {s: d["chinese"] for s, d in detail.items() if (d.get("chinese") or {}).get("words")}
    if not chinese:
        return []
    partial = [
        f"{_md_escape(s)} from {_n(c['texts'])} of {_n(detail[s].get('sampled'))} texts"
        for s, c in chinese.items()
        if c.get("texts") is not None and c["texts"] < (detail[s].get("sampled") or 0)
    ]
    budget = f" To bound the time jieba takes, words come from part of the texts: {'; '.join(partial)}."
    lines = ["## Chinese words", "", f"Segmented with jieba.{budget if partial else ''}", ""]
    rows = [[_md_escape(s), _n(c["words"]), _n(c["distinct"])] for s, c in chinese.items()]
    lines += [*_table(["Split", "Words", "Distinct"], rows, "lrr"), ""]
    depth = max(len(c.get("top") or []) for c in chinese.values())
    top_rows = [
        [str(rank + 1), *(_top_cell(c.get("top") or [], rank) for c in chinese.values())]
        for rank in range(depth)
    ]
    header = ["#", *(f"Most common in {_md_escape(s)}" for s in chinese)]
    return [*lines, *_table(header, top_rows, "r" + "l" * len(chinese)), ""]


def _top_cell(top: list[list[Any]], rank: int) -> str:
    return f"{_md_escape(top[rank][0])} ({_n(top[rank][1])})" if rank < len(top) else ""


def _shift_section(shift: dict[str, Any]) -> list[str]:
    lines = ["## Distribution shift (train vs test)", ""]
    if shift.get("auc") is None:
        return [*lines, f"Not measured: {_md_escape(shift.get('reason', 'no result'))}.", ""]
    verdict = shift.get("verdict") or shift_verdict(shift["auc"])
    lines += [
        f"**ROC AUC {shift['auc']:.3f}: {_md_escape(verdict)}.** A classifier (TF-IDF of character "
        f"1–3-grams and logistic regression, {shift.get('folds', SHIFT_FOLDS)}-fold cross-validated, on "
        f"{_n(shift.get('n'))} train and {_n(shift.get('n'))} test records) tried to tell training records "
        "from test records. 0.5 means it cannot; 1.0 means it always can.",
        "",
        f"What it means: {_SHIFT_MEANING.get(verdict, '')}".rstrip(": "),
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------------
# Plots


def _plot_lengths(detail: dict[str, Any], key: str, unit: str, path: Path) -> bool:
    """One histogram panel per split; False when no split has lengths."""
    stats = {split: d[key] for split, d in detail.items() if (d.get(key) or {}).get("histogram")}
    if not stats:
        return False
    fig = _new_figure(3.4 * len(stats), 3.2)
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    for ax, (split, s) in zip(axes, stats.items(), strict=True):
        histogram = s["histogram"]
        ax.stairs(histogram["counts"], histogram["edges"], fill=True, color="tab:blue", alpha=0.7)
        ax.axvline(s["p50"], color="tab:orange", linestyle="--", label=f"median {_fmt_num(s['p50'])}")
        ax.set_title(split)
        ax.set_xlabel(unit)
        ax.set_ylabel("records")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save_png(fig, path)
    return True


def _plot_shares(shares: dict[str, dict[str, float]], title: str, path: Path) -> bool:
    """Horizontal bars of each key's share, one bar per split; False when there is nothing to draw."""
    keys = list(dict.fromkeys(key for split_shares in shares.values() for key in split_shares))[
        :MAX_TABLE_ROWS
    ]
    if not keys:
        return False
    fig = _new_figure(7, 1.2 + 0.22 * len(keys) * len(shares))
    ax = fig.add_subplot()
    height = 0.8 / len(shares)
    for index, (split, split_shares) in enumerate(shares.items()):
        positions = [k + index * height for k in range(len(keys))]
        ax.barh(positions, [100 * (split_shares.get(key) or 0) for key in keys], height=height, label=split)
    ticks = [k + 0.4 - height / 2 for k in range(len(keys))]
    ax.set_yticks(ticks, [str(key) or "(empty)" for key in keys], fontfamily=_font_family())
    ax.invert_yaxis()
    ax.set_xlabel("% of records")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    with warnings.catch_warnings():
        # Without a CJK font, Chinese names are drawn as boxes; the tables in report.md still name them.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        _save_png(fig, path)
    return True


@functools.cache
def _font_family() -> list[str]:
    """matplotlib's default font, then the first installed CJK font (for Chinese labels), if any."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *[name for name in _CJK_FONTS if name in installed][:1]]


def _draw_plots(detail: dict[str, Any], plots_dir: Path) -> dict[str, str]:
    """Draw the plots the statistics have data for; their links relative to report.md, by topic."""
    drawn = {
        "chars": _plot_lengths(detail, "chars", "characters", plots_dir / "lengths_chars.png"),
        "tokens": _plot_lengths(detail, "tokens", "tokens", plots_dir / "lengths_tokens.png"),
        "sources": _plot_shares(
            {s: d["sources"]["shares"] for s, d in detail.items() if d.get("sources")},
            "Source shares",
            plots_dir / "sources.png",
        ),
        "labels": _plot_shares(
            {s: d["labels"]["shares"] for s, d in detail.items() if d.get("labels")},
            "Label balance",
            plots_dir / "labels.png",
        ),
    }
    names = {"chars": "lengths_chars", "tokens": "lengths_tokens", "sources": "sources", "labels": "labels"}
    return {topic: f"{PLOTS_DIR}/{names[topic]}.png" for topic, ok in drawn.items() if ok}


# ---------------------------------------------------------------------------------------------------------
# Entry points


def render_data_report(report: dict[str, Any], plots: dict[str, str]) -> str:
    """The Markdown of report.md; `plots` maps topics (chars, tokens, sources, labels) to plot links."""
    detail = report.get("splits_detail") or {}
    lines = ["# Data report", "", _summary_line(report), ""]
    if report.get("steps"):
        lines += _steps_section(report["steps"])
    lines += _removed_examples_section(report.get("removed_examples") or {})
    if report.get("sources") or detail:
        lines += _sources_section(report.get("sources") or [], detail, plots.get("sources"))
    if report.get("pii") is not None:
        lines += _pii_section(report["pii"])
    if report.get("duplicates"):
        lines += _duplicates_section(report["duplicates"])
    if detail or report.get("splits"):
        lines += _splits_section(detail, report.get("splits") or {}, plots)
    lines += _labels_section(detail, report.get("balance"), plots.get("labels"))
    if report.get("mix"):
        lines += _mix_section(report["mix"])
    if report.get("augmented"):
        lines += _augment_section(report["augmented"], detail)
    lines += _chinese_section(detail)
    if report.get("shift"):
        lines += _shift_section(report["shift"])
    return "\n".join(lines).rstrip() + "\n"


def write_data_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.md` and its plots under `out_dir/plots/`; returns the report's path."""
    out_dir = Path(out_dir)
    plots = _draw_plots(report.get("splits_detail") or {}, out_dir / PLOTS_DIR)
    path = out_dir / "report.md"
    atomic_write_text(path, render_data_report(report, plots))
    return path


def print_data_report(report: dict[str, Any], console: Console) -> None:
    """A table of the pipeline steps, then one line for the splits and one for the distribution shift."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Data preparation", title_justify="left")
    for name, justify in (("Step", "left"), ("In", "right"), ("Out", "right"), ("Removed", "left")):
        table.add_column(name, justify=justify)
    for step in report.get("steps") or []:
        removed = ", ".join(f"{reason} {_n(n)}" for reason, n in (step.get("removed") or {}).items() if n)
        table.add_row(escape(str(step.get("step"))), _n(step.get("in")), _n(step.get("out")), escape(removed))
    console.print(table)
    console.print(escape(_splits_line(report)))
    shift = report.get("shift")
    if shift:
        console.print(escape(_shift_line(shift)))


def _splits_line(report: dict[str, Any]) -> str:
    splits = report.get("splits") or {}
    text = "Splits: " + (", ".join(f"{s} {_n(n)}" for s, n in splits.items()) or "none")
    if report.get("train_tokens") is not None:
        text += f"; {_fmt_count(report['train_tokens'])} training tokens"
    return text


def _shift_line(shift: dict[str, Any]) -> str:
    if shift.get("auc") is None:
        return f"Distribution shift: not measured ({shift.get('reason', 'no result')})"
    verdict = shift.get("verdict") or shift_verdict(shift["auc"])
    return f"Distribution shift train vs test: AUC {shift['auc']:.2f} ({verdict})"
