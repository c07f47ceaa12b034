"""Training arguments from the `train` section: checkpoints for keeping the best, optimizers, health."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from seektune.config import TrainConfig
from seektune.errors import UserError
from seektune.train.callbacks import TrainingHealthCallback
from seektune.train.trainer import _early_stopping, _evaluation_and_saving, optimizer_name


def test_keeping_the_best_checkpoints_at_every_evaluation():
    cfg = TrainConfig(eval_steps=40)
    assert _evaluation_and_saving(cfg, has_validation=True, keep_best=True) == {
        "eval_strategy": "steps", "eval_steps": 40, "save_strategy": "steps", "save_steps": 40,
    }  # fmt: skip
    per_epoch = _evaluation_and_saving(TrainConfig(), has_validation=True, keep_best=True)
    assert per_epoch["eval_strategy"] == per_epoch["save_strategy"] == "epoch"
    assert _evaluation_and_saving(TrainConfig(save_steps=80, eval_steps=40), True, True)["save_steps"] == 80
    with pytest.raises(
        UserError, match=r"train.save_steps \(30\) must be a multiple of train.eval_steps \(40\)"
    ):
        _evaluation_and_saving(TrainConfig(save_steps=30, eval_steps=40), True, True)
    assert _evaluation_and_saving(cfg, has_validation=False, keep_best=False)["eval_strategy"] == "no"


def test_optimizers_and_early_stopping_need_what_they_use():
    assert optimizer_name("adamw", torch.device("cpu")) == "adamw_torch"
    with pytest.raises(UserError, match="adamw_8bit runs on a CUDA GPU"):
        optimizer_name("adamw_8bit", torch.device("cpu"))
    with pytest.raises(UserError, match="no validation split"):
        _early_stopping(TrainConfig(early_stopping_patience=2), eval_set=None)
    assert len(_early_stopping(TrainConfig(early_stopping_patience=2), eval_set=[1])) == 1


def _log(callback, step, **logs):
    control = TrainerControl()
    callback.on_log(None, SimpleNamespace(global_step=step), control, logs=logs)
    return control


def test_a_nan_loss_stops_training_at_its_step():
    health = TrainingHealthCallback()
    assert not _log(health, 5, loss=2.0, grad_norm=1.0).should_training_stop
    control = _log(health, 10, loss=math.nan, grad_norm=1.0)
    assert control.should_training_stop and health.stopped_at == 10


def test_a_gradient_norm_spike_is_logged_with_its_step(caplog):
    health = TrainingHealthCallback(spike=10)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 6):
            _log(health, step, loss=1.0, grad_norm=1.0 + step / 100)
        assert not caplog.records
        _log(health, 6, loss=1.0, grad_norm=50.0)
    assert "gradient norm spike at step 6" in caplog.text
