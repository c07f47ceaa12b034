"""configs/tune.yaml, the quickstart-sized search, finds a better config than the quickstart's own values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from seektune.config import load_config
from seektune.pipeline import run_tune_stage

CONFIG = Path(__file__).parents[2] / "configs" / "tune.yaml"


@pytest.mark.slow
def test_the_quickstart_sized_search_beats_the_quickstart_values(tmp_path, quickstart_cache):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'runs'}", f"model.cache_dir={quickstart_cache}"])
    quickstart = yaml.safe_load((CONFIG.parent / "quickstart.yaml").read_text())
    # The baseline trial runs the quickstart's own values of every searched key.
    assert cfg.train.learning_rate == quickstart["train"]["learning_rate"]
    assert cfg.method.lora.r == quickstart["method"]["lora"]["r"]
    run = run_tune_stage(cfg).path
    summary = json.loads((run / "metrics.json").read_text())["tune"]
    best = summary["best"][0]
    assert best["number"] != 0  # trial 0 is the baseline: another trial beat it
    report = (run / "tune" / "report.md").read_text()
    assert "lower eval\\_loss than the config's own values" in report
    tuned = yaml.safe_load((run / "tune" / "best.yaml").read_text())
    assert tuned["train"]["learning_rate"] == best["params"]["train.learning_rate"]
