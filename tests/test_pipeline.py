"""End-to-end runs of the pipeline on the reduced offline base."""

import json
from pathlib import Path

import pytest

from seektune.config import load_config, validate_config
from seektune.pipeline import run_eval_stage, run_pipeline
from support import tiny_run_config


def _stable(metrics: dict) -> dict:
    """Everything but the timing section, which depends on the machine's load."""
    return {section: values for section, values in metrics.items() if section != "timing"}


def test_same_config_and_seed_give_the_same_metrics(tmp_path, base_cache):
    cfg = validate_config(tiny_run_config(tmp_path, base_cache))
    first = json.loads(run_pipeline(cfg).metrics_path.read_text())
    second = json.loads(run_pipeline(cfg).metrics_path.read_text())
    assert _stable(first) == _stable(second)
    assert set(first) == {"data", "eval", "train", "timing"}
    assert first["eval"]["base"]["n"] == 16


def test_run_directory_holds_every_artefact(tmp_path, base_cache):
    run = run_pipeline(validate_config(tiny_run_config(tmp_path, base_cache)))
    for name in (
        "config.yaml",
        "environment.json",
        "metrics.json",
        "report.md",
        "status.json",
        "plots/loss.png",
        "data/report.json",
        "data/report.md",
        "data/plots/lengths_tokens.png",
        "data/train.jsonl",
        "data/validation.jsonl",
        "data/test.jsonl",
        "data/tokenized/train/state.json",
        "train/history.json",
        "eval/base-answers.jsonl",
        "eval/tuned-answers.jsonl",
        "logs/events.jsonl",
        "model/adapter_config.json",
    ):
        assert (run.path / name).is_file(), name
    assert json.loads(run.status_path.read_text())["state"] == "completed"
    environment = json.loads(run.environment_path.read_text())
    assert environment["seed"] == 42 and environment["torch"]
    assert "data" in json.loads(run.metrics_path.read_text())
    # The trained adapter (through its run directory) evaluates like any model.
    again = run_eval_stage(
        validate_config(tiny_run_config(tmp_path, base_cache, model={"name_or_path": str(run.path)}))
    )
    tuned = json.loads(run.metrics_path.read_text())["eval"]["tuned"]
    assert json.loads(again.metrics_path.read_text())["eval"]["model"]["perplexity"] == pytest.approx(
        tuned["perplexity"], rel=1e-4
    )


def test_tuned_model_beats_the_base(tmp_path, base_cache):
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        data={"max_train_samples": 1024, "max_eval_samples": 48},
        train={"max_steps": -1, "epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "logging_steps": 8},
        eval={"max_new_tokens": 32, "batch_size": 24},
    )
    run = run_pipeline(validate_config(raw))
    metrics = json.loads(run.metrics_path.read_text())
    base, tuned = metrics["eval"]["base"], metrics["eval"]["tuned"]
    assert tuned["perplexity"] < base["perplexity"]
    assert tuned["rouge_l"] > base["rouge_l"]
    assert tuned["eos_rate"] > 0.5 > base["eos_rate"]
    report = run.report_path.read_text()
    assert "beats the base" in report
    assert "plots/loss.png" in report


