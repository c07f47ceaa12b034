"""Short fine-tuning inside a compression step (pruning's recovery, distillation, QAT) with the run's
training engine, so precision, accumulation, logging and the health checks are the same as in training.

The step's sub-run lives in a folder of its own (`RunDir.create_at`); it neither checkpoints nor
evaluates (the chain's own check does that) and leaves the trained model in memory for the step to save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seektune.config import TrainConfig
from seektune.data.prepare import PreparedData
from seektune.rundir import RunDir
from seektune.train.trainer import TrainResult, train

NEVER = 10**9  # a checkpoint interval no short fine-tuning reaches


def short_finetune(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    train_cfg: TrainConfig,
    work_dir: Path,
    seed: int,
    steps: int,
    learning_rate: float,
    batch_size: int | None = None,
    trainer_class: type | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train `model` in place for `steps` optimiser steps on the training split of `data`.

    The run's `train` section gives precision, accumulation and the optimizer; steps, learning rate and
    (optionally) batch size are the step's own. Nothing is saved.
    """
    cfg = train_cfg.model_copy(
        update={
            "max_steps": steps,
            "learning_rate": learning_rate,
            "batch_size": batch_size or train_cfg.batch_size,
            "logging_steps": max(1, min(train_cfg.logging_steps, steps)),
            "eval_steps": None,
            "save_steps": NEVER,
            "keep_best": False,
            "early_stopping_patience": None,
            "task_metric": None,
            "best_metric": "eval_loss",
            "resume": "never",
            "report_to": [],
        }
    )
    train_only = PreparedData(
        records=data.records, tokenized={**data.tokenized, "validation": []}, report=data.report
    )
    return train(
        cfg,
        model,
        tokenizer,
        train_only,
        RunDir.create_at(Path(work_dir)),
        seed,
        callbacks=callbacks,
        save=False,
        trainer_class=trainer_class,
        trainer_kwargs=trainer_kwargs,
    )
