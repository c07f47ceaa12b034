"""report.md: headline numbers, sections, plots, escaping, and an honest verdict when tuning hurt."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from seektune.report import render_report, write_report
from seektune.rundir import RunDir, atomic_write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary() -> dict[str, Any]:
    history: list[dict[str, Any]] = [
        {"step": s, "epoch": s / 40, "loss": 3.0 - s / 20, "learning_rate": 2e-4 * (1 - s / 40)}
        for s in range(5, 41, 5)
    ]
    history += [{"step": 20, "epoch": 0.5, "eval_loss": 2.4}, {"step": 40, "epoch": 1.0, "eval_loss": 1.9}]
    return {
        "run": {
            "name": "demo",
            "run_dir": "runs/demo",
            "started_at": "2025-01-01T00:00:00+00:00",
            "finished_at": "2025-01-01T00:05:00+00:00",
            "seed": 42,
            "model": "tiny-deepseek-v3",
            "method": "lora",
            "device": "cpu",
            "dtype": "float32",
        },
        "data": {
            "sources": {"stdlib-docs-qa": 1000},
            "splits": {"train": 900, "validation": 50, "test": 50},
            "fingerprint": "ab" * 32,
            "removed": {"too_long": 3, "near": 0},
            "pii": {"email": 2},
            "train_tokens": 123456,
            "shift_auc": 0.52,
        },
        "train": {
            "history": history,
            "trainable_params": 1_200_000,
            "total_params": 120_000_000,
            "runtime_s": 192.0,
            "train_loss": 1.0,
            "eval_loss": 1.9,
            "tokens_per_s": 1234.5,
        },
        "eval": {
            "models": {
                "base": {
                    "perplexity": 12.3,
                    "rouge_l": 0.12,
                    "eos_rate": 0.03,
                    "n": 50,
                    "mean_new_tokens": 64.0,
                },
                "tuned": {
                    "perplexity": 5.6,
                    "rouge_l": 0.31,
                    "eos_rate": 0.94,
                    "n": 50,
                    "mean_new_tokens": 21.5,
                },
            },
            "samples": [
                {
                    "question": f"What does `os.path.join` do? ({i})",
                    "reference": "Joins | paths *smartly*",
                    "base": "x" * 1000,
                    "tuned": "It joins\npath parts.",
                }
                for i in range(7)
            ],
        },
    }


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path, "demo", now=datetime(2025, 1, 1))


def test_report_has_headline_sections_and_plots(run: RunDir) -> None:
    atomic_write_json(
        run.environment_path,
        {
            "python": "3.11",
            "torch": "2.13",
            "seed": 42,
            "device": "cpu",
            "packages": {"peft": "0.21"},
            "git_commit": "abc123",
        },
    )
    path = write_report(run, _summary())
    text = path.read_text(encoding="utf-8")

    assert path == run.report_path
    assert text.startswith("# seektune run: demo")
    assert "the tuned model beats the base: perplexity 12.3 → 5.6 (−54%)" in text
    assert "ROUGE-L 0.12 → 0.31 (+0.19)" in text
    assert "answers ending with EOS 3% → 94%" in text
    assert "On 50 test examples" in text
    for heading in ("## Data", "## Training", "## Evaluation", "## Environment", "## Reproduce"):
        assert heading in text
    assert "![loss](plots/loss.png)" in text and "![eval](plots/eval.png)" in text
    assert "| train | 900 |" in text and "ab" * 32 in text and "`too_long`: 3" in text
    assert "`near`" not in text and "`email`: 2" in text and "AUC, 0.5 = none): 0.52" in text
    assert "[data/report.md](data/report.md)" in text
    assert "1.2M of 120M (1%)" in text and "3 min 12 s" in text
    assert "| Perplexity ↓ | 12.3 | 5.6 | −54% (better) |" in text
    assert "| Answers ending with EOS ↑ | 3% | 94% | +91 pp (better) |" in text
    assert f"seektune run {run.config_path}" in text and "`abc123`" in text
    for name in ("loss.png", "eval.png"):
        data = (run.plots_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not [p for p in run.path.rglob("*.tmp")]


def test_samples_are_escaped_truncated_and_limited(run: RunDir) -> None:
    text = write_report(run, _summary()).read_text(encoding="utf-8")

    assert "The first 5 test questions" in text
    assert "**5. What does \\`os.path.join\\` do? (4)**" in text
    assert "**6." not in text
    assert "Joins \\| paths \\*smartly\\*" in text
    assert "It joins ↵ path parts." in text
    assert "x" * 299 + "…" in text and "x" * 301 not in text


def test_worse_tuned_model_is_said_plainly(run: RunDir) -> None:
    summary = _summary()
    models = summary["eval"]["models"]
    models["base"], models["tuned"] = models["tuned"], models["base"]
    text = write_report(run, summary).read_text(encoding="utf-8")

    assert "the tuned model does not beat the base: it is worse on perplexity 5.6 → 12.3 (+120%)" in text
    assert "beats the base:" not in text
    assert "| ROUGE-L ↑ | 0.31 | 0.12 | −0.19 (worse) |" in text


def test_mixed_result_names_what_got_worse(run: RunDir) -> None:
    summary = _summary()
    summary["eval"]["models"]["tuned"]["rouge_l"] = 0.05
    text = render_report(run, summary, None, None)
    assert "beats the base on perplexity 12.3 → 5.6 (−54%)" in text
    assert "but not on ROUGE-L 0.12 → 0.05 (−0.07)" in text


def test_missing_sections_still_render(run: RunDir) -> None:
    text = write_report(run, {}).read_text(encoding="utf-8")
    assert text.startswith(f"# seektune run: {run.path.name}")
    assert "no training or evaluation results" in text
    assert "## Training" not in text and "## Evaluation" not in text
    assert list(run.plots_dir.iterdir()) == []


def test_training_only_summary(run: RunDir) -> None:
    summary = copy.deepcopy(_summary())
    del summary["eval"]
    text = write_report(run, summary).read_text(encoding="utf-8")
    assert "final train loss 1 and validation loss 1.9" in text
    assert (run.plots_dir / "loss.png").exists() and not (run.plots_dir / "eval.png").exists()


def test_dynamic_mix_shares_are_tabled(run: RunDir) -> None:
    summary = copy.deepcopy(_summary())
    summary["train"]["domain_shares"] = [
        {"step": 0, "losses": {}, "shares": {"faq": 0.5, "docs": 0.5}},
        {"step": 40, "losses": {"faq": 2.0, "docs": 1.0}, "shares": {"faq": 0.625, "docs": 0.375}},
    ]
    text = write_report(run, summary).read_text(encoding="utf-8")
    assert "| Step | faq | docs |" in text and "| 40 | 62.5% | 37.5% |" in text


def _with_comparison(summary: dict[str, Any], verdicts: dict[str, str]) -> dict[str, Any]:
    rows = {
        m: {"verdict": v, "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
        for m, v in verdicts.items()
    }
    summary["eval"]["evaluation"] = {
        "primary_metric": "rouge_l",
        "models": {},
        "comparison": {"a": "base", "b": "tuned", "metrics": rows, "summary": "s"},
    }
    return summary


def test_headline_counts_a_change_only_when_the_paired_bootstrap_finds_it(tmp_path):
    summary = _with_comparison(_summary(), {"perplexity": "B better", "rouge_l": "no significant difference"})
    headline = render_report(RunDir(tmp_path), summary, None, None).splitlines()[2]
    assert headline.startswith("On 50 test examples, the tuned model beats the base: perplexity 12.3")
    assert "no significant difference in ROUGE-L (paired bootstrap)." in headline
    assert "ROUGE-L 0.12" not in headline  # an insignificant change is not reported as a gain
    assert headline.endswith("(paired bootstrap). Also: answers ending with EOS 3% → 94%.")


def test_headline_when_no_difference_is_significant(tmp_path):
    summary = _summary()
    for name in ("base", "tuned"):
        summary["eval"]["models"][name] = {"perplexity": 5.0 if name == "base" else 4.9, "n": 50}
    summary = _with_comparison(summary, {"perplexity": "no significant difference"})
    headline = render_report(RunDir(tmp_path), summary, None, None).splitlines()[2]
    assert headline == (
        "On 50 test examples, the tuned model does not beat the base: no significant difference in "
        "perplexity (paired bootstrap)."
    )