@pytest.mark.slow
def test_quickstart_config_beats_the_base(tmp_path, quickstart_cache):
    """configs/quickstart.yaml as the README runs it (its own full-size base, built from scratch by the
    first test of the session that needs it, normally this one)."""
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    registry = f"sqlite:///{tmp_path / 'registry' / 'registry.db'}"
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        f"model.cache_dir={quickstart_cache}",
        f"registry.url={registry}",
    ]
    run = run_pipeline(load_config(quickstart, overrides))
    improvement = json.loads(run.metrics_path.read_text())["eval"]["improvement"]
    assert improvement["perplexity_relative"] < -0.2
    assert improvement["rouge_l"] > 0
    tuned = json.loads(run.metrics_path.read_text())["eval"]["tuned"]
    assert tuned["eos_rate"] > 0.9
    assert "beats the base" in run.report_path.read_text()
    data_report = (run.path / "data" / "report.md").read_text()
    assert "| exact\\_dedup |" in data_report and "[data/report.md]" in run.report_path.read_text()
    # Every dimension its data allows, and a significance verdict (the stdlib task has no protected field).
    evaluation = json.loads((run.path / "eval" / "results.json").read_text())
    for entry in evaluation["models"].values():
        dimensions = entry["scorecard"]["dimensions"]
        measured = {name for name, d in dimensions.items() if d["score"] is not None}
        assert measured == {"accuracy", "robustness", "efficiency", "explainability", "adaptability"}
        assert "eval.fairness.attribute" in dimensions["fairness"]["reason"]
    verdicts = evaluation["comparison"]["metrics"]
    assert verdicts["perplexity"]["verdict"] == verdicts["rouge_l"]["verdict"] == "B better"
    for name in ("report.html", "review.csv", "review-key.json"):
        assert (run.path / "eval" / name).is_file(), name
    _renders_in_chromium(run.path / "eval" / "report.html")
    # It registered its adapter and the models compression made of it: base → adapter → merged → int8.
    from seektune.cli import main

    assert main(["registry", "lineage", "quickstart@1.0.0+int8-dynamic", "--url", registry]) == 0
    from seektune.registry.catalog import lineage
    from seektune.registry.store import open_store

    tree = lineage(open_store(registry), "quickstart@1.0.0+int8-dynamic")["trees"][0]
    assert tree["base"]["model"] == "tiny-deepseek-v3"
    assert [v["ref"] for v in tree["ancestors"]] == ["quickstart@1.0.0", "quickstart@1.0.0+merged"]
    assert [v["kind"] for v in tree["ancestors"]] == ["adapter", "merged"]
    assert tree["version"]["kind"] == "quantised"


def _renders_in_chromium(page: Path) -> None:
    """The self-contained report opens in headless Chromium without a console error or a failed image."""
    import shutil

    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(browser_path).exists():
        pytest.skip("no chromium: install Debian's chromium (scripts/setup.sh --dev does as root)")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        tab = browser.new_page()
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(page.as_uri())
        broken = tab.evaluate("[...document.images].filter(i => !i.naturalWidth).length")
        browser.close()
    assert not errors and broken == 0, (errors, broken)


@pytest.mark.parametrize(
    ("method", "artefact"),
    [
        ({"name": "freeze", "freeze": {"train_layers": "-1:"}}, "model.safetensors"),
        ({"name": "adapter", "adapter": {"reduction_factor": 8}}, "adapters.safetensors"),
        ({"name": "prefix", "prefix": {"num_virtual_tokens": 4}}, "prefix.safetensors"),
    ],
)
def test_freeze_adapter_and_prefix_runs_save_what_reloads(tmp_path, base_cache, method, artefact):
    run = run_pipeline(validate_config(tiny_run_config(tmp_path, base_cache, method=method)))
    assert (run.path / "model" / artefact).is_file()
    metrics = json.loads(run.metrics_path.read_text())
    assert 0 < metrics["train"]["trainable_params"] < metrics["train"]["total_params"]
    again = run_eval_stage(
        validate_config(tiny_run_config(tmp_path, base_cache, model={"name_or_path": str(run.path)}))
    )
    assert json.loads(again.metrics_path.read_text())["eval"]["model"]["perplexity"] == pytest.approx(
        metrics["eval"]["tuned"]["perplexity"], rel=1e-4
    )


def test_early_stopping_ends_with_the_best_checkpoint(tmp_path, base_cache):
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        train={
            "max_steps": 60,
            "eval_steps": 2,
            "logging_steps": 2,
            "learning_rate": 0.05,
            "early_stopping_patience": 2,
        },
        eval={"enabled": False},
    )
    run = run_pipeline(validate_config(raw))
    train = json.loads(run.metrics_path.read_text())["train"]
    history = json.loads((run.path / "train" / "history.json").read_text())
    eval_losses = [row["eval_loss"] for row in history if "eval_loss" in row]
    assert train["steps"] < 60  # stopped early
    assert train["eval_loss"] == pytest.approx(min(eval_losses), rel=1e-3)  # the best weights were kept
