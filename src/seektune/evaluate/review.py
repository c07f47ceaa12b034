"""Human review: a blinded sheet of model outputs for domain experts, and their scores read back.

`export_review` writes, inside the run:
- eval/review.csv: UTF-8 with a byte-order mark (so Excel shows Chinese correctly), columns id, prompt,
  reference, output_1..N, score_1..N (empty, for the reviewer: 1-5), comment. Each row shows the models'
  outputs in its own seeded random order, so a reviewer cannot tell which model wrote which output.
- eval/review.jsonl: the same rows as JSON objects (scores null).
- eval/review-key.json: {"models": [...], "rows": {id: [model of output_1, ...]}}, the key that unblinds
  the sheet (reviewers do not see it).
Row ids carry a tag derived from the run, the seed and the prompts, so a sheet from another run is told
apart from this run's sheet even when both have as many rows.

In the CSV only, a cell that starts with =, +, -, @ or a tab gets a leading apostrophe: spreadsheets read
such cells as formulas (showing #NAME? for an answer that starts with "- item", or running a formula a
model wrote). The JSONL keeps the text as it is.

`import_review` reads a filled sheet (CSV or JSONL), unblinds it and reports per model the mean score,
how many outputs were rated and the win rate: the share of fully rated rows (every output scored) where
the model scored highest, a tie splitting the win between the tied models. Empty scores are "not rated".

Annotation tools (Label Studio, Argilla) need a server; a CSV opens anywhere, so this module is ours.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from seektune.config import ReviewConfig
from seektune.errors import UserError
from seektune.rundir import RunDir

logger = logging.getLogger(__name__)

SHEET = "eval/review.csv"
JSONL = "eval/review.jsonl"
KEY = "eval/review-key.json"
SCORES = "eval/review-scores.json"
SCALE = (1.0, 5.0)
_BOM = "\ufeff"
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# ---------------------------------------------------------------------------------------------------------
# Export


def export_review(
    run: RunDir,
    prompts: list[str],
    references: list[str],
    outputs: dict[str, list[str]],
    cfg: ReviewConfig,
    seed: int,
) -> dict:
    """Write the blinded review sheet (CSV and JSONL) and its key into `run`/eval."""
    models = list(outputs)[: cfg.max_models]
    if not models:
        raise ValueError("export_review needs the outputs of at least one model")
    n = min(cfg.max_samples, len(prompts))
    short = {name: len(outputs[name]) for name in models if len(outputs[name]) < n}
    if len(references) < n or short:
        raise ValueError(
            f"need {n} references and outputs per model; got {len(references)} references, {short}"
        )
    tag = _sheet_tag(run, seed, prompts[:n])
    rows, key = [], {}
    for i in range(n):
        row_id = f"{tag}-{i + 1:03d}"
        order = [models[j] for j in np.random.default_rng([seed, i]).permutation(len(models))]
        key[row_id] = order
        rows.append(_sheet_row(row_id, prompts[i], references[i], [outputs[name][i] for name in order]))
    run.write_text(SHEET, _csv_text(_columns(len(models)), rows))
    run.write_jsonl(JSONL, rows)
    run.write_json(KEY, {"models": models, "rows": key})
    logger.info("review sheet with %d rows and %d models written to %s", n, len(models), run.resolve(SHEET))
    return {"sheet": SHEET, "jsonl": JSONL, "key": KEY, "models": models, "rows": n, "scale": "1-5"}


def _sheet_tag(run: RunDir, seed: int, prompts: list[str]) -> str:
    """Six hex digits that tell this run's sheet from another's."""
    digest = hashlib.sha256(f"{run.path.name}\n{seed}\n".encode())
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()[:6]


def _columns(outputs: int) -> list[str]:
    numbers = range(1, outputs + 1)
    return [
        "id",
        "prompt",
        "reference",
        *(f"output_{j}" for j in numbers),
        *(f"score_{j}" for j in numbers),
        "comment",
    ]


def _sheet_row(row_id: str, prompt: str, reference: str, texts: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": row_id, "prompt": prompt, "reference": reference}
    row.update({f"output_{j}": text for j, text in enumerate(texts, 1)})
    row.update({f"score_{j}": None for j in range(1, len(texts) + 1)})
    row["comment"] = ""
    return row


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _spreadsheet_safe(value) for column, value in row.items()})
    return _BOM + buffer.getvalue()


def _spreadsheet_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Import


def import_review(run: RunDir, sheet: Path) -> dict:
    """Read a filled review sheet, unblind it with the run's key, and write eval/review-scores.json."""
    sheet = Path(sheet)
    models, key = _read_key(run)
    per_row = _unblind(sheet, _read_sheet(sheet), key, run)
    result = _summarise(models, per_row, total=len(key))
    result["sheet"] = str(sheet)
    run.write_json(SCORES, {**result, "per_row": per_row})
    logger.info("review scores of %d rated rows read from %s", result["rated_rows"], sheet)
    return result


