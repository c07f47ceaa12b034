"""Resuming training: after SIGKILL, after a crash during a save, and onto changed data."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import Trainer

from seektune.cli import main
from seektune.config import validate_config
from seektune.pipeline import TrainOptions, run_train_stage
from seektune.train.checkpoints import MARKER, checkpoint_identity
from support import tiny_run_config

TRAIN = {
    "max_steps": 8,
    "save_steps": 2,
    "eval_steps": 2,
    "logging_steps": 1,
    "batch_size": 8,
    "report_to": [],
}


def _config(tmp_path: Path, base_cache: Path, train: dict | None = None) -> dict:
    return tiny_run_config(tmp_path, base_cache, train=train or TRAIN, eval={"enabled": False})


def _outcome(run: Path) -> tuple[list[dict], dict]:
    history = json.loads((run / "train" / "history.json").read_text())
    return history, load_file(run / "model" / "adapter_model.safetensors")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_run_killed_and_resumed_ends_like_an_uninterrupted_one(tmp_path, base_cache):
    # 32 examples in batches of 8: 4 steps an epoch, so the kill after step 6 lands in the second epoch,
    # whose example order the resumed run must draw as the uninterrupted one did.
    def config(folder: str) -> dict:
        raw = _config(tmp_path / folder, base_cache)
        raw["data"]["max_train_samples"] = 32
        return raw

    whole = run_train_stage(validate_config(config("whole")))

    raw = config("killed")
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(raw))
    process = subprocess.Popen(
        [sys.executable, "-m", "seektune.cli", "train", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs = Path(raw["output_dir"])
    deadline = time.monotonic() + 300
    while not list(runs.glob(f"*/checkpoints/checkpoint-6/{MARKER}")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint 6"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (killed,) = runs.iterdir()
    assert json.loads((killed / "status.json").read_text())["state"] == "running"  # killed, not finished
    before = _tree_digest(killed)

    resumed = run_train_stage(validate_config(raw), TrainOptions(resume=True))

    assert resumed.path != killed and _tree_digest(killed) == before  # the killed run is left as it was
    status = json.loads(resumed.status_path.read_text())
    assert status["state"] == "completed"
    metrics = json.loads(resumed.metrics_path.read_text())
    assert metrics["train"]["steps"] == 8
    (whole_history, whole_weights), (resumed_history, resumed_weights) = (
        _outcome(whole.path),
        _outcome(resumed.path),
    )
    whole_losses = [row["loss"] for row in whole_history if "loss" in row]
    resumed_losses = [row["loss"] for row in resumed_history if "loss" in row]
    assert len(resumed_losses) == len(whole_losses) == 8  # the history carries over from the checkpoint
    assert resumed_losses == pytest.approx(whole_losses, abs=1e-5)
    assert metrics["train"]["eval_loss"] == pytest.approx(
        json.loads(whole.metrics_path.read_text())["train"]["eval_loss"], abs=1e-5
    )
    for name, tensor in whole_weights.items():
        assert (resumed_weights[name] - tensor).abs().max() < 1e-5, name


@pytest.fixture
def crashed_run(tmp_path, base_cache, monkeypatch):
    """A run that crashed while saving its step-4 checkpoint, with save_total_limit 1."""
    raw = _config(tmp_path, base_cache, {**TRAIN, "save_total_limit": 1, "keep_best": False})
    original = Trainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full")
        original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        run_train_stage(validate_config(raw))
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    (run,) = Path(raw["output_dir"]).iterdir()
    return raw, run


def test_a_crash_during_a_save_keeps_the_last_complete_checkpoint(crashed_run, tmp_path):
    raw, run = crashed_run
    checkpoints = run / "checkpoints"
    assert (checkpoints / "checkpoint-2" / MARKER).is_file()  # not rotated away by the unfinished save
    assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / MARKER).exists()

    resumed = run_train_stage(validate_config(raw), TrainOptions(resume=True))
    metrics = json.loads(resumed.metrics_path.read_text())
    assert metrics["train"]["resumed_from"] == str(checkpoints / "checkpoint-2")
    assert metrics["train"]["steps"] == 8
    history = json.loads((resumed.path / "train" / "history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 9))


@pytest.mark.slow
def test_changed_data_is_refused_unless_new_data_is_asked_for(crashed_run, tmp_path, capsys):
    raw, run = crashed_run
    before = _tree_digest(run)
    raw["data"] = {**raw["data"], "max_train_samples": 48}
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", str(config), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "the prepared data changed since it was saved" in error and "--resume-new-data" in error
    assert _tree_digest(run) == before

    resumed = run_train_stage(validate_config(raw), TrainOptions(resume_new_data=True))
    history = json.loads((resumed.path / "train" / "history.json").read_text())
    steps = [row["step"] for row in history if "loss" in row]
    assert steps == list(range(1, 9))  # the new data and its schedule start from step 1
    fresh = run_train_stage(validate_config({**raw, "output_dir": str(tmp_path / "fresh")}))
    fresh_history = json.loads((fresh.path / "train" / "history.json").read_text())
    # The kept weights start lower than the base does on the same data.
    assert history[0]["loss"] < fresh_history[0]["loss"] - 0.05
    assert _tree_digest(run) == before


def test_resume_with_nothing_to_resume_or_another_method_exits_2(tmp_path, base_cache, capsys):
    raw = _config(tmp_path, base_cache)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not Path(raw["output_dir"]).exists() or not any(Path(raw["output_dir"]).iterdir())

    run = Path(raw["output_dir"]) / "t-20260101-000000"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    marker = {**checkpoint_identity(validate_config(raw), None), "method": "full", "step": 2}
    (checkpoint / MARKER).write_text(json.dumps(marker))
    assert main(["train", str(config), "--resume"]) == 2
    assert "trained with method 'full', the config has 'lora'" in capsys.readouterr().err
    assert [p.name for p in Path(raw["output_dir"]).iterdir()] == [run.name]  # no new run was started
