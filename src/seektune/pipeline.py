"""The order of the stages, and the run directory around them.

This is the only module that knows the order: load the base → prepare data → evaluate the base → apply the
fine-tuning method → train → evaluate the tuned model → report. Each stage is a plain function of its own
config section and the artefacts of earlier stages. A run that fails records the error in its run directory
(`status.json`) before the error reaches the user.
"""

from __future__ import annotations

import logging
import sys
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

# Sections whose stage arrives with a later release: enabling one stops before anything runs.
_NOT_YET = {
    "tune": "hyperparameter search",
    "compress": "compression",
    "registry": "the model registry",
}


def check_stages_available(cfg: SeektuneConfig) -> None:
    """Stop with one line when the config enables a stage this version does not have yet."""
    for section, what in _NOT_YET.items():
        if getattr(cfg, section).enabled:
            raise UserError(
                f"{section}.enabled is true but {what} is not available in this version of seektune "
                f"yet: set {section}.enabled: false"
            )


@dataclass
class RunState:
    """What the stages of one run have produced so far, for metrics.json and the report."""

    run: RunDir
    cfg: SeektuneConfig
    summary: dict[str, Any] = field(default_factory=dict)


@contextmanager
def open_run(cfg: SeektuneConfig, command: str) -> Iterator[RunState]:
    """Create the run directory, record config and environment, and mark the run's outcome."""
    run = RunDir.create(cfg.output_dir, cfg.name)
    run.write_text("config.yaml", config_to_yaml(cfg))
    run.write_json("environment.json", environment_info(cfg.seed))  # rewritten with the device once known
    attach_run_logs(run.logs_dir)
    run.mark_status("running", stage=command)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = RunState(
        run=run,
        cfg=cfg,
        summary={
            "run": {
                "name": cfg.name,
                "run_dir": str(run.path),
                "started_at": started,
                "seed": cfg.seed,
                "command": " ".join(["seektune", *sys.argv[1:]]) if sys.argv else f"seektune {command}",
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


def _load_base(state: RunState):
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


def _prepare(state: RunState, tokenizer: Any):
    from seektune.data.prepare import prepare_data

    data = prepare_data(state.cfg.data, tokenizer, state.cfg.seed, state.run.data_dir)
    state.summary["data"] = data.report
    state.run.update_metrics("data", data.report)
    return data


def _evaluate(state: RunState, which: str, model: Any, tokenizer: Any, data: Any) -> None:
    from seektune.evaluate.metrics import evaluate_model

    scores, generations = evaluate_model(
        model, tokenizer, data, state.cfg.eval, state.cfg.data.system_prompt, label=which
    )
    evaluation = state.summary.setdefault("eval", {"models": {}, "samples": []})
    evaluation["models"][which] = scores
    _merge_samples(evaluation, which, data, generations)
    state.run.update_metrics("eval", {which: scores})
    state.run.write_text(
        f"eval/{which}-answers.jsonl",
        "".join(
            _json_line(
                {
                    "question": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
                    "reference": r["messages"][-1]["content"],
                    "answer": g.text,
                    "ended_with_eos": g.ended_with_eos,
                }
            )
            for r, g in zip(data.records["test"], generations, strict=False)
        ),
    )


def _merge_samples(evaluation: dict, which: str, data: Any, generations: list) -> None:
    samples = evaluation["samples"]
    for index, generation in enumerate(generations[:5]):
        if index >= len(samples):
            messages = data.records["test"][index]["messages"]
            samples.append(
                {
                    "question": messages[-2]["content"] if len(messages) > 1 else "",
                    "reference": messages[-1]["content"],
                }
            )
        samples[index][which] = generation.text


def _json_line(obj: dict) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False) + "\n"


def _train(state: RunState, loaded: Any, data: Any) -> Any:
    from seektune.models.methods import apply_method
    from seektune.train.trainer import train

    model, trainable = apply_method(loaded.model, state.cfg.method, loaded.family)
    result = train(state.cfg.train, model, loaded.tokenizer, data, state.run, state.cfg.seed)
    state.summary["train"] = {
        **result.summary(),
        "history": result.history,
        "trainable_params": trainable.trainable,
        "total_params": trainable.total,
    }
    state.run.update_metrics(
        "train",
        {**result.summary(), "trainable_params": trainable.trainable, "total_params": trainable.total},
    )
    state.run.write_json("train/history.json", result.history)
    return model


def _finish(state: RunState) -> None:
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


def run_pipeline(cfg: SeektuneConfig) -> RunDir:
    """The whole loop: data, base evaluation, training, tuned evaluation, report."""
    check_stages_available(cfg)
    with open_run(cfg, "run") as state:
        loaded = _load_base(state)
        data = _prepare(state, loaded.tokenizer)
        if cfg.eval.enabled and cfg.eval.compare_base:
            _evaluate(state, "base", loaded.model, loaded.tokenizer, data)
        model = _train(state, loaded, data)
        if cfg.eval.enabled:
            _evaluate(state, "tuned", model, loaded.tokenizer, data)
        _finish(state)
    return state.run


def run_data_stage(cfg: SeektuneConfig) -> RunDir:
    """Prepare the data alone (the tokenizer of the configured model is loaded, not its weights)."""
    from seektune.models.load import load_tokenizer

    with open_run(cfg, "data") as state:
        _prepare(state, load_tokenizer(cfg.model))
        _finish(state)
    return state.run


def run_train_stage(cfg: SeektuneConfig) -> RunDir:
    """Prepare the data and train, without evaluation."""
    check_stages_available(cfg)
    with open_run(cfg, "train") as state:
        loaded = _load_base(state)
        data = _prepare(state, loaded.tokenizer)
        _train(state, loaded, data)
        _finish(state)
    return state.run


def run_eval_stage(cfg: SeektuneConfig) -> RunDir:
    """Evaluate the configured model (a base, a merged model or a run's `model` folder) on the test split."""
    with open_run(cfg, "eval") as state:
        loaded = _load_base(state)
        data = _prepare(state, loaded.tokenizer)
        _evaluate(state, "model", loaded.model, loaded.tokenizer, data)
        _finish(state)
    return state.run