def _unblind(
    sheet: Path, records: list[tuple[str, dict[str, Any]]], key: dict[str, list[str]], run: RunDir
) -> list[dict[str, Any]]:
    """{"id", "scores": {model: score}, "comment"} per sheet row, in sheet order."""
    ids = [str(record.get("id") or "").strip() for _, record in records]
    if records and not any(row_id in key for row_id in ids):
        raise UserError(
            f"{sheet} is not the review sheet of {run.path}: none of its ids is in {KEY}; "
            "import it into the run that wrote it"
        )
    per_row, seen = [], set()
    for (where, record), row_id in zip(records, ids, strict=True):
        if row_id not in key:
            raise UserError(
                f"{sheet} {where}, column id: unknown id {row_id!r} (not in {KEY}); keep the ids as exported"
            )
        if row_id in seen:
            raise UserError(f"{sheet} {where}, column id: id {row_id} appears twice; keep one row per id")
        seen.add(row_id)
        scores = _row_scores(sheet, where, record, key[row_id])
        per_row.append({"id": row_id, "scores": scores, "comment": str(record.get("comment") or "")})
    return per_row


def _read_key(run: RunDir) -> tuple[list[str], dict[str, list[str]]]:
    if not run.resolve(KEY).is_file():
        raise UserError(
            f"{run.path} has no {KEY}: export a review sheet first (eval.review.enabled: true), "
            "then import the filled sheet into that run"
        )
    key = run.read_json(KEY)
    return list(key["models"]), {row_id: list(order) for row_id, order in key["rows"].items()}


def _read_sheet(sheet: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per row: where is 'row 3' (as a spreadsheet numbers it) or 'line 3' (JSONL)."""
    if not sheet.is_file():
        raise UserError(f"review sheet {sheet} does not exist: give the path of the filled-in CSV or JSONL")
    suffix = sheet.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(
            f"review sheet {sheet} must be a .csv or .jsonl file (as exported), not {suffix or 'none'}"
        )
    try:
        text = sheet.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{sheet} is not UTF-8 text: save it as 'CSV UTF-8' (or JSONL in UTF-8)") from None
    return _csv_records(sheet, text) if suffix == ".csv" else _jsonl_records(sheet, text)


def _csv_records(sheet: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    first_line = text.split("\n", 1)[0]
    # Excel writes ';' between cells where the decimal mark is a comma
    delimiter = max(",;\t", key=first_line.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if "id" not in (reader.fieldnames or []):
        raise UserError(f"{sheet} has no id column: keep the header row of the exported sheet")
    # spreadsheet rows: the header is row 1, the first record row 2
    return [(f"row {i}", record) for i, record in enumerate(reader, 2) if not _blank(record)]


def _blank(record: dict[Any, Any]) -> bool:
    """A row of empty cells (spreadsheets write them as ',,,,')."""
    return not any(value.strip() for value in record.values() if isinstance(value, str))


def _jsonl_records(sheet: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{sheet} line {number} is not valid JSON ({exc.msg}): fix or remove it"
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"{sheet} line {number} is not a JSON object: keep one row object per line")
        records.append((f"line {number}", record))
    return records


def _row_scores(sheet: Path, where: str, record: dict[str, Any], order: list[str]) -> dict[str, float]:
    """model -> score of one row; outputs left empty are not rated."""
    scores = {}
    for j, model in enumerate(order, 1):
        column = f"score_{j}"
        if column not in record:
            raise UserError(
                f"{sheet} {where}: column {column} is missing; keep the score columns as exported"
            )
        score = _parse_score(sheet, where, column, record[column])
        if score is not None:
            scores[model] = score
    return scores


def _parse_score(sheet: Path, where: str, column: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        score = float(value.strip().replace(",", ".")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score) or not SCALE[0] <= score <= SCALE[1]:
        raise UserError(
            f"{sheet} {where}, column {column}: {value!r} is not a score from 1 to 5; "
            "write a number 1-5 or leave it empty (not rated)"
        )
    return score


def _summarise(models: list[str], per_row: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Mean, count and win rate per model over the rated rows."""
    wins = dict.fromkeys(models, 0.0)
    compared = 0
    for row in per_row:
        scores = row["scores"]
        if len(models) > 1 and len(scores) == len(models):
            best = max(scores.values())
            winners = [name for name, score in scores.items() if score == best]
            for name in winners:
                wins[name] += 1.0 / len(winners)
            compared += 1
    summary = {}
    for name in models:
        rated = [row["scores"][name] for row in per_row if name in row["scores"]]
        summary[name] = {
            "mean": sum(rated) / len(rated) if rated else None,
            "n": len(rated),
            "win_rate": wins[name] / compared if compared else None,
        }
    return {
        "models": summary,
        "rated_rows": sum(1 for row in per_row if row["scores"]),
        "compared_rows": compared,
        "rows": total,
    }
