"""Blinded human review sheets: export, fill in, import."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from seektune.config import ReviewConfig
from seektune.errors import UserError
from seektune.evaluate.review import export_review, import_review
from seektune.rundir import RunDir

N = 12
MODELS = ("base", "tuned", "other")


def _export(tmp_path: Path, name: str = "run", **cfg) -> tuple[RunDir, dict]:
    run = RunDir.create_at(tmp_path / name)
    prompts = [f"问题 {i}：什么是机器学习？" for i in range(N)]
    references = [f"参考答案 {i}" for i in range(N)]
    outputs = {model: [f"{model} 的回答 {i}" for i in range(N)] for model in MODELS}
    return run, export_review(run, prompts, references, outputs, ReviewConfig(**cfg), seed=0)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _key(run: RunDir) -> dict[str, list[str]]:
    return json.loads((run.path / "eval/review-key.json").read_text(encoding="utf-8"))["rows"]


def test_export_writes_a_blinded_sheet_and_its_key(tmp_path):
    run, result = _export(tmp_path, max_samples=10, max_models=2)
    assert result == {
        "sheet": "eval/review.csv",
        "jsonl": "eval/review.jsonl",
        "key": "eval/review-key.json",
        "models": ["base", "tuned"],
        "rows": 10,
        "scale": "1-5",
    }
    raw = (run.path / "eval/review.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the BOM Excel needs for UTF-8
    fields, rows = _read_csv(run.path / "eval/review.csv")
    assert fields == ["id", "prompt", "reference", "output_1", "output_2", "score_1", "score_2", "comment"]
    assert len(rows) == 10
    assert rows[3]["prompt"] == "问题 3：什么是机器学习？" and rows[3]["reference"] == "参考答案 3"
    assert all(row["score_1"] == "" and row["score_2"] == "" for row in rows)
    assert not any("base" in cell or "tuned" in cell for cell in fields)  # blinded header

    key = _key(run)
    assert list(key) == [row["id"] for row in rows]
    orders = {tuple(order) for order in key.values()}
    assert orders == {("base", "tuned"), ("tuned", "base")}  # the order differs across rows
    for row in rows:  # the key unblinds every output
        for j, model in enumerate(key[row["id"]], 1):
            assert row[f"output_{j}"].startswith(f"{model} 的回答")

    jsonl = [json.loads(line) for line in (run.path / "eval/review.jsonl").read_text("utf-8").splitlines()]
    assert [r["id"] for r in jsonl] == list(key)
    assert jsonl[0]["output_1"] == rows[0]["output_1"] and jsonl[0]["score_1"] is None


def test_export_is_deterministic_per_seed_and_tags_ids_per_run(tmp_path):
    first, _ = _export(tmp_path, "a")
    key = _key(first)
    again, _ = _export(tmp_path, "a")  # the same run exported again
    assert _key(again) == key
    other, _ = _export(tmp_path, "b")
    assert set(_key(other)).isdisjoint(key)
    assert [order for order in _key(other).values()] == list(key.values())  # same seed, same orders


def test_cells_that_look_like_formulas_are_escaped_in_the_csv_only(tmp_path):
    run = RunDir.create_at(tmp_path / "run")
    outputs = {"base": ["- item one\n- item two"], "tuned": ["=HYPERLINK(1)"]}
    export_review(run, ["+1?"], ["@ref"], outputs, ReviewConfig(), seed=0)
    _, rows = _read_csv(run.path / "eval/review.csv")
    assert rows[0]["prompt"] == "'+1?" and rows[0]["reference"] == "'@ref"
    assert {rows[0]["output_1"], rows[0]["output_2"]} == {"'- item one\n- item two", "'=HYPERLINK(1)"}
    jsonl = json.loads((run.path / "eval/review.jsonl").read_text("utf-8"))
    assert jsonl["prompt"] == "+1?"


def _fill(run: RunDir, scores_by_model: list[dict[str, str]], path: Path) -> Path:
    """Fill the exported CSV: row i gets scores_by_model[i][model] in the blinded columns."""
    fields, rows = _read_csv(run.path / "eval/review.csv")
    key = _key(run)
    for row, scores in zip(rows, scores_by_model, strict=False):
        for j, model in enumerate(key[row["id"]], 1):
            row[f"score_{j}"] = scores.get(model, "")
        row["comment"] = "很好"
    return _write_csv(path, fields, rows)


def test_round_trip_gives_hand_computed_means_and_win_rates(tmp_path):
    run, _ = _export(tmp_path, max_samples=4)
    filled = [
        {"base": "2", "tuned": "5", "other": "3"},  # tuned wins
        {"base": "4", "tuned": "4", "other": "1"},  # base and tuned tie: half a win each
        {"base": "1", "tuned": "3", "other": "3.5"},  # other wins
        {"base": "5", "tuned": ""},  # not fully rated: counts for the means, not the wins
    ]
    result = import_review(run, _fill(run, filled, tmp_path / "filled.csv"))
    assert result["rows"] == 4 and result["rated_rows"] == 4 and result["compared_rows"] == 3
    models = result["models"]
    assert list(models) == list(MODELS)
    assert models["base"] == {"mean": pytest.approx(3.0), "n": 4, "win_rate": pytest.approx(0.5 / 3)}
    assert models["tuned"] == {"mean": pytest.approx(4.0), "n": 3, "win_rate": pytest.approx(1.5 / 3)}
    assert models["other"] == {"mean": pytest.approx(7.5 / 3), "n": 3, "win_rate": pytest.approx(1 / 3)}
    assert result["sheet"] == str(tmp_path / "filled.csv")
    written = json.loads((run.path / "eval/review-scores.json").read_text("utf-8"))
    assert written["models"] == result["models"]
    assert written["per_row"][1]["scores"] == {"base": 4.0, "tuned": 4.0, "other": 1.0}
    assert written["per_row"][0]["comment"] == "很好"


def test_jsonl_sheet_imports_the_same_way(tmp_path):
    run, _ = _export(tmp_path, max_samples=2, max_models=2)
    key = _key(run)
    lines = []
    for row_id, order in key.items():
        scores = {"base": 2, "tuned": 4}
        lines.append(json.dumps({"id": row_id, **{f"score_{j}": scores[m] for j, m in enumerate(order, 1)}}))
    sheet = tmp_path / "filled.jsonl"
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = import_review(run, sheet)
    assert result["models"]["tuned"] == {"mean": 4.0, "n": 2, "win_rate": 1.0}
    assert result["models"]["base"]["win_rate"] == 0.0


def test_excel_semicolon_csv_and_empty_rows_are_read(tmp_path):
    run, _ = _export(tmp_path, max_samples=2, max_models=2)
    fields, rows = _read_csv(run.path / "eval/review.csv")
    for row in rows:
        row["score_1"], row["score_2"] = "4,5", "2"
    sheet = tmp_path / "excel.csv"
    with sheet.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
        handle.write(";;;;;;;\r\n")
    result = import_review(run, sheet)
    assert result["rated_rows"] == 2
    key = _key(run)
    for model in ("base", "tuned"):
        expected = [4.5 if order[0] == model else 2.0 for order in key.values()]
        assert result["models"][model]["mean"] == pytest.approx(sum(expected) / 2)


@pytest.mark.parametrize(
    ("score", "message"),
    [
        ("6", r"row 3, column score_2: '6' is not a score from 1 to 5; write a number 1-5 or leave it empty"),
        ("good", r"row 3, column score_2: 'good' is not a score from 1 to 5"),
        ("0", r"row 3, column score_2: '0' is not a score"),
    ],
)
def test_bad_scores_name_row_and_column(tmp_path, score, message):
    run, _ = _export(tmp_path, max_samples=3, max_models=2)
    fields, rows = _read_csv(run.path / "eval/review.csv")
    rows[1]["score_2"] = score
    with pytest.raises(UserError, match=message):
        import_review(run, _write_csv(tmp_path / "bad.csv", fields, rows))


def test_unknown_id_duplicate_and_missing_column(tmp_path):
    run, _ = _export(tmp_path, max_samples=3, max_models=2)
    fields, rows = _read_csv(run.path / "eval/review.csv")
    rows[2]["id"] = rows[2]["id"][:-3] + "999"
    with pytest.raises(UserError, match=r"row 4, column id: unknown id '.+-999' .*keep the ids as exported"):
        import_review(run, _write_csv(tmp_path / "bad.csv", fields, rows))

    _, rows = _read_csv(run.path / "eval/review.csv")
    rows[2]["id"] = rows[0]["id"]
    with pytest.raises(UserError, match=r"row 4, column id: id .+ appears twice"):
        import_review(run, _write_csv(tmp_path / "bad.csv", fields, rows))

    _, rows = _read_csv(run.path / "eval/review.csv")
    narrow = [f for f in fields if f != "score_2"]
    rows = [{f: row[f] for f in narrow} for row in rows]
    with pytest.raises(UserError, match=r"row 2: column score_2 is missing"):
        import_review(run, _write_csv(tmp_path / "bad.csv", narrow, rows))


def test_sheet_from_another_run_is_refused(tmp_path):
    run, _ = _export(tmp_path, "a", max_samples=3)
    other, _ = _export(tmp_path, "b", max_samples=3)
    with pytest.raises(
        UserError, match=r"is not the review sheet of .*none of its ids is in eval/review-key.json"
    ):
        import_review(run, other.path / "eval/review.csv")


def test_bad_files(tmp_path):
    run, _ = _export(tmp_path, max_samples=2)
    with pytest.raises(UserError, match="does not exist"):
        import_review(run, tmp_path / "nope.csv")
    xlsx = tmp_path / "sheet.xlsx"
    xlsx.write_bytes(b"PK")
    with pytest.raises(UserError, match=r"must be a \.csv or \.jsonl file"):
        import_review(run, xlsx)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,score_1\nr-001,\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="save it as 'CSV UTF-8'"):
        import_review(run, latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        import_review(run, broken)
    fresh = RunDir.create_at(tmp_path / "fresh")
    with pytest.raises(UserError, match=r"has no eval/review-key\.json: export a review sheet first"):
        import_review(fresh, run.path / "eval/review.csv")
