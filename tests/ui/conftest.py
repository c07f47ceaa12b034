"""Fixtures of the dashboard tests: a hand-made run directory and a dashboard app on a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml


def write_run(runs_dir: Path, run_id: str, state: str = "completed", steps: int = 6) -> Path:
    """A run directory as a finished (or running) training leaves it: status, config, metrics, the event
    log with `train_log` events, a data report with a plot link."""
    run = runs_dir / run_id
    (run / "logs").mkdir(parents=True)
    (run / "data" / "plots").mkdir(parents=True)
    (run / "status.json").write_text(
        json.dumps(
            {"state": state, "stage": "train", "error": None, "started_at": "2026-12-01T10:00:00+00:00"}
        )
    )
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "name": run_id.rsplit("-", 2)[0],
                "model": {"name_or_path": "tiny-deepseek-v3"},
                "method": {"name": "lora"},
            }
        )
    )
    (run / "metrics.json").write_text(json.dumps({"train": {"train_loss": 2.5, "eval_loss": 2.25}}))
    events = [{"event": "run started"}]
    for step in range(1, steps + 1):
        events.append(
            {
                "event": "train_log",
                "step": step,
                "loss": 4.0 - 0.25 * step,
                "learning_rate": 1e-3 / step,
                "tokens_per_s": 1000.0 + step,
                "grad_norm": 1.5,
            }
        )
        if step % 3 == 0:
            events.append({"event": "train_log", "step": step, "eval_loss": 3.9 - 0.2 * step})
    (run / "logs" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "data" / "report.md").write_text(
        "# Data report\n\n| split | rows |\n|---|---|\n| train | 64 |\n\n![lengths](plots/lengths.png)\n\n"
        "<script>alert(1)</script>\n"
    )
    (run / "data" / "plots" / "lengths.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return run


@pytest.fixture
def ui_client(tmp_path: Path) -> Any:
    """A TestClient on a dashboard over tmp_path/runs (no seektune server behind it: port 9 is closed)."""
    from fastapi.testclient import TestClient

    from seektune.ui.app import UiSettings, create_ui_app

    runs = tmp_path / "runs"
    runs.mkdir()
    settings = UiSettings(
        runs_dir=runs,
        jobs_dir=tmp_path / "jobs",
        server_url="http://127.0.0.1:9",
        registry_url=f"sqlite:///{tmp_path / 'registry' / 'registry.db'}",
        base_config={"name": "t", "output_dir": str(runs)},
    )
    with TestClient(create_ui_app(settings)) as client:
        client.runs = runs
        yield client
