"""Reading one data source into records (`records.RECORD_FEATURES`) as an Arrow dataset on disk.

A source is a file (.jsonl .json .csv .parquet .txt .md), a folder of such files, a dataset saved with
`datasets.save_to_disk` (a `Dataset`, or a `DatasetDict` whose train/validation/test splits set `split`) or a
built-in task (`builtin:stdlib-docs-qa`). Its rows stream through a generator into an Arrow file under
`cache_dir`, written batch by batch and memory-mapped as a `datasets.Dataset`, so a source larger than
memory never has to fit in it; only a .json document (one JSON value) and a text file read with
text_unit 'file' are read whole. `max_samples` limits each split a source brings (train, validation and test
of a saved DatasetDict or the built-in task) separately, so that a limit never empties the held-out splits;
records without a split of their own count together.

Why our own code: `datasets.load_dataset('json' | 'csv' | 'text')` reads these formats but cannot say on
which line a record is malformed, cannot skip and count bad records (data.on_error) and infers a schema
where we have one; so text formats are read with the standard library, line by line, and Parquet with
pyarrow's batch iterator. Row shapes are recognised in `formats.py`. The records are written with
`pyarrow.Table.from_pylist` in batches rather than through `Dataset.from_generator`, whose per-example
`encode_example` took 70% of the time (100k alpaca rows: 18 s through it, 6 s this way); the file is the
same Arrow stream `datasets` writes, opened with `Dataset.from_file`.

The cache key holds the source's settings, data.on_error, the path, size, mtime and inode of every file
read and a digest of the loader's own code: a changed file or setting is read afresh and two sources
never share an entry. Counts of skipped records are kept beside the records, so a cached load reports
them too. Source files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetDict, load_from_disk

from seektune.config import SourceConfig
from seektune.data.formats import SHAPES_EXPECTED, InvalidRecord, MissingField, to_record_fields
from seektune.data.records import RECORD_FEATURES, batch_rows, make_record
from seektune.errors import UserError
from seektune.rundir import atomic_write_json

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASKS = ("stdlib-docs-qa",)
FORMAT_OF_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
SUPPORTED = ".jsonl .json .csv .parquet .txt .md, a folder of them, a datasets.save_to_disk folder"
SAVED_DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
SPLIT_NAMES |= {"dev": "validation", "eval": "validation", "test": "test"}
# Python's csv refuses fields over 128 KiB by default; a CSV of documents has longer ones.
_CSV_FIELD_LIMIT = 2**31 - 1
_BATCH_ROWS = 1000
_SKIP_ADVICE = "or set data.on_error: skip to skip and count such records"

# A reader yields (position, row, problem): position is the line (record number where lines mean nothing),
# row the parsed object, problem (reason, what is wrong and what to do) when the row is unusable.
Problem = tuple[str, str]
Row = tuple[int | str, dict[str, Any] | None, Problem | None]


@dataclass
class LoadedSource:
    """One source's records (`dataset` has exactly RECORD_FEATURES) and what was skipped, by reason."""

    name: str
    dataset: Dataset
    skipped: int
    skip_reasons: dict[str, int]


@dataclass(frozen=True)
class _Part:
    """One stream of rows: a file, one split of a saved dataset, or one split of a built-in task."""

    where: str  # how messages name it: the file's path (a saved dataset: path[split])
    origin_name: str  # how `origin` names it: the file name (in a folder: its relative path)
    unit: str  # what a position counts: "line" or "record"
    split: str
    fields: dict[str, str]
    read: Callable[[], Iterator[Row]]

    def location(self, position: int | str) -> str:
        return f"{self.where}:{position}" if self.unit == "line" else f"{self.where}, record {position}"


@dataclass(frozen=True)
class _Plan:
    name: str
    where: str
    single_file: bool
    parts: tuple[_Part, ...]
    max_samples: int | None  # per split that the records are given
    stamps: tuple[tuple[Any, ...], ...]  # what the cache key sees of the files read


def load_source(source: SourceConfig, on_error: str, cache_dir: Path) -> LoadedSource:
    """Read one source into records; bad records stop with file:line (on_error 'stop') or are counted."""
    plan = _plan(source)
    fingerprint = _fingerprint(source, on_error, plan)
    records_file = Path(cache_dir) / f"records-{fingerprint}.arrow"
    skips_file = records_file.with_suffix(".skips.json")
    if records_file.is_file() and skips_file.is_file():
        reasons = json.loads(skips_file.read_text())
    else:
        reasons = _write_records(plan, on_error, records_file, skips_file)
    skipped = sum(reasons.values())
    if skipped:
        logger.warning(
            "data source %s: skipped %d records (%s) because data.on_error is 'skip'",
            plan.where,
            skipped,
            _describe(reasons),
        )
    return LoadedSource(plan.name, Dataset.from_file(str(records_file)), skipped, reasons)


