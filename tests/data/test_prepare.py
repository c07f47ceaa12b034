"""The data stage as a whole: splits, every step in order, what is written, and bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from seektune.config import DataConfig
from seektune.data.encode import IGNORE_INDEX
from seektune.data.prepare import prepare_data, split_sizes
from seektune.errors import UserError

EXAMPLES = Path(__file__).parents[2] / "examples" / "data"
CONFIGS = Path(__file__).parents[2] / "configs"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _qa(n: int, offset: int = 0) -> list[dict]:
    """Distinct question/answer pairs (different enough that near-dedup keeps them all)."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    rows = []
    for i in range(offset, offset + n):
        topic = " ".join(words[(i * k) % len(words)] + str(i * k) for k in range(1, 5))
        rows.append({"question": f"What does {topic} mean?", "answer": f"It means {topic[::-1]} number {i}."})
    return rows


def _read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_user_jsonl_is_split_by_ratio_written_and_fingerprinted(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa(40))
    cfg = DataConfig(sources=[{"path": str(path)}], validation_ratio=0.1, test_ratio=0.2)
    first = prepare_data(cfg, tokenizer, seed=1, out_dir=tmp_path / "out")
    assert first.report["splits"] == {"train": 28, "validation": 4, "test": 8}
    assert len(_read_split(tmp_path / "out", "test")) == 8
    assert _read_split(tmp_path / "out", "train")[0]["messages"][0]["role"] == "user"
    assert len(first.tokenized["test"]) == len(first.records["test"]) == 8  # rows align with records
    assert not (tmp_path / "out" / "cache").exists()  # intermediate Arrow files are removed
    again = prepare_data(cfg, tokenizer, seed=1, out_dir=tmp_path / "again")
    assert again.report["fingerprint"] == first.report["fingerprint"]
    other = prepare_data(cfg, tokenizer, seed=2, out_dir=tmp_path / "other")
    assert other.report["fingerprint"] != first.report["fingerprint"]


def test_split_sizes_keep_a_test_example_in_tiny_groups():
    assert split_sizes(5, 0.05, 0.05) == (1, 1)
    assert split_sizes(2, 0.05, 0.05) == (0, 0)
    assert split_sizes(100, 0.1, 0.2) == (20, 10)


def test_stratified_split_keeps_label_shares(tmp_path, tokenizer):
    rows = [{**r, "label": "rare" if i % 5 == 0 else "common"} for i, r in enumerate(_qa(100))]
    path = _write_jsonl(tmp_path / "labelled.jsonl", rows)
    cfg = DataConfig(sources=[{"path": str(path)}], test_ratio=0.2, validation_ratio=0.1, stratify_by="label")
    prepared = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")
    test_labels = [r["label"] for r in prepared.records["test"]]
    assert test_labels.count("rare") == 4 and test_labels.count("common") == 16


def test_a_held_out_record_beats_its_training_twin(tmp_path, tokenizer):
    train_rows = _qa(30)
    twin = {"question": train_rows[3]["question"].upper(), "answer": train_rows[3]["answer"]}
    train = _write_jsonl(tmp_path / "train.jsonl", train_rows)
    test = _write_jsonl(tmp_path / "test.jsonl", [twin, *_qa(3, offset=100)])
    cfg = DataConfig(
        sources=[{"path": str(train), "split": "train"}, {"path": str(test), "split": "test"}],
    )
    prepared = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")
    assert prepared.report["splits"] == {"train": 29, "validation": 0, "test": 4}
    train_questions = {r["messages"][0]["content"].lower() for r in prepared.records["train"]}
    assert train_rows[3]["question"].lower() not in train_questions
    assert prepared.report["duplicates"]["exact"] == 1


def test_documents_train_in_windows_and_packing_fills_rows(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"page{i}.md").write_text(f"Page {i} talks about topic {i}. " * (20 + 10 * i))
    qa = _write_jsonl(tmp_path / "qa.jsonl", _qa(30))
    cfg = DataConfig(
        sources=[{"path": str(docs), "split": "train"}, {"path": str(qa)}],
        max_length=64,
        packing=True,
        pack_length=128,
    )
    prepared = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")
    train = prepared.tokenized["train"]
    assert "position_ids" in train.column_names and max(train["length"]) <= 128
    # packing keeps every token: the rows hold exactly the tokens of the unpacked examples
    assert sum(train["length"]) == prepared.report["train_tokens"]
    packing = prepared.report["packing"]["train"]
    assert packing["rows"] < packing["examples"] and packing["fill"] > 0.8 and packing["order"] == "shuffled"
    for row in train:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
    # The row layout follows the run's seed (shuffled order) and data.pack_order.
    again = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "again").tokenized["train"]
    other = prepare_data(cfg, tokenizer, seed=1, out_dir=tmp_path / "other").tokenized["train"]
    assert again["input_ids"] == train["input_ids"] and other["input_ids"] != train["input_ids"]
    decreasing = cfg.model_copy(update={"pack_order": "decreasing"})
    rows = prepare_data(decreasing, tokenizer, seed=0, out_dir=tmp_path / "decreasing").tokenized["train"]
    assert rows["length"][0] == max(rows["length"]) and rows["input_ids"] != train["input_ids"]


