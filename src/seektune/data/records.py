"""The one record form every data step reads and writes, as `datasets` features.

A record is either a conversation (`messages`, a list of `{role, content}`) or a plain document (`text`,
for continued pre-training); the other field is empty. The bookkeeping columns say where it came from
(`source`, `origin` = "file:line"), what the user attached (`metadata` as a JSON object in text, `label`),
which split it belongs to ("" until the split step assigns one; sources with their own split set it at
load time) and whether it is an augmented copy (`augmented` names the method, "" for originals).
A preference pair is a conversation whose last assistant turn is the chosen answer, with the rejected
answer in `rejected` ("" for every other record).

Steps work on batches (`dict[column, list]`) so that each one runs inside `Dataset.map(batched=True,
num_proc=...)` over memory-mapped Arrow data, and can be called directly on a small batch in tests.
"""

from __future__ import annotations

import json
from typing import Any

from datasets import Features, List, Value

RECORD_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "text": Value("string"),
        "source": Value("string"),
        "origin": Value("string"),
        "metadata": Value("string"),
        "label": Value("string"),
        "split": Value("string"),
        "augmented": Value("string"),
        "rejected": Value("string"),
    }
)
COLUMNS = tuple(RECORD_FEATURES)


def make_record(
    *,
    messages: list[dict[str, str]] | None = None,
    text: str = "",
    source: str = "",
    origin: str = "",
    metadata: dict[str, Any] | None = None,
    label: str = "",
    split: str = "",
    augmented: str = "",
    rejected: str = "",
) -> dict[str, Any]:
    """A record with every column filled (`metadata` serialised to JSON)."""
    return {
        "messages": messages or [],
        "text": text,
        "source": source,
        "origin": origin,
        "metadata": json.dumps(metadata or {}, ensure_ascii=False, sort_keys=True),
        "label": label,
        "split": split,
        "augmented": augmented,
        "rejected": rejected,
    }


def record_text(record: dict[str, Any]) -> str:
    """All the text of a record (message contents joined by newlines, then a rejected answer; or the
    document)."""
    if record["messages"]:
        parts = [m["content"] for m in record["messages"]]
        rejected = record.get("rejected")
        return "\n".join([*parts, rejected] if rejected else parts)
    return record["text"]


def field_value(record: dict[str, Any], field: str) -> str:
    """The value of `field` ('label', 'source', 'split', or 'metadata.<key>') as text; "" when absent."""
    if field.startswith("metadata."):
        value = json.loads(record["metadata"] or "{}").get(field.split(".", 1)[1])
        return "" if value is None else str(value)
    if field in ("label", "source", "split", "augmented", "origin", "rejected"):
        return record[field] or ""
    raise ValueError(f"unknown record field {field!r}: use label, source or metadata.<key>")


def batch_rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """The rows of a column batch."""
    columns = list(batch)
    return [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def rows_batch(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str]) -> dict[str, list]:
    """A column batch of rows."""
    return {column: [row[column] for row in rows] for column in columns}


def column_values(dataset: Any, name: str) -> list:
    """One column of a `datasets.Dataset` as a Python list, read through Arrow.

    `dataset[name]` in datasets 5 is a lazy column whose iteration decodes row by row (about 35 s for a
    million strings here); the Arrow path is a single conversion.
    """
    return dataset.with_format("arrow")[name].to_pylist()