def _write_records(plan: _Plan, on_error: str, records_file: Path, skips_file: Path) -> dict[str, int]:
    """Write the records in Arrow batches (temporary file, then rename); the skip counts by reason."""
    records_file.parent.mkdir(parents=True, exist_ok=True)
    schema = RECORD_FEATURES.arrow_schema
    reasons: Counter = Counter()
    temporary = records_file.with_name(f".{records_file.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            batch = []
            for record in _generate_records(plan, on_error, reasons):
                batch.append(record)
                if len(batch) == _BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        atomic_write_json(skips_file, dict(reasons))
        os.replace(temporary, records_file)
    finally:
        temporary.unlink(missing_ok=True)
    return dict(reasons)


def _generate_records(plan: _Plan, on_error: str, reasons: Counter) -> Iterator[dict[str, Any]]:
    kept: Counter = Counter()  # records per split: max_samples applies to each split on its own
    for part in plan.parts:
        if kept[part.split] == plan.max_samples:
            continue
        for position, row, problem in part.read():
            record = None
            if problem is None:
                record, problem = _record_of(row, part, position, plan.name)
            if problem is not None:
                reason, message = problem
                if on_error == "stop":
                    raise UserError(f"{part.location(position)}: {message}, {_SKIP_ADVICE}")
                reasons[reason] += 1
                continue
            yield record
            kept[part.split] += 1
            if kept[part.split] == plan.max_samples:
                break
    if sum(kept.values()) == 0:
        raise _no_records(plan, reasons)


def _record_of(
    row: dict[str, Any], part: _Part, position: int | str, source: str
) -> tuple[dict[str, Any] | None, Problem | None]:
    try:
        fields = to_record_fields(row, part.fields)
    except MissingField as exc:
        return None, (
            "missing_field",
            f"column '{exc.column}' (mapped to '{exc.field}' in data.sources[].fields) is missing; "
            f"the row has {_keys(exc.keys)}: fix data.sources[].fields",
        )
    except InvalidRecord as exc:
        return None, ("invalid_record", f"{exc}: fix the record")
    if fields is None:
        return None, (
            "unrecognised_shape",
            f"unrecognised record shape, the row has {_keys(row)}; expected {SHAPES_EXPECTED}: "
            "name your columns with data.sources[].fields (e.g. {instruction: question, output: answer})",
        )
    messages, text, metadata, label, rejected = fields
    return make_record(
        rejected=rejected,
        messages=messages,
        text=text,
        source=source,
        origin=f"{part.origin_name}:{position}",
        metadata=metadata,
        label=label,
        split=part.split,
    ), None


def _no_records(plan: _Plan, reasons: Counter) -> UserError:
    if reasons:
        return UserError(
            f"data source {plan.where} has no usable records: every record was skipped "
            f"({sum(reasons.values())}: {_describe(reasons)}); fix the data, or map its "
            "columns with data.sources[].fields"
        )
    what = "the file is empty" if plan.single_file else "its files are empty"
    return UserError(
        f"data source {plan.where} has no records ({what}): add records or remove it from data.sources"
    )


# ---------------------------------------------------------------------------------------------------------
# Planning: which streams a source is made of, decided before anything is read


def _plan(source: SourceConfig) -> _Plan:
    if source.path.startswith(BUILTIN_PREFIX):
        return _builtin_plan(source)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise UserError(f"data source {path} does not exist: fix data.sources[].path in the config")
    given, path = path, path.resolve()
    if path.is_dir():
        name = given.name or path.name  # "." names no folder
        parts = _folder_parts(path, source)
    else:
        name = given.stem
        parts = [_file_part(path, source, _format_of(path, source.format), given.name)]
    return _Plan(
        source.name or name, str(path), path.is_file(), tuple(parts), source.max_samples, _stamps(path)
    )


def _builtin_plan(source: SourceConfig) -> _Plan:
    from seektune.data import stdlib_docs

    task = source.path[len(BUILTIN_PREFIX) :]
    if task not in BUILTIN_TASKS:
        raise UserError(
            f"unknown built-in dataset '{source.path}': available are "
            + ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS)
            + "; fix data.sources[].path"
        )
    parts = tuple(
        _Part(
            where=source.path,
            origin_name=task,
            unit="record",
            split=split if source.split == "auto" else source.split,
            fields={},
            read=functools.partial(_read_builtin, split),
        )
        for split in stdlib_docs.SPLITS
    )
    # The task is made from this Python's standard library by this module's code.
    stamps = (_stamp(Path(stdlib_docs.__file__)), (sys.version,))
    return _Plan(source.name or task, source.path, False, parts, source.max_samples, stamps)


