"""The order of the stages, and the run directory around them.

This is the only module that knows the order: prepare the data (with the model's tokenizer, so bad data
stops a run before any weight is loaded) → load the base → evaluate the base → apply the fine-tuning method
→ train → evaluate the tuned model → report. Each stage is a plain function of its own config section and
the artefacts of earlier stages. A run that fails records the error in its run directory
(`status.json`) before the error reaches the user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from seektune.config import SeektuneConfig, config_to_yaml
from seektune.errors import UserError
from seektune.logs import attach_run_logs, detach_run_logs, log_event
from seektune.rundir import RunDir, environment_info

logger = logging.getLogger(__name__)

SAMPLES_IN_REPORT = 5
# The CLI verb that reruns each kind of run.
_VERBS = {"run": "run", "data": "data prepare", "train": "train", "eval": "eval"}

# Sections whose stage arrives with a later release: enabling one stops before anything runs.
_NOT_YET = {
    "tune": "hyperparameter search",
    "compress": "compression",
    "registry": "the model registry",
}


def check_stages_available(cfg: SeektuneConfig) -> None:
    """Stop with one line, before anything runs, when the config asks for what this version lacks."""
    for section, what in _NOT_YET.items():
        if getattr(cfg, section).enabled:
            raise UserError(
                f"{section}.enabled is true but {what} is not available in this version of seektune "
                f"yet: set {section}.enabled: false"
            )
    from seektune.models.methods import AVAILABLE_METHODS

    if cfg.method.name == "qlora" and not _has_cuda(cfg.model.device):
        raise UserError(
            "method.name qlora loads the base in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU, "
            f"and model.device '{cfg.model.device}' has none here: use method.name lora (the same adapter "
            "on a full-precision base)"
        )
    if cfg.method.name == "prefix":
        from seektune.models.prefix import check_prefix_compatible

        check_prefix_compatible(cfg.data)
    if cfg.method.name not in AVAILABLE_METHODS:
        raise UserError(
            f"method.name '{cfg.method.name}' is not available in this version of seektune yet: "
            f"use {', '.join(AVAILABLE_METHODS)}"
        )


def _has_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@dataclass
class RunContext:
    """What the stages of one run have produced so far, for metrics.json and the report."""

    run: RunDir
    cfg: SeektuneConfig
    summary: dict[str, Any] = field(default_factory=dict)


@contextmanager
def open_run(cfg: SeektuneConfig, command: str) -> Iterator[RunContext]:
    """Create the run directory, record config and environment, and mark the run's outcome."""
    run = RunDir.create(cfg.output_dir, cfg.name)
    run.write_text("config.yaml", config_to_yaml(cfg))
    run.write_json("environment.json", environment_info(cfg.seed))  # rewritten with the device once known
    attach_run_logs(run.logs_dir)
    run.mark_status("running", stage=command)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = RunContext(
        run=run,
        cfg=cfg,
        summary={
            "run": {
                "name": cfg.name,
                "run_dir": str(run.path),
                "started_at": started,
                "seed": cfg.seed,
                "command_verb": _VERBS[command],
            }
        },
    )
    log_event(logger, "run started", run_dir=str(run.path), command=command)
    try:
        yield state
    except BaseException as exc:
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        run.mark_status("failed", stage=command, error=message or type(exc).__name__)
        log_event(logger, "run failed", run_dir=str(run.path), error=message)
        raise
    else:
        state.summary["run"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run.mark_status("completed", stage=command)
        log_event(logger, "run finished", run_dir=str(run.path))
    finally:
        detach_run_logs()


def _load_base(state: RunContext):
    from transformers import set_seed

    from seektune.models.load import load_model

    set_seed(state.cfg.seed)
    loaded = load_model(state.cfg.model)
    state.run.write_json("environment.json", environment_info(state.cfg.seed, str(loaded.device)))
    state.summary["run"].update(
        model=state.cfg.model.name_or_path,
        model_path=loaded.path,
        family=loaded.family.name,
        method=state.cfg.method.name,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    return loaded


def _tokenizer(cfg: SeektuneConfig) -> Any:
    from seektune.models.load import load_tokenizer

    return load_tokenizer(cfg.model)


def _prepare(state: RunContext, tokenizer: Any):
    from seektune.data.prepare import compact_report, prepare_data

    data = prepare_data(state.cfg.data, tokenizer, state.cfg.seed, state.run.data_dir)
    state.summary["data"] = compact_report(data.report)
    state.run.update_metrics("data", state.summary["data"])
    return data


def _require_test_split(data: Any) -> None:
    if not len(data.tokenized["test"]):
        raise UserError(
            "the test split is empty, so nothing can be evaluated: raise data.test_ratio, add data, "
            "or set eval.enabled: false"
        )


def _evaluate(state: RunContext, which: str, model: Any, tokenizer: Any, data: Any) -> None:
    from seektune.data.prepare import last_exchange
    from seektune.evaluate.metrics import evaluate_model

    started = time.perf_counter()
    scores, generations = evaluate_model(
        model, tokenizer, data, state.cfg.eval, state.cfg.data.system_prompt, label=which
    )
    seconds = round(time.perf_counter() - started, 2)
    evaluation = state.summary.setdefault("eval", {"models": {}, "samples": []})
    evaluation["models"][which] = {**scores, "seconds": seconds}
    state.run.update_metrics("eval", {which: scores})
    state.run.update_metrics("timing", {f"eval_{which}_s": seconds})
    answers = []
    conversations = (r for r in data.records["test"] if r["messages"])
    for record, generation in zip(conversations, generations, strict=False):
        _, question, reference = last_exchange(record["messages"])
        answers.append(
            {
                "question": question,
                "reference": reference,
                "answer": generation.text,
                "ended_with_eos": generation.ended_with_eos,
            }
        )
    state.run.write_jsonl(f"eval/{which}-answers.jsonl", answers)
    samples = evaluation["samples"]
    for index, answer in enumerate(answers[:SAMPLES_IN_REPORT]):
        if index == len(samples):
            samples.append({"question": answer["question"], "reference": answer["reference"]})
        samples[index][which] = answer["answer"]


@dataclass(frozen=True)
class TrainOptions:
    """How the CLI asked to train: resume from a checkpoint, accept changed data, or only profile."""

    resume: bool = False
    resume_new_data: bool = False
    profile: bool = False


def _resume_checkpoint(cfg: SeektuneConfig, options: TrainOptions) -> Any:
    """The checkpoint to continue from (checked against model and method), or None to start afresh."""
    if options.profile or not (options.resume or options.resume_new_data or cfg.train.resume == "auto"):
        return None
    from seektune.train.checkpoints import check_identity, checkpoint_identity, find_resume_checkpoint

    checkpoint = find_resume_checkpoint(cfg.output_dir, cfg.name)
    if checkpoint is None:
        if options.resume or options.resume_new_data:
            raise UserError(
                f"nothing to resume: no unfinished run named {cfg.name!r} in {cfg.output_dir} has a "
                "complete checkpoint; run without --resume to start a new run"
            )
        log_event(logger, "train.resume auto: no checkpoint to resume, starting a new run")
        return None
    check_identity(checkpoint, checkpoint_identity(cfg, None), allow_new_data=False)
    return checkpoint


def _train(
    state: RunContext,
    loaded: Any,
    data: Any,
    domain_weights: Any = None,
    checkpoint: Any = None,
    options: TrainOptions | None = None,
) -> Any:
    from seektune.models.methods import apply_method
    from seektune.train.checkpoints import ResumePoint, check_identity, checkpoint_identity
    from seektune.train.trainer import train

    options = options or TrainOptions()
    identity = checkpoint_identity(state.cfg, data.report.get("fingerprint"))
    resume = None
    if checkpoint is not None:
        new_data = check_identity(checkpoint, identity, allow_new_data=options.resume_new_data)
        resume = ResumePoint(checkpoint, int(checkpoint.name.rsplit("-", 1)[1]), new_data)
        state.summary["run"]["resumed_from"] = str(checkpoint)
        log_event(logger, "resuming", checkpoint=str(checkpoint), new_data=new_data)
    model, trainable = apply_method(loaded.model, state.cfg.method, loaded.family)
    result = train(
        state.cfg.train,
        model,
        loaded.tokenizer,
        data,
        state.run,
        state.cfg.seed,
        domain_weights=domain_weights,
        checkpoint_identity=identity,
        resume=resume,
        profile=options.profile,
    )
    counts = {"trainable_params": trainable.trainable, "total_params": trainable.total}
    if result.profile is not None:
        state.summary["profile"] = result.profile
        state.run.write_json("profile/summary.json", result.profile)
        state.run.update_metrics("profile", result.profile)
        return model
    state.summary["train"] = {**result.summary(), "history": result.history, **counts}
    resumed = {"resumed_from": result.resumed_from} if result.resumed_from else {}
    state.run.update_metrics("train", {**result.scores(), **counts, **resumed})
    state.run.update_metrics("timing", result.timing())
    state.run.write_json("train/history.json", result.history)
    return model


def _domain_weights(cfg: SeektuneConfig, data: Any) -> Any:
    """The dynamic source weights (`data.mix.dynamic`), starting from the training split's shares."""
    if not cfg.data.mix.dynamic:
        return None
    from collections import Counter

    from seektune.data.mix import DomainWeights
    from seektune.data.records import column_values

    counts = Counter(column_values(data.tokenized["train"], "source"))
    if len(counts) < 2:
        raise UserError("data.mix.dynamic re-weights sources, but the training data has one: add a source")
    if not len(data.tokenized["validation"]):
        raise UserError(
            "data.mix.dynamic re-weights sources by their validation loss but there is no validation "
            "split: set data.validation_ratio above 0 (or give validation files)"
        )
    total = sum(counts.values())
    shares = {name: n / total for name, n in sorted(counts.items())}
    return DomainWeights(shares, cfg.data.mix.dynamic_step, cfg.data.mix.dynamic_min_share)


def _finish(state: RunContext) -> None:
    from seektune.report import write_report

    models = state.summary.get("eval", {}).get("models", {})
    if "base" in models and "tuned" in models:
        state.run.update_metrics("eval", {"improvement": improvement(models["base"], models["tuned"])})
    write_report(state.run, state.summary)


def improvement(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    """Change from base to tuned per metric (relative for perplexity, absolute for rates and scores)."""
    change: dict[str, float] = {}
    if "perplexity" in base and "perplexity" in tuned:
        change["perplexity_relative"] = round(tuned["perplexity"] / base["perplexity"] - 1, 4)
    for key in ("rouge_l", "eos_rate"):
        if key in base and key in tuned:
            change[key] = round(tuned[key] - base[key], 4)
    return change


# ---------------------------------------------------------------------------------------------------------
# Entry points (the CLI calls these)


def run_pipeline(cfg: SeektuneConfig, options: TrainOptions | None = None) -> RunDir:
    """The whole loop: data, base evaluation, training, tuned evaluation, report."""
    check_stages_available(cfg)
    options = options or TrainOptions()
    checkpoint = _resume_checkpoint(cfg, options)
    with open_run(cfg, "run") as state:
        data = _prepare(state, _tokenizer(cfg))  # bad data stops before any weight is loaded
        if cfg.eval.enabled:
            _require_test_split(data)
        weights = _domain_weights(cfg, data)
        loaded = _load_base(state)
        if cfg.eval.enabled and cfg.eval.compare_base:
            _evaluate(state, "base", loaded.model, loaded.tokenizer, data)
        model = _train(state, loaded, data, weights, checkpoint, options)
        if cfg.eval.enabled:
            _evaluate(state, "tuned", model, loaded.tokenizer, data)
        _finish(state)
    return state.run


def run_data_stage(cfg: SeektuneConfig) -> RunDir:
    """Prepare the data alone (the tokenizer of the configured model is loaded, not its weights)."""
    with open_run(cfg, "data") as state:
        _prepare(state, _tokenizer(cfg))
        _finish(state)
    return state.run


def run_train_stage(cfg: SeektuneConfig, options: TrainOptions | None = None) -> RunDir:
    """Prepare the data and train, without evaluation (or, with `options.profile`, profile a few steps)."""
    check_stages_available(cfg)
    options = options or TrainOptions()
    checkpoint = _resume_checkpoint(cfg, options)
    with open_run(cfg, "train") as state:
        data = _prepare(state, _tokenizer(cfg))
        weights = _domain_weights(cfg, data)
        loaded = _load_base(state)
        _train(state, loaded, data, weights, checkpoint, options)
        _finish(state)
    return state.run


def run_eval_stage(cfg: SeektuneConfig) -> RunDir:
    """Evaluate the configured model (a base, a merged model or a run's `model` folder) on the test split."""
    with open_run(cfg, "eval") as state:
        data = _prepare(state, _tokenizer(cfg))
        _require_test_split(data)
        loaded = _load_base(state)
        _evaluate(state, "model", loaded.model, loaded.tokenizer, data)
        _finish(state)
    return state.run
