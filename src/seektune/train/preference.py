"""Preference tuning (train.objective dpo, kto or orpo) on TRL's trainers, with the run's training engine.

The losses, the reference model and the pair tokenisation are TRL's (`DPOTrainer`, `KTOTrainer`, and
`ORPOTrainer` from `trl.experimental`). seektune's part is the mapping from the `train` section to the
trainer's config (the same `TrainingArguments` as supervised training: fp32 and no gradient checkpointing
on a CPU, the schedule, checkpointing and evaluation, precision), the data (the data stage's preference
records, cleaned, masked, deduplicated and split like any other, as TRL's conversational
prompt/chosen/rejected rows), complete-or-ignored checkpoints (`SeektuneTrainer`'s hooks, mixed into TRL's
class), the reward accuracy on the test pairs, and saving the result like `seektune.train.trainer`.

The reference model: LoRA/DoRA train against a frozen copy of the adapter TRL makes itself (so a run that
continues from a trained adapter keeps that adapter as its reference; a fresh adapter equals the base); the
other methods against a frozen copy of the starting weights, or with `train.preference.precompute_ref`
against log-probabilities computed once before training, so that no second model stays in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

from seektune.config import PreferenceConfig, TrainConfig
from seektune.errors import UserError
from seektune.logs import ProgressCallback, log_event
from seektune.models.methods import adding_lora_adapters
from seektune.rundir import RunDir
from seektune.train.loop import SeektuneTrainer
from seektune.train.trainer import (
    TrainResult,
    _early_stopping,
    _history,
    _reporting_callbacks,
    _save_final,
    training_arguments,
)

logger = logging.getLogger(__name__)

OBJECTIVES = ("dpo", "kto", "orpo")
# What TRL logs for preference objectives, kept in the run's history beside the loss.
PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def preference_rows(records: Any, split: str, objective: str) -> Any:
    """The preference records of a split as TRL's conversational rows (None when the split is empty).

    Every record must be a pair: a conversation whose last turn is the chosen answer, with a rejected one.
    """
    from datasets import Dataset

    if records is None or len(records) == 0:
        return None
    rows = records.select_columns(["messages", "rejected"]).to_list()
    unpaired = sum(1 for row in rows if not row["rejected"])
    if unpaired:
        raise UserError(
            f"train.objective {objective} trains on preference pairs, but {unpaired} of {len(rows)} {split} "
            "records have no rejected answer: give rows with prompt, chosen and rejected (TRL's "
            "preference form; `seektune data from-feedback` writes preference.jsonl), or set "
            "train.objective: sft"
        )
    return Dataset.from_list(
        [
            {
                "prompt": row["messages"][:-1],
                "chosen": [row["messages"][-1]],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    )


def _trainer_classes(objective: str) -> tuple[type, type]:
    """(config class, trainer class) of an objective, TRL's trainer with seektune's checkpoint hooks."""
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        config, base = DPOConfig, DPOTrainer
    elif objective == "kto":
        from trl import KTOConfig, KTOTrainer

        config, base = KTOConfig, KTOTrainer
    else:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config, base = ORPOConfig, ORPOTrainer
    trainer = type(f"Seektune{base.__name__}", (SeektuneTrainer, base), {})
    return config, trainer


def _objective_settings(objective: str, cfg: PreferenceConfig, max_length: int) -> dict[str, Any]:
    settings: dict[str, Any] = {"beta": cfg.beta, "max_length": max_length}
    if objective == "dpo":
        settings.update(
            loss_type=[cfg.loss_type],
            label_smoothing=cfg.label_smoothing,
            precompute_ref_log_probs=cfg.precompute_ref,
        )
    elif objective == "kto":
        settings.update(
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            precompute_ref_log_probs=cfg.precompute_ref,
        )
    return settings


def preference_arguments(args: Any, config_class: type, cfg: TrainConfig, max_length: int) -> Any:
    """The TRL config of `objective`: every field of the run's `TrainingArguments`, then TRL's own."""
    from transformers import TrainingArguments

    shared = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and f.name not in ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    }
    shared["warmup_steps"] = cfg.warmup_ratio
    shared["gradient_checkpointing"] = cfg.gradient_checkpointing  # TRL's default is on: 7x slower on CPUs
    shared["activation_checkpointing"] = cfg.gradient_checkpointing
    if cfg.objective == "kto":  # its KL term pairs each example with its neighbours in a fixed-order batch
        shared["train_sampling_strategy"] = "sequential"
    return config_class(**shared, **_objective_settings(cfg.objective, cfg.preference, max_length))


def train_preference(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    data: Any,
    run: RunDir,
    seed: int,
    max_length: int,
    checkpoint_identity: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    save: bool = True,
) -> TrainResult:
    """Tune `model` on the preference pairs of the prepared data with `cfg.objective`; save to `<run>/model`.

    The validation pairs are evaluated as the schedule says (loss, reward accuracy and margin); the test
    pairs once at the end (`TrainResult.task_metric` holds `test_rewards/accuracies` and the margin).
    """
    from seektune.train.callbacks import TrainingHealthCallback

    objective = cfg.objective
    train_set = preference_rows(data.records["train"], "training", objective)
    if train_set is None:
        raise UserError(f"train.objective {objective}: the training split has no preference pairs")
    eval_set = preference_rows(data.records.get("validation"), "validation", objective)
    test_set = preference_rows(data.records.get("test"), "test", objective)
    device = next(model.parameters()).device
    args = training_arguments(cfg, run, seed, device, eval_set is not None)
    config_class, trainer_class = _trainer_classes(objective)
    trl_args = preference_arguments(args, config_class, cfg, max_length)
    progress, health = ProgressCallback(), TrainingHealthCallback(cfg.max_grad_norm_spike)
    extra = {} if objective == "orpo" else {"ref_model": _reference_model(model, cfg.preference)}
    with adding_lora_adapters():  # TRL adds the reference adapter of a LoRA model in its __init__
        trainer = _build_trainer(
            trainer_class,
            model=model,
            args=trl_args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            callbacks=[
                progress,
                health,
                *_reporting_callbacks(cfg, run),
                *_early_stopping(cfg, eval_set),
                *(callbacks or []),
            ],
            checkpoint_identity=checkpoint_identity or {},
            **extra,
        )
    log_event(logger, "preference tuning", objective=objective, pairs=len(train_set), beta=trl_args.beta)
    started = time.perf_counter()
    try:
        output = trainer.train()
    finally:
        progress.close()
    if health.stopped_at is not None:
        raise UserError(
            f"preference tuning stopped at step {health.stopped_at}: the loss became {health.bad_loss}; "
            "lower train.learning_rate or raise train.preference.beta"
        )
    result = TrainResult(
        model_dir=run.path / "model",
        history=_history(trainer.state.log_history, None, PREFERENCE_KEYS),
        train_loss=round(output.training_loss, 4),
        runtime_s=time.perf_counter() - started,
        steps=output.global_step,
    )
    if eval_set is not None:
        result.eval_loss = round(trainer.evaluate()["eval_loss"], 4)
    if test_set is not None:
        scores = trainer.evaluate(_as_trainer_rows(trainer, test_set, tokenizer), metric_key_prefix="test")
        for key in ("rewards/accuracies", "rewards/margins"):  # TRL names its own metrics eval_* here too
            value = scores.get(f"test_{key}", scores.get(f"eval_{key}"))
            if value is not None:
                result.task_metric[f"test_{key}"] = round(float(value), 4)
    _drop_reference_adapter(trainer.model)
    if save:
        _save_final(trainer, tokenizer, run)
    log_event(logger, "preference tuning finished", **result.summary())
    return result


def _reference_model(model: Any, cfg: PreferenceConfig) -> Any:
    """A frozen copy of the starting weights for DPO/KTO (None: TRL's own reference, see the docstring)."""
    import peft

    if isinstance(model, peft.PeftModel) or cfg.precompute_ref:
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _drop_reference_adapter(model: Any) -> None:
    """TRL keeps a LoRA run's reference as a second adapter, 'ref'; the saved model is the trained one."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and "ref" in peft_config:
        model.delete_adapter("ref")


def _as_trainer_rows(trainer: Any, rows: Any, tokenizer: Any) -> Any:
    """Rows for `evaluate`: DPO and KTO tokenise what they are given, ORPO only its __init__'s datasets."""
    if not hasattr(trainer, "tokenize_row"):
        return rows
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    rows = rows.map(maybe_extract_prompt)
    rows = rows.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer})
    return rows.map(trainer.tokenize_row)


def _build_trainer(trainer_class: type, **kwargs: Any) -> Any:
    """The trainer without transformers' printer (`ProgressCallback` shows the loss)."""
    from transformers import PrinterCallback

    trainer = trainer_class(**kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_by_objective(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    data: Any,
    run: RunDir,
    checkpoint_identity: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    **sft_options: Any,
) -> TrainResult:
    """`train.objective` sft (`seektune.train.trainer.train`, with `sft_options`: resume, profile, domain
    weights) or a preference objective (`train_preference`) of a whole config `cfg`."""
    if cfg.train.objective == "sft":
        from seektune.train.trainer import train

        return train(
            cfg.train,
            model,
            tokenizer,
            data,
            run,
            cfg.seed,
            checkpoint_identity=checkpoint_identity,
            callbacks=callbacks,
            eval_cfg=cfg.eval,
            system_prompt=cfg.data.system_prompt,
            **sft_options,
        )
    if sft_options.get("profile"):
        raise UserError("seektune train --profile profiles supervised training: set train.objective: sft")
    return train_preference(
        cfg.train,
        model,
        tokenizer,
        data,
        run,
        cfg.seed,
        cfg.data.max_length,
        checkpoint_identity=checkpoint_identity,
        callbacks=callbacks,
    )
