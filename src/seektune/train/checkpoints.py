"""Checkpoints that are complete or ignored, and resuming from the newest complete one.

transformers' `Trainer` writes a checkpoint (`checkpoint-<step>`: weights, optimizer, scheduler, RNG states,
trainer state) file by file and then deletes the oldest beyond `save_total_limit`. A run killed in the
middle leaves a folder that has the right name but not all its files, and `resume_from_checkpoint=True`
would pick it. Ours adds what the Trainer lacks:

- a completion marker (`seektune-checkpoint.json`), written atomically after every file of the checkpoint
  has been flushed to disk; a folder without it is not a checkpoint;
- old checkpoints are rotated away only after the new one is marked complete, so a crash during a save
  never leaves fewer complete checkpoints than `save_total_limit` allows;
- the marker records what the checkpoint belongs to (model, method and its settings, data fingerprint),
  so a resume with another model, method or data is refused with one message instead of failing on
  tensor shapes or silently training on other data.

Resuming runs in a new run directory that names the checkpoint it continued from: nothing the earlier run
wrote is touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seektune.errors import UserError
from seektune.rundir import atomic_write_json, fsync_dir

logger = logging.getLogger(__name__)

MARKER = "seektune-checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_RUN_NAME = re.compile(r"^(?P<name>.+)-(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?$")


def checkpoint_identity(cfg: Any, data_fingerprint: str | None) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: model, method settings, data fingerprint."""
    method = cfg.method
    settings = getattr(method, {"dora": "lora", "qlora": "lora"}.get(method.name, method.name), None)
    return {
        "model": cfg.model.name_or_path,
        "base_recipe": cfg.model.base.model_dump() if cfg.model.name_or_path == "tiny-deepseek-v3" else None,
        "method": method.name,
        "method_settings": settings.model_dump() if settings is not None else {},
        "data_fingerprint": data_fingerprint,
    }


def mark_complete(folder: Path, step: int, identity: dict[str, Any]) -> None:
    """Flush every file of `folder` to disk, then write its completion marker (atomically)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)
    atomic_write_json(folder / MARKER, {"step": step, **identity})


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder, or None when the checkpoint is not complete."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_step(folder: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(folder.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints in `checkpoints_dir`, oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if checkpoint_step(p) is not None and read_marker(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def rotate(checkpoints_dir: Path, keep: int, protect: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`, the best one); delete older ones."""
    complete = complete_checkpoints(checkpoints_dir)
    protected = Path(protect).resolve() if protect else None
    excess = len(complete) - keep
    for path in complete:
        if excess <= 0:
            break
        if protected is not None and path.resolve() == protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        excess -= 1


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, and whether it starts the (changed) data afresh."""

    checkpoint: Path
    step: int
    new_data: bool = False


def find_resume_checkpoint(output_dir: Path, name: str) -> Path | None:
    """The newest complete checkpoint of the newest unfinished run named `name` in `output_dir`.

    Runs that completed are not resumed (their training is over); a run killed with SIGKILL still says
    "running" in its status, one stopped by an error or a signal says "failed": both are resumable.
    """
    for run in unfinished_runs(output_dir, name):
        complete = complete_checkpoints(run / "checkpoints")
        if complete:
            return complete[-1]
    return None


def unfinished_runs(output_dir: Path, name: str) -> list[Path]:
    """The run directories of run `name` in `output_dir` that did not complete, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    runs = [(order, path) for path in output_dir.iterdir() if (order := _run_order(path, name))]
    return [run for _, run in sorted(runs, reverse=True) if _run_state(run) != "completed"]


def _run_state(run: Path) -> str | None:
    try:
        return json.loads((run / "status.json").read_text(encoding="utf-8")).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _run_order(path: Path, name: str) -> tuple[str, int] | None:
    """(start time, number) of a run directory of run `name` (see `RunDir.create`), else None."""
    match = _RUN_NAME.match(path.name)
    if not path.is_dir() or match is None or match.group("name") != name:
        return None
    return match.group("stamp"), int(match.group("n") or 1)


def check_identity(checkpoint: Path, identity: dict[str, Any], allow_new_data: bool) -> bool:
    """Refuse a checkpoint of another model or method; True when the data changed (and that is allowed).

    With `identity["data_fingerprint"]` None (the data is not prepared yet) only model and method are
    checked.
    """
    marker = read_marker(checkpoint) or {}
    for key, what in (("model", "model"), ("base_recipe", "model.base recipe"), ("method", "method")):
        if marker.get(key) != identity[key]:
            raise UserError(
                f"cannot resume from {checkpoint}: it was trained with {what} {marker.get(key)!r}, the "
                f"config has {identity[key]!r}; run without --resume (and train.resume: never) to start "
                "a new run, or restore the config it was trained with"
            )
    if marker.get("method_settings") != identity["method_settings"]:
        changed = _changed_keys(marker.get("method_settings") or {}, identity["method_settings"])
        raise UserError(
            f"cannot resume from {checkpoint}: method.{identity['method']} settings differ from the "
            f"checkpoint's ({', '.join(changed)}); restore them or start a new run without --resume"
        )
    if identity["data_fingerprint"] is None or marker.get("data_fingerprint") == identity["data_fingerprint"]:
        return False
    if not allow_new_data:
        then, now = str(marker.get("data_fingerprint"))[:12], str(identity["data_fingerprint"])[:12]
        raise UserError(
            f"cannot resume from {checkpoint}: the prepared data changed since it was saved (fingerprint "
            f"{then} then, {now} now), "
            "so the data position would be meaningless; pass --resume-new-data to keep the weights and "
            "optimizer and start the new data from its beginning, or restore the data"
        )
    return True


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
