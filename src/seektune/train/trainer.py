"""The training stage on transformers' `Trainer`.

seektune's part is the mapping from the `train` config section to `TrainingArguments` (with the choices
that are right on this hardware: fp32 and no gradient checkpointing on a CPU, bf16 where the GPU has it),
the choice of collator (padded examples, or packed rows: `seektune.train.collate`), the optional
re-weighting of domains from their validation loss (`seektune.train.callbacks`), resuming from a complete
checkpoint (`seektune.train.checkpoints`), throughput and MFU in the logs (`seektune.train.throughput`),
where metrics go (TensorBoard files in the run directory, MLflow, W&B), a profiled run of a few steps
(`seektune.train.profile`), the record of the loss history for the report, and saving the final artefact
(adapter or full model, with the tokenizer) into the run directory. With `train.task_metric`, every evaluation
also scores generated answers to a fixed validation sample (`seektune.train.task_metric`), and
`train.best_metric` chooses whether keep_best and early stopping watch that metric or the validation loss.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seektune.config import EvalConfig, TrainConfig
from seektune.distributed import launched, process_rank, shards_parameters
from seektune.errors import UserError
from seektune.logs import ProgressCallback, log_event
from seektune.rundir import RunDir
from seektune.train.throughput import (
    ThroughputMeter,
    device_peak_flops,
    peak_memory_bytes,
    precision_key,
    training_flops_per_token,
)

if TYPE_CHECKING:
    from seektune.data.mix import DomainWeights
    from seektune.data.prepare import PreparedData
    from seektune.train.checkpoints import ResumePoint
    from seektune.train.task_metric import TaskMetricCallback

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
    mfu: float | None = None
    peak_memory_gb: float | None = None
    steps: int = 0
    domain_shares: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    profile: dict[str, Any] | None = None
    task_metric: dict[str, float] = field(default_factory=dict)  # {"eval_<metric>": final value}, if set

    def scores(self) -> dict[str, Any]:
        """What the same config and seed reproduce exactly."""
        return {
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            **self.task_metric,
            "steps": self.steps,
        }

    def timing(self) -> dict[str, Any]:
        """What depends on the machine and its load."""
        return {
            "train_runtime_s": round(self.runtime_s, 2),
            "train_tokens_per_s": self.tokens_per_s,
            "train_mfu": self.mfu,
            "train_peak_memory_gb": self.peak_memory_gb,
        }

    def summary(self) -> dict[str, Any]:
        """Everything, for the report."""
        return {
            **self.scores(),
            "runtime_s": round(self.runtime_s, 2),
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "peak_memory_gb": self.peak_memory_gb,
            "model_dir": str(self.model_dir),
            "domain_shares": self.domain_shares,
            "resumed_from": self.resumed_from,
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
                f"train.keep_best (and early stopping) pick a checkpoint at an evaluation, so "
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
    profile: bool = False,
):
    """The `TrainingArguments` of one run, from the `train` section.

    The training order is the Trainer's random draw, except where `train` gives a sampler (unpacked
    examples grouped by length, domain re-weighting); packed rows are nearly all of one length, so they
    are drawn at random. A profiled run trains
    `PROFILE_STEPS` steps and neither evaluates nor saves.
    """
    from transformers import TrainingArguments

    from seektune.train.profile import PROFILE_STEPS

    keep_best = has_validation and (cfg.keep_best or cfg.early_stopping_patience is not None)
    schedule = _evaluation_and_saving(cfg, has_validation, keep_best)
    if profile:
        keep_best = False
        schedule = {"eval_strategy": "no", "save_strategy": "no"}
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=PROFILE_STEPS if profile else cfg.max_steps,
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
        **schedule,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=keep_best,
        **_best_metric(cfg, keep_best),
        seed=seed,
        data_seed=seed,
        use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and launched() else None,  # CPUs: gloo, not MPI
        # Every trainable parameter gets a gradient in every step, so DDP need not search the graph for
        # unused ones: transformers 5 fuses a layer's routed experts into one 3-D parameter, which gets
        # a gradient (zero rows for experts no token reached) whenever the layer runs; checked for full,
        # freeze, LoRA (with include_experts), adapter and prefix on DeepSeek-V3.
        ddp_find_unused_parameters=False,
        report_to=[name for name in cfg.report_to if name != "tensorboard"] or "none",
        run_name=run.path.name,
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="random",
        dataloader_num_workers=0,
        **precision_flags(cfg.precision, device),
    )


def _best_metric(cfg: TrainConfig, keep_best: bool) -> dict[str, Any]:
    """What keep_best and early stopping watch: the validation loss, or the (higher-is-better) task metric."""
    if not keep_best:
        return {"metric_for_best_model": None, "greater_is_better": None}
    if cfg.best_metric == "task_metric":
        return {"metric_for_best_model": f"eval_{cfg.task_metric}", "greater_is_better": True}
    return {"metric_for_best_model": "eval_loss", "greater_is_better": False}


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
    checkpoint_identity: dict[str, Any] | None = None,
    resume: ResumePoint | None = None,
    profile: bool = False,
    callbacks: list[Any] | None = None,
    eval_cfg: EvalConfig | None = None,
    system_prompt: str | None = None,
    save: bool = True,
    trainer_class: type | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune `model` on the prepared training split; save the result to `<run>/model`.

    With `domain_weights`, training examples are drawn by domain (`source` column) at the current shares,
    which are updated from the per-domain validation loss after every evaluation. With `resume`, training
    continues from that checkpoint (weights, optimizer, scheduler, RNG and data position), or with new
    data keeps the weights and optimizer and starts the data and schedule afresh. With `profile`, a few
    steps run under the profiler and nothing is saved (`TrainResult.profile`). `callbacks` are added to the
    Trainer's (a search's pruning reporter). With `train.task_metric`, answers to validation conversations
    (rendered with `system_prompt`) are generated with `eval_cfg`'s settings and scored at every evaluation.
    With `save=False` the trained model stays in memory only (a compression step saves it itself);
    `trainer_class` (a `SeektuneTrainer` subclass, e.g. distillation's) is built with `trainer_kwargs` too.
    """
    from transformers import PrinterCallback

    from seektune.train.callbacks import TrainingHealthCallback
    from seektune.train.collate import collator_for
    from seektune.train.loop import SeektuneTrainer

    device = next(model.parameters()).device
    train_set = _dataset(data.tokenized["train"])
    eval_set = _dataset(data.tokenized["validation"])
    packed = "position_ids" in train_set.column_names
    collator = collator_for(train_set, tokenizer)
    progress_callback = ProgressCallback()
    health = TrainingHealthCallback(cfg.max_grad_norm_spike)
    sampler, reweight = _domain_reweighting(domain_weights, train_set, eval_set, collator, seed)
    args = training_arguments(cfg, run, seed, device, eval_set is not None and not profile, profile)
    if sampler is None and not packed:
        sampler = _length_grouped_sampler(train_set, args, seed)
    meter = _meter(model, args, data, device)
    task = None if profile else _task_metric(cfg, data, tokenizer, eval_set, eval_cfg, system_prompt)
    extra = [*_reporting_callbacks(cfg, run), *_early_stopping(cfg, eval_set if not profile else None)]
    profiler = None
    if profile:
        from seektune.train.profile import ProfilerCallback

        rank = process_rank()  # one trace per process: each shows its own waits in the collectives
        trace = "trace.json" if rank == 0 else f"trace-rank{rank}.json"
        profiler = ProfilerCallback(run.path / "profile" / trace, device)
        extra.append(profiler)
    trainer = (trainer_class or SeektuneTrainer)(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=[progress_callback, health, *extra, *(callbacks or [])] + ([reweight] if reweight else []),
        train_sampler=sampler,
        checkpoint_identity=checkpoint_identity or {},
        meter=meter,
        **(trainer_kwargs or {}),
    )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback shows the loss; no raw dicts on stdout
    if task is not None:
        from seektune.train.task_metric import install_first

        install_first(trainer, task)  # before every logger (MLflow and W&B included) and early stopping
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=_resume_argument(trainer, resume))
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(
            f"out of GPU memory at step {trainer.state.global_step} with train.batch_size {cfg.batch_size}: "
            "`seektune plan CONFIG` names the largest micro-batch that fits; lower train.batch_size and "
            "raise train.gradient_accumulation_steps, or set train.gradient_checkpointing: true"
        ) from exc
    finally:
        progress_callback.close()
    runtime = time.perf_counter() - started
    if health.stopped_at is not None:
        raise UserError(
            f"training stopped at step {health.stopped_at}: the loss became {health.bad_loss}; lower "
            "train.learning_rate, keep train.max_grad_norm clipping on, or check the data (data/report.md)"
        )
    overall = meter.overall()
    result = TrainResult(
        model_dir=run.path / "model",
        history=_history(trainer.state.log_history, task.sample.key if task is not None else None),
        train_loss=round(output.training_loss, 4),
        runtime_s=runtime,
        tokens_per_s=overall.get("tokens_per_s"),
        mfu=overall.get("mfu"),
        peak_memory_gb=round(peak_memory_bytes(device) / 2**30, 3),
        steps=output.global_step,
        domain_shares=reweight.history if reweight is not None else [],
        resumed_from=str(resume.checkpoint) if resume is not None else None,
    )
    if profiler is not None:
        result.profile = profiler.summary
        return result
    if reweight is not None:
        trainer.remove_callback(reweight)  # the final evaluation below no longer steers any training
    if eval_set is not None:
        final = trainer.evaluate()
        result.eval_loss = round(final["eval_loss"], 4)
        if task is not None:
            result.task_metric = {task.sample.key: round(final[task.sample.key], 4)}
    if save:
        _save_final(trainer, tokenizer, run)
    log_event(logger, "training finished", **result.summary())
    return result


