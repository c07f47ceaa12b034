"""Logging and progress for people (rich) and for machines (one JSON object per line).

`logging` and rich already do the rendering; what they do not do is the policy of a seektune process:
the same events rendered for a person on an interactive console, as JSON lines for a supervisor
(`--log-json`), and always as JSON lines in the run directory (`logs/events.jsonl`), with the
warnings of transformers, peft and datasets routed through the same handlers instead of their own
stderr printers. A progress bar and periodic progress events must not both appear, so `progress()`
picks one.

Process-wide state: `setup_logging` sets the one process-wide setting, "JSON mode" (`json_events`).
It decides how `progress()` reports (events instead of a bar) and is read with `json_events_enabled()`.
It is a property of the console of this process, not of any stage, so no stage receives it as an
argument. `reset_logging()` undoes everything `setup_logging` and `attach_run_logs` did (for tests).

Events: `log_event(logger, "eval_done", perplexity=5.6)` logs the message "eval_done" with the fields
in `extra={"data": {...}}`; the JSON handlers merge the fields into the object, the console shows
"eval_done perplexity=5.6".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from transformers import TrainerCallback

PACKAGE_LOGGER = "seektune"
# Loggers of the libraries whose warnings we show through our handlers, at WARNING.
LIBRARY_LOGGERS = ("transformers", "peft", "datasets", "accelerate", "py.warnings")
RUN_LOG_NAME = "seektune.log"
EVENTS_NAME = "events.jsonl"

_PROGRESS_LOGGER = logging.getLogger("seektune.progress")
_TRAIN_LOGGER = logging.getLogger("seektune.train")
_CORE_KEYS = ("time", "level", "logger", "event")
_UNKNOWN_TOTAL_EVERY_S = 10.0


@dataclass
class _LoggingState:
    json_events: bool = False
    console_handlers: list[logging.Handler] = field(default_factory=list)
    file_handlers: list[logging.Handler] = field(default_factory=list)
    captured_warnings: bool = False


_state = _LoggingState()
# One console for log lines and progress bars, so log lines are printed above a live bar.
_console = Console(stderr=True)


def json_events_enabled() -> bool:
    """Whether `setup_logging(json_events=True)` put this process in JSON mode."""
    return _state.json_events


# ---------------------------------------------------------------------------------------------------------
# Formatters and handlers


def _jsonable(value: Any) -> Any:
    """Values JSON can hold; NaN and infinities become strings so every line stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _record_data(record: logging.LogRecord) -> dict[str, Any]:
    data = getattr(record, "data", None)
    return data if isinstance(data, dict) else {}


def _iso_utc(created: float) -> str:
    return datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds")


class JsonEventFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, event, then the record's `data` fields."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _record_data(record).items():
            event[f"data_{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(_jsonable(event), ensure_ascii=False, default=str)


def _format_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return repr(text) if isinstance(value, str) and (" " in text or not text) else text


def format_event_fields(data: dict[str, Any]) -> str:
    """`key=value key2=value2`, floats to 4 significant digits."""
    return " ".join(f"{key}={_format_field(value)}" for key, value in data.items())


class _EventFormatter(logging.Formatter):
    """The message followed by the record's `data` fields (no traceback: rich renders that)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields = format_event_fields(_record_data(record))
        return f"{message} {fields}" if fields else message


class _PlainFileFormatter(_EventFormatter):
    """`time level logger: message key=value`, with the traceback, for the run's text log."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).isoformat(sep=" ", timespec="seconds")
        text = f"{stamp} {record.levelname:<7} {record.name}: {super().format(record)}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrJsonHandler(logging.Handler):
    """Writes JSON lines to whatever `sys.stderr` is at the time of the record (survives redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _console_handler(debug: bool, json_events: bool) -> logging.Handler:
    handler: logging.Handler
    if json_events:
        handler = _StderrJsonHandler()
        handler.setFormatter(JsonEventFormatter())
    else:
        handler = RichHandler(console=_console, show_path=False, rich_tracebacks=True, markup=False)
        handler.setFormatter(_EventFormatter())
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def _file_handlers(log_file: Path) -> list[logging.Handler]:
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    text = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    text.setFormatter(_PlainFileFormatter())
    events = logging.FileHandler(log_file.parent / EVENTS_NAME, mode="a", encoding="utf-8")
    events.setFormatter(JsonEventFormatter())
    for handler in (text, events):
        handler.setLevel(logging.DEBUG)
    return [text, events]


# ---------------------------------------------------------------------------------------------------------
# Setup


def _target_loggers() -> list[logging.Logger]:
    return [logging.getLogger(name) for name in (PACKAGE_LOGGER, *LIBRARY_LOGGERS)]


def _add_handlers(handlers: list[logging.Handler]) -> None:
    for logger in _target_loggers():
        for handler in handlers:
            logger.addHandler(handler)


def _remove_handlers(handlers: list[logging.Handler]) -> None:
    for logger in _target_loggers():
        for handler in handlers:
            logger.removeHandler(handler)
    for handler in handlers:
        handler.close()
    handlers.clear()


def _silence_library_printers() -> None:
    """Remove the stderr handlers transformers and datasets install, so their warnings come through ours.

    Both install theirs when their logging module is first imported (transformers on first use), so we
    import those modules here; afterwards neither adds another.
    """
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # installs the default handler once, if not yet done
        hf_logging.disable_default_handler()
    except (ImportError, AssertionError):
        pass
    with contextlib.suppress(ImportError):
        import datasets.utils.logging  # noqa: F401  (adds a plain StreamHandler on import)
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        if type(handler) is logging.StreamHandler:
            datasets_logger.removeHandler(handler)


def _disable_library_bars() -> None:
    """Turn off the tqdm bars of transformers, huggingface_hub and datasets (JSON mode: JSON-only stderr)."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def setup_logging(*, debug: bool = False, json_events: bool = False, log_file: Path | None = None) -> None:
    """Configure seektune's logging for this process; calling it again replaces what it set before.

    Console (stderr): rich at INFO (DEBUG with `debug`), or JSON lines when `json_events`.
    `log_file`: also a plain text log there and `events.jsonl` (JSON lines) beside it, both at DEBUG.
    Warnings of transformers, peft, datasets, accelerate and Python's `warnings` go through the same
    handlers at WARNING.
    """
    _remove_handlers(_state.console_handlers)
    _remove_handlers(_state.file_handlers)
    _state.json_events = json_events
    _silence_library_printers()
    if json_events:
        _disable_library_bars()
    # Libraries that log through the root logger (absl, used by rouge-score) call logging.basicConfig(),
    # which would print every record a second time; a root handler makes that call a no-op.
    if not logging.root.handlers:
        logging.root.addHandler(logging.NullHandler())
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.DEBUG)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not _state.captured_warnings:
        logging.captureWarnings(True)
        _state.captured_warnings = True
    _state.console_handlers.append(_console_handler(debug, json_events))
    _add_handlers(_state.console_handlers)
    if log_file is not None:
        _state.file_handlers.extend(_file_handlers(Path(log_file)))
        _add_handlers(_state.file_handlers)


def attach_run_logs(logs_dir: Path) -> None:
    """Also log to `logs_dir/seektune.log` and `logs_dir/events.jsonl` (replacing earlier log files)."""
    _remove_handlers(_state.file_handlers)
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.DEBUG)  # the files keep DEBUG records
    _state.file_handlers.extend(_file_handlers(Path(logs_dir) / RUN_LOG_NAME))
    _add_handlers(_state.file_handlers)


def detach_run_logs() -> None:
    """Stop logging to the files attached by `attach_run_logs` or `setup_logging(log_file=...)`."""
    _remove_handlers(_state.file_handlers)


def reset_logging() -> None:
    """Undo `setup_logging` and `attach_run_logs`: remove our handlers, leave JSON mode (for tests)."""
    _remove_handlers(_state.console_handlers)
    _remove_handlers(_state.file_handlers)
    _state.json_events = False
    if _state.captured_warnings:
        logging.captureWarnings(False)
        _state.captured_warnings = False
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.NOTSET)
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_default_handler()
        except (ImportError, AssertionError):
            pass


def log_event(logger: logging.Logger, event: str, **data: Any) -> None:
    """Log `event` at INFO with `data` as fields (JSON keys, or `key=value` on the console)."""
    logger.info(event, extra={"data": data})


# ---------------------------------------------------------------------------------------------------------
# Progress


class ProgressHandle(Protocol):
    """What `progress()` yields."""

    def advance(self, n: int = 1) -> None: ...

    def update(self, **fields: Any) -> None: ...


class _SharedBar:
    """One rich `Progress` display for the process; nested `progress()` calls add rows to it."""

    display: Progress | None = None
    tasks = 0

    @classmethod
    def add(cls, description: str, total: int | None) -> tuple[Progress, TaskID]:
        if cls.display is None:
            cls.display = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}", markup=False),
                console=_console,
            )
            cls.display.start()
        cls.tasks += 1
        return cls.display, cls.display.add_task(description, total=total, status="")

    @classmethod
    def remove(cls, task: TaskID) -> None:
        if cls.display is None:
            return
        cls.tasks -= 1
        if cls.tasks > 0:
            cls.display.remove_task(task)  # a finished nested row goes; the outermost row stays
            return
        cls.display.stop()
        cls.display, cls.tasks = None, 0


