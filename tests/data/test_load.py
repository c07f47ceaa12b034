"""Loading sources: every file format, folders, saved datasets, the built-in task, errors and the cache."""

import csv
import datetime
import decimal
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from seektune.config import SourceConfig
from seektune.data.load import load_source
from seektune.data.records import RECORD_FEATURES
from seektune.errors import UserError


def load(tmp_path: Path, path: Path | str, on_error: str = "stop", **source):
    return load_source(SourceConfig(path=str(path), **source), on_error, tmp_path / "cache")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(i: int) -> dict:
    return {"question": f"q{i}", "answer": f"a{i}"}


def contents(loaded) -> list[str]:
    return [
        m[0]["content"] if m else t
        for m, t in zip(loaded.dataset["messages"], loaded.dataset["text"], strict=True)
    ]


def test_jsonl_records_name_origin_and_schema(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps(qa(0)) + "\n\n" + json.dumps({**qa(1), "domain": "math", "label": "easy"}) + "\n"
    )
    loaded = load(tmp_path, path)
    assert loaded.name == "chat" and loaded.skipped == 0 and loaded.skip_reasons == {}
    assert loaded.dataset.features == RECORD_FEATURES
    rows = loaded.dataset.to_list()
    assert [r["origin"] for r in rows] == ["chat.jsonl:1", "chat.jsonl:3"]  # the blank line 2 is counted
    assert rows[1]["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert (rows[1]["source"], rows[1]["label"], rows[1]["split"]) == ("chat", "easy", "")
    assert json.loads(rows[1]["metadata"]) == {"domain": "math"}
    assert load(tmp_path, path, name="mine").dataset["source"] == ["mine", "mine"]


def test_chinese_sharegpt_and_documents(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}],
            "领域": "闲聊",
        },
        {"text": "《论语》：学而时习之。"},
    ]
    loaded = load(tmp_path, write_jsonl(tmp_path / "zh.jsonl", rows))
    assert contents(loaded) == ["你好", "《论语》：学而时习之。"]
    assert loaded.dataset[0]["metadata"] == '{"领域": "闲聊"}'
    assert loaded.dataset[1]["messages"] == []


@pytest.mark.parametrize(
    "document",
    [[qa(0), qa(1)], {"data": [qa(0), qa(1)]}, qa(0)],
    ids=["list", "data", "single"],
)
def test_json_document_forms(tmp_path, document):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document, indent=2))
    loaded = load(tmp_path, path)
    expected = 1 if document == qa(0) else 2
    assert contents(loaded) == ["q0", "q1"][:expected]
    assert loaded.dataset["origin"] == ["d.json:1", "d.json:2"][:expected]


def test_json_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": oops}\n]\n')
    with pytest.raises(UserError, match=r"d\.json:3: not valid JSON"):
        load(tmp_path, path, on_error="skip")  # one JSON document cannot be skipped in parts


def test_csv_with_quotes_multiline_fields_and_mapping(tmp_path):
    path = tmp_path / "faq.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ask", "reply", "topic"])
        writer.writerow(["a, b?", "yes", "x"])
        writer.writerow(["two\nlines", "ok", "y"])
        writer.writerow(["last", "fine", "z"])
    loaded = load(tmp_path, path, fields={"question": "ask", "answer": "reply"})
    assert contents(loaded) == ["a, b?", "two\nlines", "last"]
    assert loaded.dataset["origin"] == ["faq.csv:2", "faq.csv:3", "faq.csv:5"]  # where each row starts
    assert [json.loads(m) for m in loaded.dataset["metadata"]] == [{"topic": t} for t in "xyz"]


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nq0,a0\nq1,a1,extra\nq2,a2\n")
    with pytest.raises(UserError, match=r"bad\.csv:3: 3 fields where the header has 2.*data\.on_error: skip"):
        load(tmp_path, path)
    loaded = load(tmp_path, path, on_error="skip")
    assert contents(loaded) == ["q0", "q2"] and loaded.skip_reasons == {"malformed_row": 1}


