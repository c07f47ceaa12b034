"""What the dashboard reads of run directories: the list of runs, one run's facts, its live curves.

Everything comes from the files a run writes (`seektune.rundir`): status.json, config.yaml, metrics.json,
the reports, and `logs/events.jsonl`, where the training callback writes one `train_log` event per logging
step while the run trains (train/history.json only appears at the end). The curves are read from the
events file incrementally: each poll parses only the lines added since the last one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seektune.errors import UserError

CURVES = ("loss", "eval_loss", "learning_rate", "tokens_per_s", "grad_norm")
REPORTS = {
    "run": "report.md",
    "data": "data/report.md",
    "evaluation": "eval/report.html",
    "search": "tune/report.md",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "status.json").is_file() or (path / "config.yaml").is_file())


def run_path(runs_dir: Path, run_id: str) -> Path:
    """The folder of run `run_id` (a folder name under `runs_dir`); a UserError when it is not there."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise UserError(f"{run_id!r} is not a run name")
    path = runs_dir / run_id
    if not is_run_dir(path):
        raise UserError(
            f"the run directory {path} does not exist (deleted or moved?): pick a run from the list"
        )
    return path


def _key_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few figures the run list shows."""
    out: dict[str, Any] = {}
    train = metrics.get("train") or {}
    for key in ("train_loss", "eval_loss"):
        if isinstance(train.get(key), (int, float)):
            out[key] = train[key]
    tuned = (metrics.get("eval") or {}).get("tuned") or {}
    scores = tuned.get("scores", tuned) if isinstance(tuned, dict) else {}
    for key, value in scores.items() if isinstance(scores, dict) else []:
        if isinstance(value, (int, float)) and key in (
            "perplexity",
            "exact_match",
            "token_f1",
            "rouge_l",
            "accuracy",
        ):
            out[key] = value
    tune = metrics.get("tune") or {}
    if isinstance(tune.get("best_value"), (int, float)):
        out["best_trial"] = tune["best_value"]
    return out


def run_summary(path: Path) -> dict[str, Any]:
    """One line of the run list."""
    status = _read_json(path / "status.json") or {}
    config = _read_yaml(path / "config.yaml")
    metrics = _read_json(path / "metrics.json") or {}
    model = (config.get("model") or {}).get("name_or_path")
    method = (config.get("method") or {}).get("name")
    objective = (config.get("train") or {}).get("objective")
    return {
        "id": path.name,
        "name": config.get("name") or path.name,
        "state": status.get("state", "unknown"),
        "stage": status.get("stage"),
        "error": status.get("error"),
        "started_at": status.get("started_at"),
        "updated_at": status.get("updated_at"),
        "model": model,
        "method": method if not objective or objective == "sft" else f"{method} ({objective})",
        "metrics": _key_metrics(metrics),
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run directory directly under `runs_dir`, newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [run_summary(p) for p in runs_dir.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r["started_at"] or "", r["id"]), reverse=True)


def run_detail(path: Path) -> dict[str, Any]:
    """The run page's facts: the summary, the config, metrics, which reports exist."""
    summary = run_summary(path)
    config_file = path / "config.yaml"
    return {
        **summary,
        "path": str(path),
        "config_yaml": config_file.read_text(encoding="utf-8") if config_file.is_file() else "",
        "metrics_json": _read_json(path / "metrics.json") or {},
        "reports": {kind: rel for kind, rel in REPORTS.items() if (path / rel).is_file()},
    }


@dataclass
class _Cursor:
    offset: int = 0
    series: dict[str, list[list[float]]] = field(default_factory=lambda: {name: [] for name in CURVES})


class CurveReader:
    """Loss, validation loss, learning rate, throughput and gradient norm by step, for any number of
    runs, each read on from where the previous call stopped."""

    def __init__(self) -> None:
        self._cursors: dict[Path, _Cursor] = {}
        self._lock = threading.Lock()

    def curves(self, path: Path) -> dict[str, list[list[float]]]:
        """{curve: [[step, value], ...]}: from logs/events.jsonl while it exists (live), else from
        train/history.json."""
        events = path / "logs" / "events.jsonl"
        if not events.is_file():
            history = _read_json(path / "train" / "history.json")
            return _series(history if isinstance(history, list) else [])
        with self._lock:
            cursor = self._cursors.get(path)
            size = events.stat().st_size
            if cursor is None or size < cursor.offset:  # new, or rewritten (a resumed run)
                cursor = self._cursors[path] = _Cursor()
            with events.open("rb") as handle:
                handle.seek(cursor.offset)
                chunk = handle.read(size - cursor.offset)
            complete = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
            cursor.offset += complete
            for line in chunk[:complete].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "train_log":
                    _add_point(cursor.series, event)
            return {name: list(points) for name, points in cursor.series.items()}


def _add_point(series: dict[str, list[list[float]]], entry: dict[str, Any]) -> None:
    step = entry.get("step")
    if not isinstance(step, (int, float)):
        return
    for name in CURVES:
        value = entry.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points = series[name]
            if points and points[-1][0] == step:  # the final evaluation logs the last step's again
                points[-1] = [step, value]
            else:
                points.append([step, value])


def _series(history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    series: dict[str, list[list[float]]] = {name: [] for name in CURVES}
    for entry in history:
        if isinstance(entry, dict):
            _add_point(series, entry)
    return series
