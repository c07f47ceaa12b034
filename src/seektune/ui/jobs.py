"""Jobs the dashboard starts: a `seektune` command on a config, in a process of its own.

A job is the CLI itself (`python -m seektune.cli train config.yaml`), so it runs, validates, logs and
fails exactly as it does from a terminal, and it outlives a restart of the dashboard. Each job has a
folder under the jobs directory: config.yaml (what the form produced), output.log (the command's stdout
and stderr) and job.json (command, pid, times, state, exit code, run directory). Stopping sends SIGTERM to
the job's process group (the CLI turns it into a failed run whose checkpoints stay resumable), then
SIGKILL if it is still there after a grace period.

Why our own code: a job queue library (Celery, RQ) brings a broker; here one machine runs a few jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seektune.config import SeektuneConfig, config_to_yaml
from seektune.errors import UserError
from seektune.rundir import atomic_write_json, atomic_write_text

# What the launch form offers: the stage's name -> the CLI's arguments before the config file.
COMMANDS: dict[str, list[str]] = {
    "data": ["data", "prepare"],
    "train": ["train"],
    "tune": ["tune"],
    "eval": ["eval"],
    "run": ["run"],
}
STOP_GRACE_S = 15.0
LOG_TAIL_BYTES = 64_000


def default_jobs_dir() -> Path:
    from platformdirs import user_data_path

    return user_data_path("seektune", appauthor=False) / "ui-jobs"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    command: str  # a key of COMMANDS
    argv: list[str]
    command_line: str  # as a user would type it
    name: str  # the run name of its config
    output_dir: str  # absolute
    created_at: str
    pid: int | None = None
    state: str = "running"  # running, completed, failed, stopped
    exit_code: int | None = None
    ended_at: str | None = None
    run_dir: str | None = None
    stop_requested: bool = False


class JobRunner:
    """Starts, watches and stops jobs; their records live in `jobs_dir`."""

    def __init__(self, jobs_dir: Path, max_jobs: int = 2) -> None:
        self.jobs_dir = jobs_dir
        self.max_jobs = max_jobs
        self.program = [sys.executable, "-m", "seektune.cli"]  # what `seektune` is (tests swap it)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- records ------------------------------------------------------------------------------------------

    def _folder(self, job_id: str) -> Path:
        if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
            raise UserError(f"{job_id!r} is not a job id")
        return self.jobs_dir / job_id

    def _save(self, job: Job) -> None:
        atomic_write_json(self._folder(job.id) / "job.json", asdict(job))

    def get(self, job_id: str) -> Job:
        """The job's record, brought up to date (ended? its run directory?); UserError when unknown."""
        path = self._folder(job_id) / "job.json"
        try:
            job = Job(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            raise UserError(f"there is no job {job_id!r} (its folder {path.parent} is gone?)") from None
        return self._refresh(job)

    def list(self) -> list[Job]:
        """Every job, newest first."""
        if not self.jobs_dir.is_dir():
            return []
        jobs = []
        for folder in self.jobs_dir.iterdir():
            if (folder / "job.json").is_file():
                try:
                    jobs.append(self.get(folder.name))
                except UserError:
                    continue
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def log_tail(self, job_id: str, max_bytes: int = LOG_TAIL_BYTES) -> str:
        path = self._folder(job_id) / "output.log"
        try:
            with path.open("rb") as handle:
                size = path.stat().st_size
                handle.seek(max(0, size - max_bytes))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return text if size <= max_bytes else "…" + text.split("\n", 1)[-1]

    # -- start and stop ---------------------------------------------------------------------------------

    def start(self, command: str, cfg: SeektuneConfig) -> Job:
        """Write `cfg` to a new job folder and run `seektune <command>` on it."""
        if command not in COMMANDS:
            raise UserError(
                f"{command!r} is not a command the dashboard runs: pick one of {', '.join(COMMANDS)}"
            )
        running = [j for j in self.list() if j.state == "running"]
        if len(running) >= self.max_jobs:
            raise UserError(
                f"{len(running)} jobs are running (ui.max_jobs is {self.max_jobs}): stop one or wait for it"
            )
        output_dir = cfg.output_dir if cfg.output_dir.is_absolute() else Path.cwd() / cfg.output_dir
        cfg = cfg.model_copy(update={"output_dir": output_dir})
        job_id = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder = self._folder(job_id)
        folder.mkdir(parents=True)
        config_file = folder / "config.yaml"
        atomic_write_text(config_file, config_to_yaml(cfg))
        arguments = [*COMMANDS[command], str(config_file)]
        job = Job(
            job_id,
            command,
            [*self.program, *arguments],
            " ".join(["seektune", *arguments]),
            cfg.name,
            str(output_dir),
            _now(),
        )
        with self._lock, (folder / "output.log").open("wb") as log:
            proc = subprocess.Popen(
                job.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a stop reaches its workers too
                env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "120"},
            )
            self._procs[job_id] = proc
            job.pid = proc.pid
            self._save(job)
        return job

    def stop(self, job_id: str) -> Job:
        """SIGTERM to the job's process group, SIGKILL after STOP_GRACE_S; a no-op for an ended job."""
        job = self.get(job_id)
        if job.state != "running" or job.pid is None:
            return job
        job.stop_requested = True
        self._save(job)
        _signal_group(job.pid, signal.SIGTERM)
        threading.Thread(target=self._kill_later, args=(job.id, job.pid), daemon=True).start()
        return job

    def _kill_later(self, job_id: str, pid: int) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if not self._alive(job_id, pid):
                return
            time.sleep(0.2)
        _signal_group(pid, signal.SIGKILL)

    # -- state ----------------------------------------------------------------------------------------

    def _alive(self, job_id: str, pid: int) -> bool:
        proc = self._procs.get(job_id)
        if proc is not None:
            return proc.poll() is None
        try:  # started by an earlier dashboard process: not our child, so look at the pid
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _refresh(self, job: Job) -> Job:
        if job.state != "running":
            return job
        changed = False
        if job.run_dir is None:
            job.run_dir = self._find_run_dir(job)
            changed = job.run_dir is not None
        if job.pid is not None and not self._alive(job.id, job.pid):
            proc = self._procs.pop(job.id, None)
            job.exit_code = proc.returncode if proc is not None else None
            job.ended_at = _now()
            job.run_dir = self._printed_run_dir(job) or job.run_dir
            if job.stop_requested:
                job.state = "stopped"
            elif job.exit_code == 0 or (job.exit_code is None and self._run_completed(job)):
                job.state = "completed"
            else:
                job.state = "failed"
            changed = True
        if changed:
            self._save(job)
        return job

    def _printed_run_dir(self, job: Job) -> str | None:
        """The CLI's last line `run directory: PATH`."""
        for line in reversed(self.log_tail(job.id, 8_000).splitlines()):
            if line.startswith("run directory: "):
                return line.removeprefix("run directory: ").strip()
        return None

    def _find_run_dir(self, job: Job) -> str | None:
        """While it runs: the run directory of the job's name created since the job started."""
        output_dir = Path(job.output_dir)
        if not output_dir.is_dir():
            return None
        started = datetime.fromisoformat(job.created_at).timestamp() - 1
        found = [
            p
            for p in output_dir.glob(f"{job.name}-*")
            if (p / "status.json").is_file() and p.stat().st_ctime >= started
        ]
        return str(max(found, key=lambda p: p.stat().st_ctime)) if found else None

    def _run_completed(self, job: Job) -> bool:
        if job.run_dir is None:
            return False
        try:
            status = json.loads((Path(job.run_dir) / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return status.get("state") == "completed"


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def job_view(job: Job) -> dict[str, Any]:
    """A job as the pages and the JSON API show it."""
    view = asdict(job)
    view["run_id"] = Path(job.run_dir).name if job.run_dir else None
    return view
