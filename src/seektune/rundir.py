"""The run directory: where one run keeps everything it writes, and how it writes it.

transformers' `Trainer` has an `output_dir` for checkpoints, but no notion of a run: nothing records the
resolved config, the environment, a fingerprint of the data, the status of a half-finished run or the
metrics of several stages in one place. This module is that place. A run directory looks like::

    <output_dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml        the fully resolved config (what `seektune run` re-runs)
        environment.json   versions, device, seed, git commit, command line
        status.json        running / completed / failed, the current stage, timestamps
        metrics.json       one section per stage, merged as stages finish
        report.md          the human report (see `seektune.report`)
        logs/ checkpoints/ plots/ data/

Every file is written atomically (temporary file in the same folder, fsync, `os.replace`), so a run that
is killed never leaves a half-written artefact behind: readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from seektune.errors import UserError

RunState = Literal["running", "completed", "failed"]

_SUBDIRS = ("logs", "checkpoints", "plots", "data")
_RUN_STATES = ("running", "completed", "failed")
_VERSIONED_PACKAGES = (
    "seektune",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "tokenizers",
    "pydantic",
)

# ---------------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old content or the new, never a mix."""
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` one after another to `path`, atomically, without holding them all in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (non-JSON values such as paths are written with `str`)."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str)
    atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Write one JSON object per line (UTF-8, not ASCII-escaped), atomically, streaming the rows."""
    lines = ((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8") for row in rows)
    atomic_write_chunks(path, lines)


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# The run directory


@dataclass(frozen=True)
class RunDir:
    """One run's folder; every artefact of the run is written below `path`."""

    path: Path

    @classmethod
    def create(cls, output_dir: Path, name: str, now: datetime | None = None) -> RunDir:
        """Make `output_dir/<name>-<YYYYmmdd-HHMMSS>` (with `-2`, `-3`, ... when taken) and its subfolders."""
        if not name or any(ch in name for ch in "/\\:") or name.startswith("."):
            raise UserError(
                f"run name {name!r} must be a plain folder name (no '/', '\\', ':', no leading '.')"
            )
        output_dir = Path(output_dir)
        stem = f"{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            path = _make_unique_dir(output_dir, stem)
        except OSError as exc:
            raise UserError(
                f"cannot create a run directory in {output_dir}: {exc.strerror}; pick a writable output_dir"
            ) from None
        for sub in _SUBDIRS:
            (path / sub).mkdir()
        return cls(path)

    @classmethod
    def create_at(cls, path: Path) -> RunDir:
        """Make the run directory `path` itself (a nested run: one trial of a search) and its subfolders."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for sub in _SUBDIRS:
            (path / sub).mkdir(exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory (for resume, report and evaluation of a finished run)."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"run directory {path} does not exist: give a folder made by `seektune run`")
        return cls(path)

    # --- well-known files and folders

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def environment_path(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    # --- reading and writing inside the run

    def resolve(self, rel: str | Path) -> Path:
        """`rel` below the run directory; paths that would leave it are a bug and raise ValueError."""
        rel = Path(rel)
        target = (self.path / rel).resolve()
        if rel.is_absolute() or not target.is_relative_to(self.path.resolve()):
            raise ValueError(f"{rel} is outside the run directory {self.path}")
        return self.path / rel

    def write_text(self, rel: str | Path, text: str) -> Path:
        """Atomically write text to `rel` inside the run; returns the full path."""
        target = self.resolve(rel)
        atomic_write_text(target, text)
        return target

    def write_json(self, rel: str | Path, obj: Any) -> Path:
        """Atomically write JSON to `rel` inside the run; returns the full path."""
        target = self.resolve(rel)
        atomic_write_json(target, obj)
        return target

    def write_jsonl(self, rel: str | Path, rows: Iterable[Any]) -> Path:
        """Atomically write JSON Lines to `rel` inside the run; returns the full path."""
        target = self.resolve(rel)
        atomic_write_jsonl(target, rows)
        return target

    def read_json(self, rel: str | Path) -> Any:
        """Read JSON written by `write_json`; a missing or corrupt file is a UserError naming it."""
        target = self.resolve(rel)
        try:
            return json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{target} does not exist: is {self.path} a complete seektune run?") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{target} is not valid JSON (line {exc.lineno}): {exc.msg}") from None

    def mark_status(
        self, state: RunState, stage: str | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """Record where the run stands in status.json; `started_at` is kept from the first write."""
        if state not in _RUN_STATES:
            raise ValueError(f"state must be one of {_RUN_STATES}, not {state!r}")
        previous = self._read_json_or(self.status_path, {})
        now = _utc_now()
        status = {
            "state": state,
            "stage": stage,
            "error": error,
            "started_at": previous.get("started_at") or now,
            "updated_at": now,
        }
        atomic_write_json(self.status_path, status)
        return status

    def update_metrics(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge `values` into `section` of metrics.json (keys given replace those present); returns all."""
        metrics = self._read_json_or(self.metrics_path, {})
        merged = dict(metrics.get(section) or {})
        merged.update(values)
        metrics[section] = merged
        atomic_write_json(self.metrics_path, metrics)
        return metrics

    @staticmethod
    def _read_json_or(path: Path, default: dict[str, Any]) -> dict[str, Any]:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return default
        return loaded if isinstance(loaded, dict) else default


def _make_unique_dir(parent: Path, stem: str) -> Path:
    """Create `parent/stem`, or `stem-2`, `stem-3`, ... when taken (mkdir itself is the lock)."""
    for index in range(1, 10_000):
        candidate = parent / (stem if index == 1 else f"{stem}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise UserError(f"too many run directories named {stem}* in {parent}; clean up or change the run name")


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint_records(records: Iterable[Any]) -> str:
    """sha256 of the records in order, each as canonical JSON (sorted keys, compact) on its own line.

    Equal data gives an equal fingerprint whatever the key order of each record; changing, adding,
    removing or reordering a record changes it.
    """
    digest = hashlib.sha256()
    for record in records:
        digest.update(fingerprint_line(record))
    return digest.hexdigest()


def fingerprint_line(record: Any) -> bytes:
    """One record's line in `fingerprint_records`: canonical JSON and a newline."""
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return line.encode("utf-8") + b"\n"


# ---------------------------------------------------------------------------------------------------------
# Environment


def environment_info(seed: int, device: str | None = None) -> dict[str, Any]:
    """What a person needs to reproduce a run: versions, hardware, seed, git commit and command line."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **_torch_info(),
        "packages": {name: _package_version(name) for name in _VERSIONED_PACKAGES},
        "seed": seed,
        "device": device,
        **_git_info(Path.cwd()),
        "command": list(sys.argv),
        "timestamp": _utc_now(),
    }
    return info


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_device_count": torch.cuda.device_count() if cuda else 0,
        "cuda_device_name": torch.cuda.get_device_name(0) if cuda else None,
    }


def _git_info(cwd: Path) -> dict[str, Any]:
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    porcelain = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(porcelain) if porcelain is not None else None}


def _git(cwd: Path, *args: str) -> str | None:
    """Output of a git command, or None when git is missing, fails or `cwd` is not a repository."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