class _BarProgress:
    """A row of the rich progress display."""

    def __init__(self, description: str, total: int | None) -> None:
        self._display, self._task = _SharedBar.add(description, total)
        self._fields: dict[str, Any] = {}

    def advance(self, n: int = 1) -> None:
        self._display.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        self._fields.update(fields)
        self._display.update(self._task, status=format_event_fields(self._fields))

    def close(self, ok: bool) -> None:
        _SharedBar.remove(self._task)


class _LoggedProgress:
    """Progress as `progress` events: each tenth of a known total, else every 10 s, and at the end."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self._fields: dict[str, Any] = {}
        self._started = time.monotonic()
        self._last_decile = 0
        self._last_emit = self._started
        self._emitted_at: int | None = None

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self.total is not None and self.total > 0:
            decile = min(10, self.completed * 10 // self.total)
            if decile > self._last_decile:
                self._last_decile = decile
                self._emit()
        elif time.monotonic() - self._last_emit >= _UNKNOWN_TOTAL_EVERY_S:
            self._emit()

    def update(self, **fields: Any) -> None:
        self._fields.update(fields)

    def close(self, ok: bool) -> None:
        if ok and self._emitted_at != self.completed:
            self._emit()

    def _emit(self) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        data: dict[str, Any] = {"task": self.description, "completed": self.completed, "total": self.total}
        if self.total:
            data["percent"] = round(100 * min(self.completed, self.total) / self.total)
            if 0 < self.completed < self.total:
                data["eta_s"] = round(elapsed * (self.total - self.completed) / self.completed, 1)
        data["elapsed_s"] = round(elapsed, 1)
        log_event(_PROGRESS_LOGGER, "progress", **data, **self._fields)
        self._last_emit, self._emitted_at = now, self.completed


def _use_bar() -> bool:
    return not _state.json_events and _console.is_terminal and not _console.is_dumb_terminal


@contextmanager
def progress(description: str, total: int | None) -> Iterator[ProgressHandle]:
    """Report progress of a loop: a rich bar on an interactive stderr, else `progress` events.

    Never both: in JSON mode or when stderr is not a terminal there is no bar, only events every ~10%
    of `total` (every 10 s when `total` is None) and one at the end.
    """
    handle: _BarProgress | _LoggedProgress
    handle = _BarProgress(description, total) if _use_bar() else _LoggedProgress(description, total)
    ok = False
    try:
        yield handle
        ok = True
    finally:
        handle.close(ok)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer callback (built on first use: importing transformers' Trainer takes seconds)


def _train_log_entry(state: Any, logs: dict[str, Any] | None) -> dict[str, Any]:
    return {"step": state.global_step, "epoch": state.epoch, **(logs or {})}


# What the training progress bar shows of each log line, when present.
_SHOWN_FIELDS = ("loss", "eval_loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "peak_memory_gb")


@functools.cache
def _progress_callback_class() -> type[TrainerCallback]:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Drives `progress()` during `Trainer.train` and keeps every log dict in `history`.

        Give the Trainer `disable_tqdm=True` and remove `transformers.PrinterCallback` (it prints log
        dicts to stdout) so that this is the only display. If training raises, call `close()` in a
        `finally` to end the bar.
        """

        def __init__(self, description: str = "train") -> None:
            self.description = description
            self.history: list[dict[str, Any]] = []
            self._stack: ExitStack | None = None
            self._progress: ProgressHandle | None = None
            self._step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()
            if not state.is_world_process_zero:
                return
            self._stack = ExitStack()
            total = state.max_steps if state.max_steps and state.max_steps > 0 else None
            self._progress = self._stack.enter_context(progress(self.description, total))
            self._step = 0
            self._catch_up(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._catch_up(state)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            entry = _train_log_entry(state, logs)
            self.history.append(entry)
            _TRAIN_LOGGER.debug("train_log", extra={"data": entry})
            shown = {k: entry[k] for k in _SHOWN_FIELDS if isinstance(entry.get(k), (int, float))}
            if self._progress is not None and shown:
                self._progress.update(**shown)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._catch_up(state)
            self.close()

        def close(self) -> None:
            """End the progress display (idempotent)."""
            if self._stack is not None:
                self._stack.close()
            self._stack, self._progress = None, None

        def _catch_up(self, state: Any) -> None:
            if self._progress is not None and state.global_step > self._step:
                self._progress.advance(state.global_step - self._step)
                self._step = state.global_step

    return ProgressCallback


def __getattr__(name: str) -> Any:
    # `from seektune.logs import ProgressCallback` builds the class on first use (PEP 562).
    if name == "ProgressCallback":
        return _progress_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