def test_every_record_removed_by_cleaning_is_one_clear_error(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "short.jsonl", [{"prompt": "hi", "completion": "yo"}] * 3)
    cfg = DataConfig(sources=[{"path": str(path)}], clean={"min_chars": 50})
    with pytest.raises(UserError, match=r"every record was removed by cleaning \(3 by min_chars\)"):
        prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")


def test_two_sources_with_one_name_are_refused(tmp_path, tokenizer):
    a = _write_jsonl(tmp_path / "a.jsonl", _qa(5))
    cfg = DataConfig(sources=[{"path": str(a), "name": "x"}, {"path": str(a), "name": "x"}])
    with pytest.raises(UserError, match="both named 'x'"):
        prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"question": "a", "answer": "b"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        ("data.xml", "<a/>", "data.sources"),
        ("empty.jsonl", "", "empty"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_data(DataConfig(sources=[{"path": str(path)}]), tokenizer, seed=0, out_dir=tmp_path / "o")


def test_example_config_runs_every_step_and_leaves_sources_untouched(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in EXAMPLES.rglob("*") if p.is_file()}
    raw = yaml.safe_load((CONFIGS / "data-mix.yaml").read_text())["data"]
    prepared = prepare_data(DataConfig(**raw), tokenizer, seed=42, out_dir=tmp_path / "out")
    report = prepared.report
    steps = {step["step"]: step for step in report["steps"]}
    assert list(steps) == [
        "load", "clean", "privacy", "exact_dedup", "near_dedup", "split", "mix", "augment", "tokenise",
    ]  # fmt: skip
    assert steps["clean"]["removed"]["language"] >= 1  # the French ticket
    assert steps["exact_dedup"]["removed"] == {"exact": 2}  # full-width '？' and upper case are no disguise
    assert report["pii"]["email"] == 2 and report["pii"]["id_card"] == 1
    written = "".join(
        (tmp_path / "out" / f"{s}.jsonl").read_text(encoding="utf-8") for s in ("train", "validation", "test")
    )
    assert "support@example.com" not in written and "13812345678" not in written
    assert "Bonjour" not in written
    assert report["mix"]["shares_after"] == pytest.approx(
        {"faq-zh": 0.4, "support-en": 0.4, "handbook": 0.2}, abs=0.03
    )
    held_out = [*prepared.records["validation"], *prepared.records["test"]]
    assert all(not r["augmented"] and r["source"] != "handbook" for r in held_out)
    assert (
        sum(1 for r in prepared.records["train"] if r["augmented"]) == sum(report["augmented"].values()) > 0
    )
    assert (tmp_path / "out" / "report.md").read_text(encoding="utf-8").startswith("# Data report")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in EXAMPLES.rglob("*") if p.is_file()}
    assert after == before


def test_stratified_split_sizes_follow_the_source_not_each_stratum(tmp_path, tokenizer):
    rows = [{**r, "label": f"class{i % 10}"} for i, r in enumerate(_qa(100))]
    path = _write_jsonl(tmp_path / "many.jsonl", rows)
    cfg = DataConfig(
        sources=[{"path": str(path)}], test_ratio=0.05, validation_ratio=0.05, stratify_by="label"
    )
    prepared = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")
    assert prepared.report["splits"] == {"train": 90, "validation": 5, "test": 5}
    assert len({r["label"] for r in prepared.records["test"]}) == 5  # five different classes, one each


def test_a_test_only_source_takes_no_part_in_the_mix(tmp_path, tokenizer):
    a = _write_jsonl(tmp_path / "a.jsonl", _qa(40))
    b = _write_jsonl(tmp_path / "b.jsonl", _qa(20, offset=200))
    held = _write_jsonl(tmp_path / "held.jsonl", _qa(5, offset=400))
    cfg = DataConfig(
        sources=[
            {"path": str(a), "ratio": 1},
            {"path": str(b), "ratio": 1},
            {"path": str(held), "split": "test"},
        ],
        mix={"strategy": "ratio"},
        validation_ratio=0,
        test_ratio=0,
    )
    prepared = prepare_data(cfg, tokenizer, seed=0, out_dir=tmp_path / "out")
    assert prepared.report["mix"]["after"] == {"a": 20, "b": 20}
    assert prepared.report["splits"]["test"] == 5


def test_worker_processes_give_the_same_data(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa(60))
    fingerprints = []
    for num_proc in (1, 2):
        cfg = DataConfig(sources=[{"path": str(path)}], num_proc=num_proc, augment={"enabled": True})
        fingerprints.append(
            prepare_data(cfg, tokenizer, 3, tmp_path / f"out{num_proc}").report["fingerprint"]
        )
    assert fingerprints[0] == fingerprints[1]