def test_parquet_streams_rows_with_nulls_and_extra_columns(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "instruction": ["i0", "i1", "i2"],
            "input": [None, "more", ""],
            "output": ["o0", "o1", "o2"],
            "lang": ["en", "zh", None],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    loaded = load(tmp_path, path)
    assert contents(loaded) == ["i0", "i1\n\nmore", "i2"]
    assert loaded.dataset["origin"] == ["p.parquet:1", "p.parquet:2", "p.parquet:3"]
    assert [json.loads(m) for m in loaded.dataset["metadata"]] == [{"lang": "en"}, {"lang": "zh"}, {}]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("hello")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load(tmp_path, path)


TEXT = "Title line\n\nFirst paragraph,\nstill first.\n\n\nSecond paragraph.\n"


@pytest.mark.parametrize(
    ("unit", "texts", "origins"),
    [
        ("file", ["Title line\n\nFirst paragraph,\nstill first.\n\n\nSecond paragraph."], ["t.md:1"]),
        (
            "paragraph",
            ["Title line", "First paragraph,\nstill first.", "Second paragraph."],
            ["t.md:1", "t.md:3", "t.md:7"],
        ),
        (
            "line",
            ["Title line", "First paragraph,", "still first.", "Second paragraph."],
            ["t.md:1", "t.md:3", "t.md:4", "t.md:7"],
        ),
    ],
)
def test_text_units(tmp_path, unit, texts, origins):
    path = tmp_path / "t.md"
    path.write_text(TEXT)
    loaded = load(tmp_path, path, text_unit=unit)
    assert loaded.dataset["text"] == texts and loaded.dataset["origin"] == origins
    assert all(m == [] for m in loaded.dataset["messages"])


def test_folder_of_mixed_files_is_read_recursively_in_order(tmp_path, caplog):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("plain document")
    (folder / "a.csv").write_text("prompt,completion\np,c\n")
    write_jsonl(folder / "sub" / "c.jsonl", [qa(0)])
    write_jsonl(folder / ".hidden.jsonl", [qa(9)])
    (folder / "image.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING):
        loaded = load(tmp_path, folder)
    assert loaded.name == "corpus"
    assert loaded.dataset["origin"] == ["a.csv:2", "b.txt:1", "sub/c.jsonl:1"]
    assert contents(loaded) == ["p", "plain document", "q0"]
    assert "image.png" in caplog.text


def test_saved_dataset_and_dataset_dict(tmp_path):
    rows = [qa(i) for i in range(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    loaded = load(tmp_path, tmp_path / "one")
    assert contents(loaded) == ["q0", "q1", "q2"] and set(loaded.dataset["split"]) == {""}
    assert loaded.dataset["origin"] == ["one:1", "one:2", "one:3"]

    saved = DatasetDict({"train": Dataset.from_list(rows[:2]), "dev": Dataset.from_list(rows[2:])})
    saved.save_to_disk(str(tmp_path / "dict"))
    before = snapshot(tmp_path / "dict")
    loaded = load(tmp_path, tmp_path / "dict")
    assert loaded.dataset["split"] == ["train", "train", "validation"]
    assert loaded.dataset["origin"] == ["dict[train]:1", "dict[train]:2", "dict[dev]:1"]
    assert load(tmp_path, tmp_path / "dict", split="test").dataset["split"] == ["test"] * 3
    assert snapshot(tmp_path / "dict") == before  # nothing written into the saved dataset


def test_saved_dataset_with_an_unknown_split(tmp_path):
    DatasetDict({"unsupervised": Dataset.from_list([qa(0)])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match=r"split 'unsupervised'.*data\.sources\[\]\.split"):
        load(tmp_path, tmp_path / "d")


def test_builtin_task_keeps_its_splits(tmp_path):
    loaded = load(tmp_path, "builtin:stdlib-docs-qa")
    assert loaded.name == "stdlib-docs-qa" and set(loaded.dataset["source"]) == {"stdlib-docs-qa"}
    splits = loaded.dataset["split"]
    assert set(splits) == {"train", "validation", "test"}
    assert splits.count("train") > 10 * splits.count("test") > 0
    assert loaded.dataset[0]["origin"].startswith("stdlib-docs-qa:")
    with pytest.raises(
        UserError, match="unknown built-in dataset 'builtin:nope': available are builtin:stdlib-docs-qa"
    ):
        load(tmp_path, "builtin:nope")


def test_on_error_stop_names_file_and_line_and_skip_counts(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(qa(0)) + '\n{oops\n{"foo": 1, "bar": 2}\n[1, 2]\n' + json.dumps(qa(1)) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON .*or set data\.on_error: skip"):
        load(tmp_path, path)
    with caplog.at_level(logging.WARNING):
        loaded = load(tmp_path, path, on_error="skip")
    assert contents(loaded) == ["q0", "q1"]
    reasons = {"malformed_json": 1, "malformed_row": 1, "unrecognised_shape": 1}
    assert loaded.skipped == 3 and loaded.skip_reasons == reasons
    assert "skipped 3 records (1 malformed_json, 1 malformed_row, 1 unrecognised_shape)" in caplog.text
    cached = Path(loaded.dataset.cache_files[0]["filename"])
    assert cached.parent == tmp_path / "cache"
    written = cached.stat().st_mtime_ns
    again = load(
        tmp_path, path, on_error="skip"
    )  # from the cache, not written again: the counts come back too
    assert again.dataset.cache_files == loaded.dataset.cache_files and again.skip_reasons == reasons
    assert cached.stat().st_mtime_ns == written


def test_unrecognised_shape_names_the_keys_and_the_fields_setting(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [qa(0), {"ask": "q", "reply": "a"}])
    with pytest.raises(UserError) as caught:
        load(tmp_path, path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: unrecognised record shape, the row has keys ask, reply")
    assert "instruction+output (alpaca)" in message and "data.sources[].fields" in message


def test_invalid_record_names_the_problem(tmp_path):
    path = write_jsonl(tmp_path / "tool.jsonl", [{"messages": [{"role": "tool", "content": "{}"}]}])
    with pytest.raises(UserError, match=r"tool\.jsonl:1: turn 1 of 'messages' has role 'tool'"):
        load(tmp_path, path)


def test_missing_mapped_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"q": "Q", "a": "A"}, {"q": "Q2"}])
    fields = {"question": "q", "answer": "a"}
    with pytest.raises(UserError, match=r"m\.jsonl:2: column 'a' \(mapped to 'answer'.*has keys q"):
        load(tmp_path, path, fields=fields)
    assert load(tmp_path, path, on_error="skip", fields=fields).skip_reasons == {"missing_field": 1}
    with pytest.raises(UserError, match=r"every record was skipped \(2: 2 missing_field\)"):
        load(tmp_path, path, on_error="skip", fields={"question": "q", "answer": "reply"})


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "empty.txt"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_text("\n")
    with pytest.raises(UserError, match=r"has no records \(the file is empty\)"):
        load(tmp_path, tmp_path / name)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match=r"does not exist: fix data\.sources\[\]\.path"):
        load(tmp_path, tmp_path / "nope.jsonl")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(
        UserError, match=r"unsupported file type '\.xml'.*\.parquet.*data\.sources\[\]\.format"
    ):
        load(tmp_path, tmp_path / "data.xml")
    write_jsonl(tmp_path / "rows.dat", [qa(0)])
    assert contents(load(tmp_path, tmp_path / "rows.dat", format="jsonl")) == ["q0"]


def test_non_utf8_file_names_the_line_and_iconv(tmp_path):
    path = tmp_path / "gbk.jsonl"
    lines = [json.dumps(qa(0)), json.dumps({"prompt": "你好", "completion": "世界"}, ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.jsonl:2: not UTF-8 text.*iconv -f GBK -t UTF-8"):
        load(tmp_path, path, on_error="skip")
    (tmp_path / "gbk.txt").write_bytes("第一行\n第二行".encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.txt:1: not UTF-8"):
        load(tmp_path, tmp_path / "gbk.txt")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquestion,answer\nq,a\n".encode())
    assert contents(load(tmp_path, path)) == ["q"]


def test_max_samples_and_split(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [qa(i) for i in range(10)])
    loaded = load(tmp_path, path, max_samples=3, split="validation")
    assert contents(loaded) == ["q0", "q1", "q2"] and loaded.dataset["split"] == ["validation"] * 3


def snapshot(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_source_files_are_left_byte_identical(tmp_path):
    paths = [write_jsonl(tmp_path / "s.jsonl", [qa(0)]), tmp_path / "s.csv", tmp_path / "s.parquet"]
    paths[1].write_text("question,answer\nq0,a0\n")
    pq.write_table(pa.table({"question": ["q0"], "answer": ["a0"]}), paths[2])
    for path in paths:
        before = snapshot(path), path.stat().st_mtime_ns
        assert contents(load(tmp_path, path)) == ["q0"]
        assert (snapshot(path), path.stat().st_mtime_ns) == before


def test_changed_file_is_read_again_not_taken_from_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "live.jsonl", [qa(0)])
    assert contents(load(tmp_path, path)) == ["q0"]
    write_jsonl(path, [qa(1), qa(2)])  # another size
    assert contents(load(tmp_path, path)) == ["q1", "q2"]
    stat = path.stat()
    write_jsonl(path, [qa(3), qa(4)])  # same size: only the modification time tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert contents(load(tmp_path, path)) == ["q3", "q4"]


def test_two_sources_with_the_same_content_do_not_share_a_cache_entry(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [qa(0)])
    second = write_jsonl(tmp_path / "second.jsonl", [qa(0)])
    a, b = load(tmp_path, first), load(tmp_path, second)
    assert (a.dataset["source"], b.dataset["source"]) == (["first"], ["second"])
    assert a.dataset.cache_files != b.dataset.cache_files


def test_max_samples_applies_to_each_split_of_a_saved_dataset_dict(tmp_path):
    splits = {"train": 5, "validation": 3, "test": 3}
    saved = DatasetDict({name: Dataset.from_list([qa(i) for i in range(n)]) for name, n in splits.items()})
    saved.save_to_disk(str(tmp_path / "dict"))
    loaded = load(tmp_path, tmp_path / "dict", max_samples=2)
    assert loaded.dataset["split"] == ["train"] * 2 + ["validation"] * 2 + ["test"] * 2
    assert loaded.dataset["origin"][2:4] == ["dict[validation]:1", "dict[validation]:2"]
    # All put into one split: the limit is for that split, as for a single file.
    assert load(tmp_path, tmp_path / "dict", max_samples=2, split="train").dataset["split"] == ["train"] * 2


def test_max_samples_keeps_every_split_of_the_builtin_task(tmp_path):
    loaded = load(tmp_path, "builtin:stdlib-docs-qa", max_samples=3)
    assert Counter(loaded.dataset["split"]) == {"train": 3, "validation": 3, "test": 3}


def test_saved_dataset_with_classic_sequence_of_structs(tmp_path):
    features = Features(
        {
            "conversations": Sequence({"from": Value("string"), "value": Value("string")}),
            "topic": Value("string"),
        }
    )
    columns = {"conversations": [{"from": ["human", "gpt"], "value": ["Q", "A"]}], "topic": ["t"]}
    Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "seq"))
    rows = load(tmp_path, tmp_path / "seq").dataset.to_list()
    assert rows[0]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert json.loads(rows[0]["metadata"]) == {"topic": "t"}


def test_parquet_struct_metadata_with_dates_decimals_bytes_and_null_labels(tmp_path):
    path = tmp_path / "typed.parquet"
    metadata = pa.array(
        [{"day": datetime.date(2024, 5, 6), "price": decimal.Decimal("1.50"), "raw": b"ab"}] * 3,
        pa.struct([("day", pa.date32()), ("price", pa.decimal128(5, 2)), ("raw", pa.binary())]),
    )
    labels = pa.array([1.0, float("nan"), None])
    table = pa.table(
        {"question": ["q0", "q1", "q2"], "answer": ["a"] * 3, "metadata": metadata, "label": labels}
    )
    pq.write_table(table, path)
    loaded = load(tmp_path, path)
    assert json.loads(loaded.dataset[0]["metadata"]) == {"day": "2024-05-06", "price": "1.50", "raw": "ab"}
    assert loaded.dataset["label"] == ["1.0", "", ""]


def test_parquet_damaged_in_the_middle_is_one_user_error(tmp_path):
    path = tmp_path / "broken.parquet"
    rows = [qa(i) for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    second_group = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = second_group.dictionary_page_offset or second_group.data_page_offset
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"broken\.parquet: the Parquet file is damaged after record 1000 "):
        load(tmp_path, path, on_error="skip")


def test_damaged_saved_dataset_is_one_user_error(tmp_path):
    Dataset.from_list([qa(0), qa(1)]).save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    arrow_file.write_bytes(arrow_file.read_bytes()[:100])
    with pytest.raises(UserError, match=r"saved: the dataset saved there .* cannot be read .*save it again"):
        load(tmp_path, tmp_path / "saved")
