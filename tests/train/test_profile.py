"""`seektune train --profile`: a few steps under torch.profiler, split into phases, nothing saved."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from tinymodels import domain_split, llama

from seektune.cli import main
from seektune.config import TrainConfig
from seektune.rundir import RunDir
from seektune.train.profile import ACTIVE, PROFILE_STEPS
from seektune.train.trainer import train
from support import tiny_run_config


def test_profile_splits_a_step_into_phases_and_saves_nothing_else(tokenizer, tmp_path):
    data = SimpleNamespace(
        tokenized={
            "train": domain_split({"easy": 16, "hard": 16}),
            "validation": domain_split({"easy": 2}, 1),
        },
        report={"train_tokens": 200, "splits": {"train": 32}},
    )
    cfg = TrainConfig(batch_size=4, max_steps=100, save_steps=1, eval_steps=1, precision="fp32")
    run = RunDir.create(tmp_path, "t")
    result = train(cfg, llama(), tokenizer, data, run, seed=0, profile=True)

    assert result.steps == PROFILE_STEPS  # not the configured 100
    summary = result.profile
    assert summary["steps"] == ACTIVE and summary["step_ms"] > 0
    phases = summary["phases"]
    assert set(phases) == {"data loading", "forward", "backward", "optimizer", "communication", "other"}
    for phase in ("data loading", "forward", "backward", "optimizer"):
        assert phases[phase]["ms_per_step"] > 0, phase
    assert phases["communication"]["ms_per_step"] == 0  # one process
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0, abs=0.02)
    assert phases["forward"]["share"] + phases["backward"]["share"] > 0.3
    names = [op["name"] for op in summary["operators"]]
    assert any(name.startswith("aten::") for name in names)
    assert not any(name.startswith(("ProfilerStep", "seektune::")) for name in names)
    assert (run.path / "profile" / "trace.json").stat().st_size > 0
    assert not (run.path / "model").exists() and not any(run.checkpoints_dir.iterdir())


def test_profile_command_prints_where_the_time_goes(tmp_path, base_cache, capsys):
    raw = tiny_run_config(tmp_path, base_cache, eval={"enabled": False})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--profile"]) == 0
    out = capsys.readouterr().out
    assert "Where a training step's time goes" in out and "Top operators" in out
    assert "backward" in out and "aten::" in out
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["profile"]["phases"]["forward"]["ms_per_step"] > 0
    assert "train" not in metrics and not (run / "model").exists()
