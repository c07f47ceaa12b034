"""The training stage on transformers' `Trainer`.

seektune's part is the mapping from the `train` config section to `TrainingArguments` (with the choices
that are right on this hardware: fp32 and no gradient checkpointing on a CPU, bf16 where the GPU has it),
the choice of collator (padded examples, or packed rows: `seektune.train.collate`), the optional
re-weighting of domains from their validation loss (`seektune.train.callbacks`), the record of the loss
history for the report, and saving the final artefact (adapter or full model, with the tokenizer) into the
run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seektune.config import TrainConfig
from seektune.errors import UserError
from seektune.logs import ProgressCallback, log_event
from seektune.rundir import RunDir

if TYPE_CHECKING:
    from seektune.data.mix import DomainWeights
    from seektune.data.prepare import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What the training stage produced."""

    model_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None
    eval_loss: float | None = None
    runtime_s: float = 0.0
    tokens_per_s: float | None = None
    steps: int = 0
    domain_shares: list[dict[str, Any]] = field(default_factory=list)

    def scores(self) -> dict[str, Any]:
        """What the same config and seed reproduce exactly."""
        return {"train_loss": self.train_loss, "eval_loss": self.eval_loss, "steps": self.steps}

    def timing(self) -> dict[str, Any]:
        """What depends on the machine and its load."""
        return {"train_runtime_s": round(self.runtime_s, 2), "train_tokens_per_s": self.tokens_per_s}

    def summary(self) -> dict[str, Any]:
        """Everything, for the report."""
        return {
            **self.scores(),
            "runtime_s": round(self.runtime_s, 2),
            "tokens_per_s": self.tokens_per_s,
            "model_dir": str(self.model_dir),
            "domain_shares": self.domain_shares,
        }


def precision_flags(precision: str, device: torch.device) -> dict[str, bool]:
    """`bf16`/`fp16` mixed-precision flags for TrainingArguments.

    'auto' is bf16 on a GPU that has it, fp16 mixed precision (fp32 master weights) on older GPUs, and fp32
    on a CPU, where bf16 matmuls are about 100x slower than fp32 on common CPUs.
    """
    if precision == "auto":
        if device.type != "cuda":
            return {"bf16": False, "fp16": False}
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    if precision == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU: use fp32 (or auto) on a CPU")
    if precision == "bf16" and device.type == "cpu":
        logger.warning(
            "train.precision=bf16 on a CPU: most CPUs have no fast bf16 path; fp32 is faster there"
        )
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "adafactor": "adafactor", "sgd": "sgd"}


def optimizer_name(optimizer: str, device: torch.device) -> str:
    """transformers' `optim` name of `train.optimizer`; 8-bit AdamW needs bitsandbytes on a CUDA GPU."""
    if optimizer == "adamw_8bit" and device.type != "cuda":
        raise UserError("train.optimizer adamw_8bit runs on a CUDA GPU (bitsandbytes): use adamw on a CPU")
    return _OPTIMIZERS[optimizer]


def _evaluation_and_saving(cfg: TrainConfig, has_validation: bool, keep_best: bool) -> dict[str, Any]:
    """When to evaluate and when to checkpoint; keeping the best checkpoint saves at every evaluation."""
    eval_strategy = ("epoch" if cfg.eval_steps is None else "steps") if has_validation else "no"
    save_strategy = "epoch" if cfg.save_steps is None else "steps"
    save_steps = cfg.save_steps
    if keep_best:
        if cfg.save_steps is None:
            save_strategy, save_steps = eval_strategy, cfg.eval_steps
        elif cfg.eval_steps is None or cfg.save_steps % cfg.eval_steps:
            raise UserError(
                f"train.keep_best (and early stopping) pick a checkpoint by its validation loss, so "
                f"train.save_steps ({cfg.save_steps}) must be a multiple of train.eval_steps "
                f"({cfg.eval_steps}): set both, leave save_steps unset, or set keep_best: false"
            )
    return {
        "eval_strategy": eval_strategy,
        "eval_steps": cfg.eval_steps,
        "save_strategy": save_strategy,
        "save_steps": save_steps or 500,
    }


def training_arguments(
    cfg: TrainConfig,
    run: RunDir,
    seed: int,
    device: torch.device,
    has_validation: bool,
    packed: bool = False,
):
    """The `TrainingArguments` of one run, from the `train` section.

    Unpacked examples are batched by similar length (`group_by_length`, lengths from the `length` column);
    packed rows are nearly all of one length, so they are drawn at random.
    """
    from transformers import TrainingArguments

    keep_best = has_validation and (cfg.keep_best or cfg.early_stopping_patience is not None)
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        lr_scheduler_kwargs={"num_cycles": cfg.lr_cycles}
        if cfg.lr_scheduler == "cosine_with_restarts"
        else {},
        optim=optimizer_name(cfg.optimizer, device),
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        **_evaluation_and_saving(cfg, has_validation, keep_best),
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        seed=seed,
        data_seed=seed,
        use_cpu=device.type == "cpu",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="random" if packed else "group_by_length",
        dataloader_num_workers=0,
        **precision_flags(cfg.precision, device),
    )


