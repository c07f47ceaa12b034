"""Logging setup, JSON events, run log files, progress reporting and the Trainer callback."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from seektune import logs
from seektune.logs import (
    attach_run_logs,
    detach_run_logs,
    json_events_enabled,
    log_event,
    progress,
    reset_logging,
    setup_logging,
)

logger = logging.getLogger("seektune.tests")


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    reset_logging()
    yield
    reset_logging()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_events_are_parseable_lines_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True)
    log_event(logger, "data_ready", examples=120, path=Path("a/b.jsonl"), loss=float("nan"))
    logger.debug("hidden without debug")

    events = _json_lines(capsys.readouterr().err)
    assert len(events) == 1
    event = events[0]
    assert event["event"] == "data_ready"
    assert event["level"] == "INFO"
    assert event["logger"] == "seektune.tests"
    assert event["examples"] == 120
    assert event["path"] == "a/b.jsonl"
    assert event["loss"] == "nan"
    assert event["time"].endswith("+00:00")
    assert json_events_enabled()


def test_setup_twice_does_not_duplicate(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True, debug=True)
    setup_logging(json_events=True, debug=True)
    logger.debug("once")
    assert len(_json_lines(capsys.readouterr().err)) == 1


def test_rich_console_shows_event_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    log_event(logger, "train_done", steps=10)
    err = capsys.readouterr().err
    assert "train_done steps=10" in err
    assert not json_events_enabled()


def test_library_warnings_come_through(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True)
    logging.getLogger("transformers.modeling_utils").warning("weights not initialised")
    logging.getLogger("transformers.modeling_utils").info("too chatty")
    events = _json_lines(capsys.readouterr().err)
    assert [e["event"] for e in events] == ["weights not initialised"]


def test_log_file_and_events_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_file=tmp_path / "logs" / "seektune.log")
    logger.debug("debug goes to files")
    log_event(logger, "stage_done", stage="data")

    text = (tmp_path / "logs" / "seektune.log").read_text(encoding="utf-8")
    assert "debug goes to files" in text and "stage_done stage=data" in text
    events = _json_lines((tmp_path / "logs" / "events.jsonl").read_text(encoding="utf-8"))
    assert [e["event"] for e in events] == ["debug goes to files", "stage_done"]
    assert events[1]["stage"] == "data"
    assert "debug goes to files" not in capsys.readouterr().err


def test_attach_and_detach_run_logs(tmp_path: Path) -> None:
    setup_logging(json_events=True)
    attach_run_logs(tmp_path / "run1")
    attach_run_logs(tmp_path / "run2")  # replaces run1's files
    log_event(logger, "hello")
    detach_run_logs()
    log_event(logger, "after detach")

    assert (tmp_path / "run1" / "events.jsonl").read_text(encoding="utf-8") == ""
    events = _json_lines((tmp_path / "run2" / "events.jsonl").read_text(encoding="utf-8"))
    assert [e["event"] for e in events] == ["hello"]


def test_progress_emits_events_every_tenth_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True)
    with progress("tokenise", total=50) as bar:
        for _ in range(50):
            bar.advance()
        bar.update(dropped=3)

    events = [e for e in _json_lines(capsys.readouterr().err) if e["event"] == "progress"]
    assert [e["percent"] for e in events] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert events[-1]["completed"] == 50 and events[-1]["task"] == "tokenise"


def test_progress_without_total_reports_at_end(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True)
    with progress("generate", total=None) as bar:
        bar.advance(3)
        bar.update(batch=2)
    events = _json_lines(capsys.readouterr().err)
    assert len(events) == 1
    assert events[0]["completed"] == 3 and events[0]["total"] is None and events[0]["batch"] == 2


def test_progress_is_silent_after_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_events=True)
    with pytest.raises(RuntimeError), progress("train", total=100) as bar:
        bar.advance(5)
        raise RuntimeError("boom")
    assert _json_lines(capsys.readouterr().err) == []


def test_progress_uses_bar_on_a_terminal_and_no_events(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    monkeypatch.setattr(logs, "_use_bar", lambda: True)
    with progress("outer", total=4) as outer:
        with progress("inner", total=2) as inner:  # nested: a second row, not a second display
            inner.advance(2)
        outer.advance(4)
        outer.update(loss=1.25)
    assert logs._SharedBar.display is None
    assert "progress" not in capsys.readouterr().err.split()


def test_progress_callback_drives_progress_and_records_history(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import TrainerCallback

    from seektune.logs import ProgressCallback

    assert issubclass(ProgressCallback, TrainerCallback)
    setup_logging(json_events=True)
    callback = ProgressCallback("train")
    state = SimpleNamespace(max_steps=10, global_step=0, epoch=0.0, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    for step in range(1, 11):
        state.global_step, state.epoch = step, step / 10
        callback.on_step_end(None, state, None)
        if step % 5 == 0:
            callback.on_log(None, state, None, logs={"loss": 3.0 - step / 10, "learning_rate": 1e-4})
    callback.on_train_end(None, state, None)

    assert callback.history == [
        {"step": 5, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-4},
        {"step": 10, "epoch": 1.0, "loss": 2.0, "learning_rate": 1e-4},
    ]
    events = [e for e in _json_lines(capsys.readouterr().err) if e["event"] == "progress"]
    assert len(events) == 10
    assert events[-1]["completed"] == 10 and events[-1]["loss"] == 2.5  # step end comes before its log