def _format_of(path: Path, format_name: str) -> str:
    if format_name == "arrow":
        raise UserError(
            f"data source {path}: format 'arrow' reads a folder saved with datasets.save_to_disk, not a "
            "file: point data.sources[].path at that folder or fix data.sources[].format"
        )
    if format_name != "auto":
        return format_name
    found = FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise UserError(
            f"data source {path}: unsupported file type '{path.suffix}'; supported are {SUPPORTED}, or "
            "set data.sources[].format (jsonl, json, csv, parquet, text) to read it as one of them"
        )
    return found


def _file_part(path: Path, source: SourceConfig, format_name: str, origin_name: str) -> _Part:
    readers: dict[str, Callable[[], Iterator[Row]]] = {
        "jsonl": functools.partial(_read_jsonl, path),
        "json": functools.partial(_read_json, path),
        "csv": functools.partial(_read_csv, path),
        "parquet": functools.partial(_read_parquet, path),
        "text": functools.partial(_read_text, path, source.text_unit),
    }
    return _Part(
        where=str(path),
        origin_name=origin_name,
        unit="record" if format_name in ("json", "parquet") else "line",
        split="" if source.split == "auto" else source.split,
        fields={} if format_name == "text" else dict(source.fields),
        read=readers[format_name],
    )


def _folder_parts(folder: Path, source: SourceConfig) -> list[_Part]:
    if source.format in ("auto", "arrow") and _is_saved_dataset(folder):
        return _saved_parts(folder, source, folder.name)
    if source.format == "arrow":
        raise UserError(
            f"data source {folder} is not a dataset saved with datasets.save_to_disk (it has no "
            "dataset_info.json + state.json or dataset_dict.json): fix data.sources[].format"
        )
    parts, ignored = [], []
    for relative, path in _folder_entries(folder):
        if path.is_dir():
            parts += _saved_parts(path, source, relative)
        elif source.format != "auto" or path.suffix.lower() in FORMAT_OF_SUFFIX:
            parts.append(_file_part(path, source, _format_of(path, source.format), relative))
        else:
            ignored.append(relative)
    if ignored:
        logger.warning(
            "data source %s: ignored %d files of unsupported types: %s", folder, len(ignored), ignored[:5]
        )
    if not parts:
        raise UserError(
            f"data source {folder} holds no data files: supported are {SUPPORTED}; fix data.sources[].path"
        )
    return parts


def _folder_entries(folder: Path) -> list[tuple[str, Path]]:
    """Files in a folder and its subfolders, sorted, hidden ones left out; saved datasets as one entry."""
    entries = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for name in list(subdirectories):
            if _is_saved_dataset(Path(directory, name)):
                subdirectories.remove(name)
                entries.append(Path(directory, name))
        entries += [Path(directory, name) for name in files if not name.startswith(".")]
    return sorted((path.relative_to(folder).as_posix(), path) for path in entries)


def _is_saved_dataset(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in marker) for marker in SAVED_DATASET_MARKERS)


def _saved_parts(folder: Path, source: SourceConfig, origin_name: str) -> list[_Part]:
    try:
        saved = load_from_disk(str(folder))
    except (pa.ArrowException, OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"data source {folder}: the dataset saved there with datasets.save_to_disk cannot be read "
            f"({_one_line(exc)}): it is damaged or incomplete; save it again, or fix data.sources[].path"
        ) from None
    splits = saved if isinstance(saved, DatasetDict) else {"": saved}
    parts = []
    for split_name, dataset in splits.items():
        split = SPLIT_NAMES.get(split_name.lower(), "") if split_name else ""
        if split_name and not split and source.split == "auto":
            raise UserError(
                f"data source {folder} has a split '{split_name}': seektune reads train, validation "
                "(or valid, val, dev, eval) and test; save only those, or set data.sources[].split to "
                "put all of them into one split"
            )
        suffix = f"[{split_name}]" if split_name else ""
        parts.append(
            _Part(
                where=f"{folder}{suffix}",
                origin_name=f"{origin_name}{suffix}",
                unit="record",
                split=split if source.split == "auto" else source.split,
                fields=dict(source.fields),
                read=functools.partial(_read_dataset, dataset),
            )
        )
    return parts


# ---------------------------------------------------------------------------------------------------------
# Readers


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, line in _utf8_lines(handle, path):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    number,
                    None,
                    (
                        "malformed_json",
                        f"not valid JSON ({exc.msg}, column {exc.colno}): fix or remove that line",
                    ),
                )
                continue
            yield number, *_object_or_problem(value)


