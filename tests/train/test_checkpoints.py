"""Complete-or-ignored checkpoints, rotation after marking, finding and checking what to resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tinymodels import deepseek_v3, domain_split

from seektune.config import TrainConfig, validate_config
from seektune.errors import UserError
from seektune.rundir import RunDir
from seektune.train.checkpoints import (
    MARKER,
    check_identity,
    checkpoint_identity,
    complete_checkpoints,
    find_resume_checkpoint,
    mark_complete,
    rotate,
)
from seektune.train.loop import SeektuneTrainer
from seektune.train.trainer import train
from support import tiny_run_config

IDENTITY = {
    "model": "m",
    "base_recipe": None,
    "method": "lora",
    "method_settings": {"r": 8},
    "data_fingerprint": "abc",
}


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.pt").write_bytes(b"x")
    if complete:
        mark_complete(path, step, IDENTITY)
    return path


def _run(output: Path, stamp: str, state: str, name: str = "t") -> Path:
    run = output / f"{name}-{stamp}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": state}))
    return run


def test_a_checkpoint_without_its_marker_is_not_complete(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, complete=False)  # killed while saving
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint name: never touched
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / MARKER).read_text())["step"] == 2


def test_rotation_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 10, complete=False)
    rotate(tmp_path, keep=2, protect=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",  # incomplete ones are not rotation's business
        "checkpoint-2",
        "checkpoint-8",
    ]


def test_resume_finds_the_newest_unfinished_run_and_skips_completed_ones(tmp_path):
    old = _run(tmp_path, "20260101-000000", "failed")
    _checkpoint(old / "checkpoints", 2)
    killed = _run(tmp_path, "20260102-000000", "running")
    _checkpoint(killed / "checkpoints", 2)
    _checkpoint(killed / "checkpoints", 4)
    _checkpoint(killed / "checkpoints", 6, complete=False)
    done = _run(tmp_path, "20260103-000000", "completed")
    _checkpoint(done / "checkpoints", 8)
    other = _run(tmp_path, "20260104-000000", "failed", name="t-other")
    _checkpoint(other / "checkpoints", 8)
    assert find_resume_checkpoint(tmp_path, "t") == killed / "checkpoints" / "checkpoint-4"
    assert find_resume_checkpoint(tmp_path, "nobody") is None
    assert find_resume_checkpoint(tmp_path / "missing", "t") is None


def test_identity_records_model_method_settings_and_data(tmp_path):
    cfg = validate_config(tiny_run_config(tmp_path, tmp_path, method={"name": "dora", "lora": {"r": 4}}))
    identity = checkpoint_identity(cfg, "f00")
    assert identity["model"] == "tiny-deepseek-v3" and identity["method"] == "dora"
    assert identity["method_settings"]["r"] == 4  # dora's settings live in method.lora
    assert identity["base_recipe"]["hidden_size"] == cfg.model.base.hidden_size
    assert identity["data_fingerprint"] == "f00"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": "other"}, "trained with model 'm', the config has 'other'"),
        ({"method": "full"}, "trained with method 'lora', the config has 'full'"),
        ({"method_settings": {"r": 16}}, "r: 8 -> 16"),
        ({"data_fingerprint": "new"}, "pass --resume-new-data"),
    ],
)
def test_a_checkpoint_of_another_model_method_or_data_is_refused(tmp_path, change, fragment):
    checkpoint = _checkpoint(tmp_path, 2)
    with pytest.raises(UserError, match="cannot resume from") as error:
        check_identity(checkpoint, {**IDENTITY, **change}, allow_new_data=False)
    assert fragment in str(error.value)


def test_changed_data_is_accepted_when_asked_and_unknown_data_is_not_checked(tmp_path):
    checkpoint = _checkpoint(tmp_path, 2)
    assert check_identity(checkpoint, {**IDENTITY, "data_fingerprint": "new"}, allow_new_data=True)
    assert not check_identity(checkpoint, IDENTITY, allow_new_data=False)
    assert not check_identity(checkpoint, {**IDENTITY, "data_fingerprint": None}, allow_new_data=False)


def test_full_fine_tuning_checkpoints_restore_the_fused_experts(tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, TrainingArguments

    data = SimpleNamespace(
        tokenized={"train": domain_split({"easy": 8, "hard": 8}), "validation": []},
        report={"train_tokens": 100, "splits": {"train": 16}},
    )
    cfg = TrainConfig(
        learning_rate=0.05, batch_size=4, max_steps=2, save_steps=2, precision="fp32", report_to=[]
    )
    run = RunDir.create(tmp_path, "t")
    model = deepseek_v3()
    train(cfg, model, tokenizer, data, run, seed=0)
    trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    experts = [name for name in trained if ".mlp.experts." in name]
    fresh = deepseek_v3()
    assert experts and not torch.equal(fresh.state_dict()[experts[0]], trained[experts[0]])

    trainer = SeektuneTrainer(
        model=fresh,
        args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to="none"),
        checkpoint_identity={},
    )
    trainer._load_from_checkpoint(str(run.checkpoints_dir / "checkpoint-2"))  # what resume does
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    with safe_open(run.path / "model" / "model.safetensors", "pt") as saved:  # the final model: hub layout
        assert any(".mlp.experts.0." in key for key in saved.keys())  # noqa: SIM118 (not a dict)
    reloaded = AutoModelForCausalLM.from_pretrained(run.path / "model")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