def _length_grouped_sampler(train_set: Any, args: Any, seed: int) -> Any:
    """Examples grouped by similar length, in an order that depends on the global batch and epoch alone.

    The Trainer's own `group_by_length` sampler sizes its length-sorted megabatches by one process's batch,
    so its order changes with the number of processes; sized by the global batch (per-process batch x
    accumulation x processes), N processes of b examples each see the batches one process of N x b sees.
    It also draws each epoch's order from the global RNG, whose state at an epoch's start a resumed run
    cannot reproduce; here epoch e draws with seed + e (`EpochSeededLengthGroupedSampler`).
    """
    from seektune.data.records import column_values
    from seektune.train.callbacks import EpochSeededLengthGroupedSampler

    global_batch = args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return EpochSeededLengthGroupedSampler(global_batch, column_values(train_set, "length"), seed)


def _meter(model: Any, args: Any, data: PreparedData, device: torch.device) -> ThroughputMeter:
    """Real-token throughput and MFU of this model on this device (at the training precision)."""
    precision = (
        "bf16" if args.bf16 else "fp16" if args.fp16 else precision_key(next(model.parameters()).dtype)
    )
    examples = (data.report.get("splits") or {}).get("train") or 1
    mean_length = data.report.get("train_tokens", 0) / examples or 512  # attention spans one example
    return ThroughputMeter(
        training_flops_per_token(model, int(mean_length)),
        device_peak_flops(device, precision),
        device,
        world=max(args.world_size, 1),
    )


