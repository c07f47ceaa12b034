"""Reading data sources into chat records.

JSON and JSON Lines files are read line by line with the standard library, so that an error names the line;
the built-in task comes from `seektune.data.stdlib_docs`. (The data-pipeline issue moves large sources onto
`datasets`.) Every record becomes
`{"messages": [...], "source": str}` (see `formats.to_messages`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from seektune.config import SourceConfig
from seektune.data.formats import to_messages
from seektune.errors import UserError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASKS = ("stdlib-docs-qa",)
FILE_SUFFIXES = (".jsonl", ".json")


def load_source(source: SourceConfig) -> dict[str, list[dict[str, Any]]]:
    """Records of one source by split. A source without its own splits returns everything under 'all'."""
    if source.path.startswith(BUILTIN_PREFIX):
        return _load_builtin(source.path[len(BUILTIN_PREFIX) :])
    return {"all": _load_file(Path(source.path).expanduser())}


def _load_builtin(task: str) -> dict[str, list[dict[str, Any]]]:
    if task not in BUILTIN_TASKS:
        raise UserError(
            f"unknown built-in dataset 'builtin:{task}': available are "
            + ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS)
        )
    from seektune.data.stdlib_docs import SPLITS, qa_examples

    return {split: qa_examples(split) for split in SPLITS}


def _load_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"data source {path} does not exist: fix data.sources[].path in the config")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"data source {path}: unsupported file type '{path.suffix}'; use .jsonl or .json")
    try:
        rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_json(path)
    except UnicodeDecodeError:
        raise UserError(
            f"data source {path} is not UTF-8 text: convert it (e.g. iconv -f GBK -t UTF-8)"
        ) from None
    records = []
    unrecognised = 0
    for index, row in enumerate(rows):
        messages = to_messages(row) if isinstance(row, dict) else None
        if messages is None:
            unrecognised += 1
            continue
        records.append({"messages": messages, "source": f"{path.name}:{index}"})
    if not records:
        raise UserError(
            f"data source {path} has no usable records: each needs 'messages', 'conversations', "
            "'instruction'+'output', 'prompt'+'completion' or 'question'+'answer'"
        )
    if unrecognised:
        logger.warning(
            "%s: %d of %d records have an unrecognised shape and were skipped", path, unrecognised, len(rows)
        )
    return records


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}, line {number}: not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
    return rows


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} or a single record
        data = data.get("data", [data])
    if not isinstance(data, list):
        raise UserError(f'{path}: expected a list of records or {{"data": [...]}}')
    return data