def _read_json(path: Path) -> Iterator[Row]:
    text = _decode_whole(path)
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}): fix the file (a JSON "
            "document stops at its first error; as JSON Lines, one record per line, data.on_error: skip "
            "can pass over bad lines)"
        ) from None
    if isinstance(value, dict):
        value = value["data"] if isinstance(value.get("data"), list) else [value]
    if not isinstance(value, list):
        raise UserError(
            f"{path} holds a JSON {type(value).__name__}: expected a list of records, "
            '{"data": [...]} or one record (an object)'
        )
    for number, item in enumerate(value, start=1):
        yield number, *_object_or_problem(item)


def _object_or_problem(value: Any) -> tuple[dict[str, Any] | None, Problem | None]:
    if isinstance(value, dict):
        return value, None
    return None, (
        "malformed_row",
        f"a JSON {type(value).__name__}, not an object with fields: fix the record",
    )


def _read_csv(path: Path) -> Iterator[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with path.open("rb") as handle:
        reader = csv.reader(line for _, line in _utf8_lines(handle, path))
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, None, ("malformed_row", f"not a valid CSV row ({exc}): fix the row")
                start = reader.line_num + 1
                continue
            number, start = start, reader.line_num + 1
            if not values:
                continue
            if len(values) != len(header):
                problem = (
                    f"{len(values)} fields where the header has {len(header)}: "
                    "fix the row (quote fields that hold commas)"
                )
                yield number, None, ("malformed_row", problem)
                continue
            yield number, dict(zip(header, values, strict=True)), None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{path} is not a readable Parquet file ({exc}): fix data.sources[].path or .format"
        ) from None
    number = 0
    with parquet:
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS)
        while True:
            try:  # a damaged row group fails only when it is reached
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise UserError(
                    f"{path}: the Parquet file is damaged after record {number} and cannot be read "
                    f"further ({_one_line(exc)}): replace it with an intact copy (export or download it "
                    "again), or fix data.sources[].path"
                ) from None
            if batch is None:
                return
            for row in rows:
                number += 1
                yield number, row, None


def _read_text(path: Path, unit: str) -> Iterator[Row]:
    if unit == "file":
        text = _decode_whole(path).strip()
        if text:
            yield 1, {"text": text}, None
        return
    with path.open("rb") as handle:
        if unit == "line":
            for number, line in _utf8_lines(handle, path):
                if line.strip():
                    yield number, {"text": line.strip()}, None
            return
        yield from _paragraphs(_utf8_lines(handle, path))


def _paragraphs(lines: Iterator[tuple[int, str]]) -> Iterator[Row]:
    start, paragraph = 0, []
    for number, line in lines:
        if line.strip():
            start = start or number
            paragraph.append(line.rstrip())
        elif paragraph:
            yield start, {"text": "\n".join(paragraph)}, None
            start, paragraph = 0, []
    if paragraph:
        yield start, {"text": "\n".join(paragraph)}, None


def _read_dataset(dataset: Dataset) -> Iterator[Row]:
    number = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for row in batch_rows(batch):
            number += 1
            yield number, row, None


def _read_builtin(split: str) -> Iterator[Row]:
    from seektune.data.stdlib_docs import qa_examples

    for example in qa_examples(split):
        yield example["source"], {"messages": example["messages"]}, None


def _utf8_lines(handle: Any, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file; bytes that are not UTF-8 stop with the line they are on."""
    for number, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _not_utf8(path, number) from None
        yield number, line.removeprefix("\ufeff") if number == 1 else line


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data.count(b"\n", 0, exc.start) + 1) from None


def _not_utf8(path: Path, line: int) -> UserError:
    return UserError(
        f"{path}:{line}: not UTF-8 text: convert the file to UTF-8, e.g. "
        f"iconv -f GBK -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix} (GBK or whatever its encoding is)"
    )


# ---------------------------------------------------------------------------------------------------------
# Cache key and bookkeeping


def _fingerprint(source: SourceConfig, on_error: str, plan: _Plan) -> str:
    key = {
        "source": source.model_dump(mode="json", exclude={"ratio"}),
        "where": plan.where,
        "on_error": on_error,
        "files": plan.stamps,
        "code": _code_digest(),
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()


@functools.cache
def _code_digest() -> str:
    """A digest of the code that turns rows into records: a new version of it must not reuse old caches."""
    from seektune.data import formats, records

    digest = hashlib.blake2b(digest_size=16)
    for module_file in (__file__, formats.__file__, records.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


def _stamps(path: Path) -> tuple[tuple[Any, ...], ...]:
    if path.is_file():
        return (_stamp(path),)
    return tuple(_stamp(Path(d, name)) for d, _, files in sorted(os.walk(path)) for name in sorted(files))


def _stamp(path: Path) -> tuple[Any, ...]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _keys(row: dict[str, Any] | list[str]) -> str:
    keys = sorted(str(key) for key in row)
    shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    return f"keys {shown}" if keys else "no keys"


def _describe(reasons: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