def _dataset(split: Any):
    """A split as a `datasets.Dataset` (None when empty); lists of rows are still accepted."""
    from datasets import Dataset

    if split is None or len(split) == 0:
        return None
    return split if isinstance(split, Dataset) else Dataset.from_list(split)


def train(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    run: RunDir,
    seed: int,
    domain_weights: DomainWeights | None = None,
) -> TrainResult:
    """Fine-tune `model` on the prepared training split; save the result to `<run>/model`.

    With `domain_weights`, training examples are drawn by domain (`source` column) at the current shares,
    which are updated from the per-domain validation loss after every evaluation.
    """
    from transformers import PrinterCallback

    from seektune.train.callbacks import DomainSampledTrainer, TrainingHealthCallback
    from seektune.train.collate import collator_for

    device = next(model.parameters()).device
    train_set = _dataset(data.tokenized["train"])
    eval_set = _dataset(data.tokenized["validation"])
    packed = "position_ids" in train_set.column_names
    collator = collator_for(train_set, tokenizer)
    progress_callback = ProgressCallback()
    health = TrainingHealthCallback(cfg.max_grad_norm_spike)
    sampler, reweight = _domain_reweighting(domain_weights, train_set, eval_set, collator, seed)
    trainer = DomainSampledTrainer(
        model=model,
        args=training_arguments(cfg, run, seed, device, eval_set is not None, packed),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=[progress_callback, health, *_early_stopping(cfg, eval_set)]
        + ([reweight] if reweight else []),
        train_sampler=sampler,
    )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback shows the loss; no raw dicts on stdout
    started = time.perf_counter()
    try:
        output = trainer.train()
    finally:
        progress_callback.close()
    runtime = time.perf_counter() - started
    if health.stopped_at is not None:
        raise UserError(
            f"training stopped at step {health.stopped_at}: the loss became {health.bad_loss}; lower "
            "train.learning_rate, keep train.max_grad_norm clipping on, or check the data (data/report.md)"
        )
    if reweight is not None:
        trainer.remove_callback(reweight)  # the final evaluation below no longer steers any training
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    model_dir = _save_final(trainer, tokenizer, run)
    epochs_done = (
        output.global_step * cfg.batch_size * cfg.gradient_accumulation_steps / max(len(train_set), 1)
    )
    tokens = data.report["train_tokens"] * epochs_done
    result = TrainResult(
        model_dir=model_dir,
        history=_history(trainer.state.log_history),
        train_loss=round(output.training_loss, 4),
        eval_loss=round(eval_loss, 4) if eval_loss is not None else None,
        runtime_s=runtime,
        tokens_per_s=round(tokens / runtime, 1) if runtime > 0 else None,
        steps=output.global_step,
        domain_shares=reweight.history if reweight is not None else [],
    )
    log_event(logger, "training finished", **result.summary())
    return result


def _domain_reweighting(
    domain_weights: DomainWeights | None, train_set: Any, eval_set: Any, collator: Any, seed: int
) -> tuple[Any, Any]:
    """(sampler, callback) of dynamic domain re-weighting, or (None, None) without `domain_weights`."""
    if domain_weights is None:
        return None, None
    from seektune.train.callbacks import DomainReweightCallback, WeightedDomainSampler

    if "position_ids" in train_set.column_names:
        raise UserError(
            "data.mix.dynamic draws examples by source, which packed rows mix: turn off data.packing"
        )
    if eval_set is None:
        raise UserError(
            "data.mix.dynamic re-weights sources by their validation loss but there is no validation "
            "split: set data.validation_ratio above 0 (or give validation files)"
        )
    if "source" not in train_set.column_names or "source" not in eval_set.column_names:
        raise ValueError("domain re-weighting needs a `source` column in the train and validation splits")
    sampler = WeightedDomainSampler(train_set.with_format("arrow")["source"], domain_weights, seed)
    return sampler, DomainReweightCallback(domain_weights, eval_set, collator)


def _early_stopping(cfg: TrainConfig, eval_set: Any) -> list[Any]:
    if cfg.early_stopping_patience is None:
        return []
    if eval_set is None:
        raise UserError(
            "train.early_stopping_patience watches the validation loss, but there is no validation split: "
            "set data.validation_ratio above 0 or remove early_stopping_patience"
        )
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)]


def _save_final(trainer: Any, tokenizer: Any, run: RunDir) -> Path:
    """Save the trained model and tokenizer to `<run>/model`, whole or not at all."""
    final = run.path / "model"
    partial = run.path / ".model-partial"
    shutil.rmtree(partial, ignore_errors=True)
    adapter_cfg = getattr(trainer.model, "seektune_adapter_config", None)
    if adapter_cfg is not None:  # bottleneck adapters: only their weights, loaded onto the base later
        from seektune.models.adapters import save_adapters

        save_adapters(trainer.model, partial, adapter_cfg)
    else:
        trainer.save_model(str(partial))
    tokenizer.save_pretrained(str(partial))
    os.replace(partial, final)
    return final


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")
    rows = []
    for entry in log_history:
        if "loss" in entry or "eval_loss" in entry:
            rows.append({k: entry[k] for k in keep if k in entry})
    return rows
