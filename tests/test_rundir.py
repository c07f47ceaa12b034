"""Run directory: atomic writes, unique names, status, metrics, fingerprints, environment."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from seektune import rundir as rundir_module
from seektune.errors import UserError
from seektune.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    fingerprint_records,
)

NOW = datetime(2025, 3, 4, 5, 6, 7)


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2, "path": Path("x/y"), "text": "héllo"})

    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 2, "path": "x/y", "text": "héllo"}
    assert "héllo" in target.read_text(encoding="utf-8")  # ensure_ascii=False
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failed_replace_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(rundir_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")

    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_unserialisable_json_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"ok": True})
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        atomic_write_json(target, loop)
    assert json.loads(target.read_text(encoding="utf-8")) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_create_makes_layout_and_unique_names(tmp_path: Path) -> None:
    first = RunDir.create(tmp_path, "demo", now=NOW)
    second = RunDir.create(tmp_path, "demo", now=NOW)
    third = RunDir.create(tmp_path, "demo", now=NOW)

    assert first.path.name == "demo-20250304-050607"
    assert second.path.name == "demo-20250304-050607-2"
    assert third.path.name == "demo-20250304-050607-3"
    for folder in (first.logs_dir, first.checkpoints_dir, first.plots_dir, first.data_dir):
        assert folder.is_dir()
    assert first.config_path == first.path / "config.yaml"
    assert first.report_path.name == "report.md"


def test_create_rejects_path_like_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="plain folder name"):
        RunDir.create(tmp_path, "../escape", now=NOW)


def test_open_missing_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        RunDir.open(tmp_path / "nope")
    run = RunDir.create(tmp_path, "demo", now=NOW)
    assert RunDir.open(run.path) == run


def test_mark_status_keeps_started_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir.create(tmp_path, "demo", now=NOW)
    times = iter(["2025-01-01T00:00:00+00:00", "2025-01-01T01:00:00+00:00"])
    monkeypatch.setattr(rundir_module, "_utc_now", lambda: next(times))

    run.mark_status("running", stage="data")
    run.mark_status("failed", stage="train", error="out of memory")
    status = run.read_json("status.json")

    assert status == {
        "state": "failed",
        "stage": "train",
        "error": "out of memory",
        "started_at": "2025-01-01T00:00:00+00:00",
        "updated_at": "2025-01-01T01:00:00+00:00",
    }


def test_mark_status_rejects_unknown_state(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "demo", now=NOW)
    with pytest.raises(ValueError, match="state"):
        run.mark_status("paused")  # type: ignore[arg-type]


def test_update_metrics_merges_sections_and_keys(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "demo", now=NOW)
    run.update_metrics("train", {"loss": 2.0, "steps": 10})
    run.update_metrics("eval", {"perplexity": 5.5})
    run.update_metrics("train", {"loss": 1.5})

    assert json.loads(run.metrics_path.read_text(encoding="utf-8")) == {
        "train": {"loss": 1.5, "steps": 10},
        "eval": {"perplexity": 5.5},
    }


def test_write_and_read_json_inside_run(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "demo", now=NOW)
    written = run.write_json("data/splits.json", {"train": 3})
    assert written == run.data_dir / "splits.json"
    assert run.read_json("data/splits.json") == {"train": 3}
    assert run.write_text("notes.txt", "hi").read_text(encoding="utf-8") == "hi"
    with pytest.raises(ValueError, match="outside"):
        run.write_text("../outside.txt", "no")
    with pytest.raises(UserError, match="does not exist"):
        run.read_json("missing.json")


def test_fingerprint_is_stable_and_sensitive() -> None:
    records = [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}]
    same_keys_other_order = [{"answer": "b", "question": "a"}, {"answer": "d", "question": "c"}]

    assert fingerprint_records(records) == fingerprint_records(same_keys_other_order)
    assert len(fingerprint_records(records)) == 64
    assert fingerprint_records(records) != fingerprint_records([records[0], {"question": "c", "answer": "e"}])
    assert fingerprint_records(records) != fingerprint_records(list(reversed(records)))
    assert fingerprint_records(records) != fingerprint_records(records[:1])


def test_environment_info_has_versions_seed_and_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.chdir(tmp_path)  # not a git repository: no failure, no commit
    info = environment_info(seed=123, device="cpu")

    assert info["torch"] == torch.__version__
    assert info["seed"] == 123
    assert info["device"] == "cpu"
    assert info["packages"]["transformers"] is not None
    assert info["git_commit"] is None
    assert info["cpu_count"] == os.cpu_count()
    json.dumps(info)  # everything is JSON-serialisable


def test_environment_info_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(rundir_module.subprocess, "run", no_git)
    info = environment_info(seed=1)
    assert info["git_commit"] is None and info["git_dirty"] is None