def _resume_argument(trainer: Any, resume: ResumePoint | None) -> str | None:
    """`resume_from_checkpoint` for the Trainer; with new data, load weights and optimizer ourselves."""
    if resume is None:
        return None
    if not resume.new_data:
        return str(resume.checkpoint)
    from seektune.train.callbacks import OptimizerStateCallback

    trainer._load_from_checkpoint(str(resume.checkpoint))  # weights (full model or adapter), as on resume
    trainer.add_callback(OptimizerStateCallback(resume.checkpoint))
    log_event(
        logger,
        "new data: weights and optimizer kept, data and schedule start afresh",
        checkpoint=str(resume.checkpoint),
    )
    return None


def _reporting_callbacks(cfg: TrainConfig, run: RunDir) -> list[Any]:
    """TensorBoard writing into `<run>/logs/tensorboard`; MLflow and W&B set up to stay in the run."""
    callbacks = []
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = str(run.logs_dir / "tensorboard")
        callbacks.append(board)
    for name, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in cfg.report_to and importlib.util.find_spec(package) is None:
            raise UserError(
                f"train.report_to names {name} but the {package} package is not installed: "
                f"pip install {package}, or remove {name} from train.report_to"
            )
    if "mlflow" in cfg.report_to:  # a local store inside the run unless the user points elsewhere
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run.logs_dir / "mlruns").resolve().as_uri())
    if "wandb" in cfg.report_to:
        os.environ.setdefault("WANDB_DIR", str(run.logs_dir))
    return callbacks


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
        watched = "the validation loss" if cfg.best_metric == "eval_loss" else f"eval_{cfg.task_metric}"
        raise UserError(
            f"train.early_stopping_patience watches {watched}, but there is no validation split: "
            "set data.validation_ratio above 0 or remove early_stopping_patience"
        )
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)]


