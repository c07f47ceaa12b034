"""The whole evaluation of the eval stage on the reduced offline base: every dimension its data allows, the
A/B comparison, the review round trip through the CLI, and what is reported when data is missing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from seektune.cli import main
from seektune.config import validate_config
from seektune.errors import UserError
from seektune.pipeline import run_eval_stage, run_pipeline
from support import tiny_run_config

# Twelve distinct questions and answers (near-duplicate removal would merge templated ones).
QA = [
    ("How do I read a JSON file?", "Open the file and call json.load on it to get Python objects back."),
    (
        "Which module lists a folder?",
        "Use os.listdir or pathlib.Path.iterdir to see every entry of a folder.",
    ),
    (
        "How can I match a pattern?",
        "Compile a regular expression with re.compile and call its search method.",
    ),
    ("What gives the square root?", "math.sqrt returns the square root of a non-negative number as a float."),
    ("Where are command arguments?", "sys.argv holds the program name followed by each argument as text."),
    ("How do I pause a program?", "time.sleep waits for the given number of seconds before going on."),
    ("How to shuffle a list in place?", "random.shuffle reorders the items of a mutable sequence at random."),
    ("How do I join two paths?", "The slash operator of pathlib joins a folder and a file name safely."),
    ("How to copy a whole tree?", "shutil.copytree copies a directory with everything below it."),
    ("What are the ASCII letters?", "string.ascii_letters is the lowercase then the uppercase alphabet."),
    ("How do I parse a CSV export?", "csv.DictReader yields one dictionary per row keyed by the header."),
    ("How can I compress bytes?", "gzip.compress returns the bytes packed with the DEFLATE algorithm."),
]


def _qa_file(path: Path, n: int = 12) -> Path:
    rows = [
        {
            "question": question,
            "answer": answer,
            "label": "files" if i % 3 == 0 else "other",
            "metadata": {"group": "a" if i % 2 else "b"},
        }
        for i, (question, answer) in enumerate(QA[:n])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _full_eval(tmp_path: Path, base_cache: Path, **eval_keys) -> dict:
    test_file = _qa_file(tmp_path / "test.jsonl")
    other = _qa_file(tmp_path / "other.jsonl", n=6)
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        data={"sources": [{"path": str(test_file), "split": "test"}], "max_eval_samples": None},
        eval={
            "metrics": ["perplexity", "rouge_l", "accuracy"],
            "max_new_tokens": 6,
            "robustness": {
                "enabled": True,
                "noise_rates": [0.3],
                "perturbations": ["typo"],
                "max_samples": 4,
            },
            "efficiency": {"enabled": True, "prompts": 2, "max_new_tokens": 3, "batch_size": 2},
            "explainability": {"enabled": True, "max_samples": 2},
            "fairness": {"attribute": "metadata.group", "min_group_size": 2},
            "adaptability": {"source": {"path": str(other)}},
            "review": {"enabled": True, "max_samples": 4},
            **eval_keys,
        },
    )
    return raw


def test_eval_stage_measures_every_dimension_and_compares_two_models(tmp_path, base_cache, capsys):
    raw = _full_eval(
        tmp_path,
        base_cache,
        primary_metric="perplexity",  # defined under any noise (the untuned base's ROUGE-L may be 0)
        compare={"with_model": "tiny-deepseek-v3", "bootstrap_samples": 200},
    )
    run = run_eval_stage(validate_config(raw))
    evaluation = json.loads((run.path / "eval" / "results.json").read_text())
    assert list(evaluation["models"]) == ["a", "b"]
    entry = evaluation["models"]["a"]
    assert entry["metrics"]["n"] == 12
    assert {"perplexity", "rouge_l", "accuracy"} <= set(entry["metrics"])
    for section in ("robustness", "efficiency", "explainability", "fairness", "adaptability"):
        assert entry[section], section
    assert set(entry["fairness"]["groups"]) == {"a", "b"}
    assert entry["adaptability"]["n"] == 6
    dimensions = entry["scorecard"]["dimensions"]
    assert all(dimensions[d]["score"] is not None for d in dimensions), dimensions
    assert 0 <= entry["scorecard"]["overall"] <= 1
    # The same model twice: no metric may differ significantly.
    comparison = evaluation["comparison"]
    assert {row["verdict"] for row in comparison["metrics"].values()} == {"no significant difference"}
    assert comparison["metrics"]["perplexity"]["diff"] == pytest.approx(0, abs=1e-9)
    for name in ("report.md", "report.html", "review.csv", "review.jsonl", "review-key.json"):
        assert (run.path / "eval" / name).is_file(), name
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["eval"]["comparison"]["rouge_l"]["verdict"] == "no significant difference"

    # A reviewer fills in the sheet; its scores come back into the report through the CLI.
    sheet = run.path / "eval" / "review.csv"
    with sheet.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for index, row in enumerate(rows):
        row["score_1"], row["score_2"] = str(1 + index % 5), "3"
    filled = tmp_path / "filled.csv"
    with filled.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    assert main(["review", "import", str(run.path), str(filled)]) == 0
    assert "mean" in capsys.readouterr().out
    imported = json.loads((run.path / "eval" / "results.json").read_text())["review"]["scores"]
    assert sum(m["n"] for m in imported["models"].values()) == 2 * len(rows)


def test_metrics_the_data_cannot_give_are_missing_with_a_reason(tmp_path, base_cache):
    raw = _full_eval(
        tmp_path,
        base_cache,
        metrics=["rouge_l", "macro_f1"],
        fairness={"attribute": "metadata.nowhere", "min_group_size": 2},
        adaptability={"source": None},
        review={"enabled": False},
        robustness={"enabled": False},
        efficiency={"enabled": False},
        explainability={"enabled": False},
    )
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    rows = [{k: v for k, v in json.loads(line).items() if k != "label"} for line in lines]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = run_eval_stage(validate_config(raw))
    entry = json.loads((run.path / "eval" / "results.json").read_text())["models"]["model"]
    assert "macro_f1" not in entry["metrics"]
    assert "label" in entry["missing"]["macro_f1"]
    assert entry["fairness"]["gap"] is None and "metadata.nowhere" in entry["fairness"]["reason"]
    dimensions = entry["scorecard"]["dimensions"]
    assert dimensions["adaptability"]["score"] is None
    assert "eval.adaptability.source" in dimensions["adaptability"]["reason"]
    assert dimensions["accuracy"]["score"] is not None  # rouge_l, the primary metric


def test_eval_command_takes_a_test_file_and_prints_the_summary(tmp_path, base_cache, capsys):
    test_file = _qa_file(tmp_path / "qa.jsonl")
    config = tmp_path / "c.yaml"
    raw = tiny_run_config(tmp_path, base_cache)
    config.write_text(json.dumps(raw))
    code = main(["eval", str(config), "--model", "tiny-deepseek-v3", "--data", str(test_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ROUGE-L" in out and "report.html" in out
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0])
    assert (
        json.loads((run_dir / "eval" / "results.json").read_text())["models"]["model"]["metrics"]["n"] == 12
    )


def test_a_run_evaluates_base_and_tuned_in_every_dimension_with_a_verdict(tmp_path, base_cache):
    """The base is evaluated in full (attention switched to eager and back, eval mode) and then trained:
    the tuned model must come out of training better, with a verdict that agrees with its interval."""
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        train={"max_steps": 12},
        eval={
            "robustness": {
                "enabled": True,
                "noise_rates": [0.3],
                "perturbations": ["casing"],
                "max_samples": 4,
            },
            "efficiency": {"enabled": True, "prompts": 2, "max_new_tokens": 3, "batch_size": 2},
            "explainability": {"enabled": True, "max_samples": 2},
        },
    )
    run = run_pipeline(validate_config(raw))
    comparison = json.loads(run.metrics_path.read_text())["eval"]["comparison"]
    assert (comparison["a"], comparison["b"]) == ("base", "tuned")
    perplexity = comparison["perplexity"]
    assert perplexity["diff"] < 0 and perplexity["ci_high"] < 0  # 12 steps of LoRA lower it for sure
    assert perplexity["verdict"] == "B better"
    for row in comparison.values():
        if isinstance(row, dict):
            excludes_zero = row["ci_low"] > 0 or row["ci_high"] < 0
            assert (row["verdict"] != "no significant difference") == excludes_zero, row
    evaluation = json.loads((run.path / "eval" / "results.json").read_text())
    for entry in evaluation["models"].values():
        robustness = entry["robustness"]
        assert robustness["score"] is not None or robustness["reason"].startswith("clean rouge_l is 0")
        assert entry["efficiency"]["ms_per_token"] > 0
        assert 0 <= entry["explainability"]["attention_on_prompt"] <= 1
    report = run.report_path.read_text()
    assert "(paired bootstrap)" in report.splitlines()[2] and "eval/report.html" in report


def test_comparing_models_with_another_tokenizer_stops_before_any_run(tmp_path, base_cache):
    from train.tinymodels import llama, word_tokenizer

    other = tmp_path / "other-model"
    llama().save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    raw = _full_eval(tmp_path, base_cache, compare={"with_model": str(other)})
    with pytest.raises(UserError, match="another tokenizer or chat template"):
        run_eval_stage(validate_config(raw))
    assert not (tmp_path / "runs").exists()