def _task_metric(
    cfg: TrainConfig,
    data: PreparedData,
    tokenizer: Any,
    eval_set: Any,
    eval_cfg: EvalConfig | None,
    system_prompt: str | None,
) -> TaskMetricCallback | None:
    """The callback that scores `train.task_metric` at every evaluation (None without one); refuses, before
    training, what cannot compute it."""
    if cfg.task_metric is None:
        return None
    if eval_set is None:
        raise UserError(
            f"train.task_metric {cfg.task_metric} is computed at every evaluation, but there is no "
            "validation split: set data.validation_ratio above 0 (or give validation files), or set "
            "train.task_metric: null and train.best_metric: eval_loss"
        )
    if shards_parameters():
        raise UserError(
            f"train.task_metric {cfg.task_metric} generates answers in one process, but under FSDP or "
            "DeepSpeed ZeRO-3 each process holds only a shard of the weights: use plain data parallelism "
            "(configs/accelerate/ddp.yaml) or ZeRO-2, or set train.task_metric: null and train.best_metric: "
            "eval_loss"
        )
    from seektune.train.task_metric import TaskMetricCallback, task_sample

    eval_cfg = eval_cfg or EvalConfig()
    records, samples = data.records["validation"], cfg.task_metric_samples
    sample = task_sample(cfg.task_metric, records, tokenizer, eval_cfg, samples, system_prompt)
    log_event(logger, "task metric during training", metric=cfg.task_metric, prompts=len(sample.prompts))
    return TaskMetricCallback(sample, tokenizer, eval_cfg)


def _save_final(trainer: Any, tokenizer: Any, run: RunDir) -> Path:
    """Save the trained model and tokenizer to `<run>/model`, whole or not at all.

    Every process calls this: under DeepSpeed ZeRO-3 or FSDP `save_model` gathers the weight shards of
    all processes; the Trainer writes from the main process only, and no process returns before
    `<run>/model` is in place.
    """
    final = run.path / "model"
    partial = run.path / ".model-partial"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    adapter_cfg = getattr(trainer.model, "seektune_adapter_config", None)
    if adapter_cfg is not None:  # bottleneck adapters: only their weights, loaded onto the base later
        from seektune.models.adapters import save_adapters

        if main:
            save_adapters(trainer.model, partial, adapter_cfg)
    elif getattr(trainer.model, "seektune_prefix_config", None) is not None:  # prefix keys and values
        from seektune.models.prefix import save_prefix

        if main:
            save_prefix(trainer.model, partial)
    else:
        trainer.save_model(str(partial))
        _save_base_fingerprint(trainer.model, partial, main)
    if main:
        tokenizer.save_pretrained(str(partial))
        os.replace(partial, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _save_base_fingerprint(model: Any, folder: Path, main: bool) -> None:
    """Record which base a LoRA/DoRA adapter was trained on, for the merge step to check
    (`seektune.models.fingerprint`); sharded weights (FSDP, ZeRO-3) leave no process the values to read."""
    import peft

    if not main or not isinstance(model, peft.PeftModel):
        return
    if shards_parameters():
        logger.warning("weights are sharded: no base fingerprint saved, the merge cannot verify the base")
        return
    from seektune.models.fingerprint import write_fingerprint

    write_fingerprint(folder, model)


def _history(
    log_history: list[dict[str, Any]], task_key: str | None = None, more: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    keep = (
        "step",
        "epoch",
        "loss",
        "eval_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "peak_memory_gb",
        *([task_key] if task_key else []),
        *more,
        *(f"eval_{key}" for key in more),
    )
    rows = []
    for entry in log_history:
        if "loss" in entry or "eval_loss" in entry:
            rows.append({k: entry[k] for k in keep if k in entry})
    return rows
