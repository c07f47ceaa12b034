"""The search: an Optuna study whose trials are seektune training runs.

Each trial samples `tune.space` (`seektune.tune.space`), trains the configured model with those values in
its own folder (`<run>/tune/trials/trial-NNNN`, a nested run directory: checkpoints, TensorBoard, model)
and returns the objective(s): the validation loss by default (the best one, as `train.keep_best` keeps),
an evaluation metric on the validation split, or a cost of the run. Optuna does the rest: samplers (grid,
random, TPE, CMA-ES), pruners (median, Hyperband: every evaluation reports the validation loss and a
hopeless trial stops there), storages (SQLite, any database URL, a journal file) and several workers on one
study.

What is ours is the glue Optuna leaves to its user, written once here:
- the budget counts the whole study, not one worker's share (`tune.n_trials` finished trials, all workers
  together), and a restarted worker continues where the study was;
- a trial interrupted by the death of its worker (SIGKILL, a lost machine) would stay RUNNING forever in
  SQLite or a journal file: a worker that starts fails and re-queues those of its own host whose process is
  gone (and RDB storages' heartbeat does it for other hosts), so nothing is lost;
- a trial that fails records its error and the study goes on; a pruned or failed trial frees its model;
- a study remembers its space and objectives and refuses to continue under another one;
- the result: the best trial's config as a ready YAML file, its model in `<run>/model`, and a report.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback

from seektune.config import SeektuneConfig, config_to_yaml
from seektune.errors import UserError
from seektune.logs import log_event
from seektune.rundir import RunDir
from seektune.tune.space import (
    Param,
    apply_values,
    config_values,
    grid_space,
    parse_space,
    space_signature,
    suggest,
)

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
STUDY_FILE = "study.db"
EVAL_METRICS = ("perplexity", "rouge_l", "eos_rate", "latency_s")
HEARTBEAT_S = 60  # RDB storages: a trial whose worker is silent for GRACE_S is failed and re-queued
GRACE_S = 180


@dataclass
class TuneResult:
    """What a search produced."""

    study_name: str
    storage: str
    best: list[dict[str, Any]] = field(default_factory=list)
    config_path: Path | None = None
    model_dir: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Storage, sampler, pruner, study


def storage_url(cfg: SeektuneConfig, run: RunDir) -> str:
    """`tune.storage`, or the SQLite file in the run directory."""
    if cfg.tune.storage:
        return cfg.tune.storage
    return f"sqlite:///{(run.path / TUNE_DIR / STUDY_FILE).resolve()}"


def open_storage(url: str) -> Any:
    """An Optuna storage for `url` (journal:<path> for a journal file); UserError when it cannot open."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:")).expanduser()
            if not path.parent.is_dir():
                raise OSError(f"folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
    except Exception as exc:  # sqlalchemy's errors, a missing database driver, a bad path
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot open tune.storage {url!r}: {reason}; give a reachable database URL "
            "(sqlite:///path.db, postgresql://user@host/db with its driver installed) or journal:<file path>"
        ) from None


def make_sampler(cfg: SeektuneConfig, params: list[Param], seed: int) -> Any:
    """The Optuna sampler of `tune.sampler`, seeded with `seed`."""
    name = cfg.tune.sampler
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(params), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Categorical keys fall back to random sampling inside CMA-ES (Optuna's behaviour), quietly.
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group: TPE models the parameters jointly, per conditional branch; constant_liar
        # keeps parallel workers from sampling the same point while their trials run.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_pruner(cfg: SeektuneConfig, trial_rows: int | None = None) -> Any:
    """The Optuna pruner of `tune.pruner` (NopPruner for none). Trials report against training rows seen
    (`PruningReporter`); `trial_rows`, the rows one trial trains on, sets the median pruner's warm-up
    (`tune.pruner_warmup_ratio` of them)."""
    name = cfg.tune.pruner_name()
    if name == "median":
        warmup = int((trial_rows or 0) * cfg.tune.pruner_warmup_ratio)
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.tune.pruner_startup_trials, n_warmup_steps=warmup
        )
    if name == "hyperband":  # its first rung at the first evaluation, its last at the trial's end
        per_step = rows_per_step(cfg.train.batch_size, cfg.train.gradient_accumulation_steps)
        first = (cfg.train.eval_steps or 1) * per_step
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=trial_rows or "auto")
    return optuna.pruners.NopPruner()


def open_study(cfg: SeektuneConfig, params: list[Param], url: str, trial_rows: int | None = None) -> Any:
    """Create the study, or load it when its name exists (checked to have the same space and objectives)."""

    name = cfg.tune.study_name or cfg.name
    storage = open_storage(url)
    directions = cfg.tune.directions()
    signature = space_signature(params)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        pruner=make_pruner(cfg, trial_rows),
        directions=directions,
        load_if_exists=True,
    )
    stored = study.user_attrs
    if "space" not in stored:
        study.set_user_attr("space", signature)
        study.set_user_attr("metrics", cfg.tune.metrics())
        study.set_user_attr("sampler", cfg.tune.sampler)
        study.set_user_attr("pruner", cfg.tune.pruner_name())
    elif stored["space"] != signature or stored.get("metrics") != cfg.tune.metrics():
        raise UserError(
            f"study {name!r} in {url} was made with another search space or metric "
            f"({', '.join(json.loads(stored['space']))} for {stored.get('metrics')}): give tune.study_name a "
            "new name, or restore the study's tune.space and tune.metric"
        )
    if [d.name.lower() for d in study.directions] != directions:
        raise UserError(
            f"study {name!r} in {url} optimises in another direction: give tune.study_name a new name"
        )
    # The run's seed makes a fresh single-worker search reproducible. A continued study and each worker
    # of a shared one get seeds of their own, or a random sampler would replay the trials already run.
    seed = cfg.seed + 1009 * len(study.trials) + (os.getpid() if cfg.tune.storage else 0)
    study.sampler = make_sampler(cfg, params, seed % 2**32)
    return study


# ---------------------------------------------------------------------------------------------------------
# Trials


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover_interrupted(study: Any) -> list[int]:
    """Fail and re-queue the trials whose worker died (same host, process gone; or stopped by Ctrl-C).

    Returns the numbers of the trials re-queued.
    """
    import psutil
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    host = socket.gethostname()
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if trial.state == TrialState.RUNNING:
            if worker_host != host or not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue  # another machine's (its heartbeat covers it) or a live worker's
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        elif not trial.user_attrs.get("interrupted"):
            continue  # a trial that failed on its own stays failed
        if trial.number in retried:
            continue
        attrs = {k: v for k, v in trial.user_attrs.items() if k in ("baseline",)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number})
        requeued.append(trial.number)
    if requeued:
        log_event(logger, "interrupted trials queued again", trials=requeued)
    return requeued


def finished_trials(study: Any) -> int:
    """Trials that count against the budget: complete, pruned, failed on their own, and running now."""
    from optuna.trial import TrialState

    counted = 0
    for trial in study.get_trials(deepcopy=False):
        failed_alone = trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted")
        if failed_alone or trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            counted += 1
    return counted


class PruningReporter(TrainerCallback):
    """Reports the validation loss of every evaluation to the trial; prunes a hopeless trial there.

    The loss is reported against the training rows seen so far (optimizer steps x rows per step), not the
    step: trials that search the batch size or accumulation compare at the same amount of data, where a
    step of 8 rows would otherwise be judged against a step of 32.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.reported: set[int] = set()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if not metrics or "eval_loss" not in metrics or step in self.reported:
            return  # the evaluation after training comes at the step of the last one
        self.reported.add(step)
        rows = step * rows_per_step(args.per_device_train_batch_size, args.gradient_accumulation_steps)
        self.trial.report(float(metrics["eval_loss"]), rows)
        self.trial.set_user_attr("steps", step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", step)
            raise optuna.TrialPruned(f"validation loss {metrics['eval_loss']:.4f} at step {step}")


def rows_per_step(batch_size: int, accumulation: int) -> int:
    """Training rows of one optimizer step, all processes together."""
    from seektune.distributed import world_size

    return batch_size * accumulation * world_size()


@dataclass
class _Search:
    """Everything a trial needs that stays the same across trials."""

    cfg: SeektuneConfig
    params: list[Param]
    run: RunDir
    data: Any
    tokenizer: Any

    def objective(self, trial: Any) -> float | tuple[float, ...]:
        trial.set_user_attr("worker", _worker())
        started = time.perf_counter()
        folder = self.run.path / TUNE_DIR / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(folder))
        try:
            values = suggest(trial, self.params, self.cfg)
            log_event(logger, "trial started", trial=trial.number, **values)
            metrics = self._train(trial, apply_values(self.cfg, values), RunDir.create_at(folder))
        except BaseException as exc:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            if isinstance(exc, optuna.TrialPruned):
                log_event(
                    logger, "trial pruned", trial=trial.number, at_step=trial.user_attrs.get("pruned_at")
                )
                shutil.rmtree(folder / "model", ignore_errors=True)
            elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
                trial.set_user_attr("interrupted", True)
            else:
                message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                trial.set_user_attr("error", message[:2000])
                log_event(logger, "trial failed", trial=trial.number, error=message)
            raise
        finally:
            trial.set_user_attr("runtime_s", round(time.perf_counter() - started, 2))
            _free_memory()
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("model_dir", str(folder / "model"))
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        objective = tuple(float(metrics[name]) for name in self.cfg.tune.metrics())
        log_event(
            logger,
            "trial finished",
            trial=trial.number,
            **dict(zip(self.cfg.tune.metrics(), objective, strict=True)),
        )
        return objective[0] if len(objective) == 1 else objective

    def _train(self, trial: Any, cfg: SeektuneConfig, run: RunDir) -> dict[str, Any]:
        from transformers import set_seed

        from seektune.data.prepare import prepare_data
        from seektune.models.load import load_model
        from seektune.models.methods import make_trainable
        from seektune.train.plan import check_fits
        from seektune.train.preference import train_by_objective

        check_fits(cfg)
        data = self.data
        if any(p.key.startswith("data.") for p in self.params):
            data = prepare_data(cfg.data, self.tokenizer, cfg.seed, run.data_dir)
        set_seed(cfg.seed)
        loaded = load_model(cfg.model, four_bit=cfg.method.name == "qlora")
        model, counts = make_trainable(
            loaded.model, cfg.method, loaded.family, cfg.train.gradient_checkpointing
        )
        # Optuna keeps intermediate values (the pruners' input) for one objective only.
        reporter = [PruningReporter(trial)] if len(self.cfg.tune.metrics()) == 1 else []
        # with a preference objective, eval_loss is the preference loss on the validation pairs
        result = train_by_objective(cfg, model, loaded.tokenizer, data, run, callbacks=reporter)
        trial.set_user_attr("steps", result.steps)
        metrics = {
            "eval_loss": result.eval_loss,
            "train_loss": result.train_loss,
            "trainable_params": counts.trainable,
            "train_runtime_s": round(result.runtime_s, 2),
            "tokens_per_s": result.tokens_per_s,
            "peak_memory_gb": result.peak_memory_gb,
        }
        if set(self.cfg.tune.metrics()) & set(EVAL_METRICS):
            metrics.update(_validation_scores(cfg, model, loaded.tokenizer, data))
        missing = [name for name in self.cfg.tune.metrics() if metrics.get(name) is None]
        if missing:
            raise UserError(f"the trial measured no {', '.join(missing)}: see the trial's log in {run.path}")
        return metrics


def _validation_scores(cfg: SeektuneConfig, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    """Evaluation metrics on the validation split (the test split stays untouched by the search)."""
    from seektune.data.prepare import PreparedData
    from seektune.evaluate.metrics import evaluate_model

    view = PreparedData(
        records={"test": data.records["validation"]}, tokenized={"test": data.tokenized["validation"]}
    )
    started = time.perf_counter()
    scores, generations = evaluate_model(model, tokenizer, view, cfg.eval, cfg.data.system_prompt, "trial")
    seconds = time.perf_counter() - started
    if generations:
        scores["latency_s"] = round(seconds / len(generations), 4)
    return scores


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# The search


def check_space(cfg: SeektuneConfig) -> list[Param]:
    """The space and the sampler's needs, checked before anything runs (no run directory yet)."""
    params = parse_space(cfg)
    if cfg.tune.sampler == "grid":
        grid_space(params)
    if cfg.tune.sampler == "cmaes" and len(cfg.tune.metrics()) > 1:
        raise UserError("tune.sampler cmaes optimises one objective: use tpe or random for several metrics")
    return params


def check_search(cfg: SeektuneConfig, data: Any) -> list[Param]:
    """Everything that would stop the search, checked before the first trial."""
    params = check_space(cfg)
    if not len(data.tokenized["validation"]) and (
        "eval_loss" in cfg.tune.metrics()
        or cfg.tune.pruner_name() != "none"
        or set(cfg.tune.metrics()) & set(EVAL_METRICS)
    ):
        raise UserError(
            "the search compares trials on the validation split, which is empty: set data.validation_ratio "
            "above 0 (or give validation files)"
        )
    if (
        set(cfg.tune.metrics()) & set(EVAL_METRICS)
        and "position_ids" in data.tokenized["validation"].column_names
    ):
        raise UserError(
            f"tune.metric {', '.join(set(cfg.tune.metrics()) & set(EVAL_METRICS))} scores the validation "
            "split example by example, but data.packing packed it: set data.packing: false, or tune.metric: "
            "eval_loss"
        )
    return params


def run_search(
    cfg: SeektuneConfig, run: RunDir, data: Any, tokenizer: Any, url: str | None = None
) -> TuneResult:
    """Run (or continue) the study until `tune.n_trials` trials are done or `tune.timeout_s` has passed."""

    params = check_search(cfg, data)
    url = url or storage_url(cfg, run)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, params, url, trial_rows(cfg, len(data.tokenized["train"])))
    recover_interrupted(study)
    if cfg.tune.include_config and cfg.tune.sampler != "grid" and not study.trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(config_values(cfg, params), user_attrs={"baseline": True})
    search = _Search(cfg, params, run, data, tokenizer)
    budget = cfg.tune.n_trials

    def after_trial(study: Any, _trial: Any) -> None:
        if cfg.tune.keep_models == "best":  # disk holds the best models so far, not every trial's
            _drop_other_models(study, {t.number for t in _best_trials(cfg, study)}, run)
        if finished_trials(study) >= budget:
            study.stop()

    done = finished_trials(study)
    log_event(logger, "search started", study=study.study_name, storage=url, done=done, budget=budget)
    if done < budget:
        study.optimize(
            search.objective,
            n_trials=budget - done,
            timeout=cfg.tune.timeout_s,
            callbacks=[after_trial],
            catch=(Exception,),
            gc_after_trial=True,
        )
    return _finish(cfg, params, study, url, run)


def trial_rows(cfg: SeektuneConfig, train_rows: int) -> int:
    """Training rows one trial trains on with the config's own settings (`max_steps` or `epochs`)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps * rows_per_step(
            cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        )
    return max(1, math.ceil(train_rows * cfg.train.epochs))


def _finish(cfg: SeektuneConfig, params: list[Param], study: Any, url: str, run: RunDir) -> TuneResult:
    from seektune.tune.report import write_tune_report

    best = _best_trials(cfg, study)
    result = TuneResult(study_name=study.study_name, storage=url)
    if cfg.tune.keep_models == "best":
        _drop_other_models(study, {t.number for t in best}, run)
    if best:
        chosen = best[0]
        values = {p.key: _config_value(p, chosen.params[p.key]) for p in params if p.key in chosen.params}
        tuned = apply_values(cfg, values).model_copy(deep=True)
        tuned.tune.enabled = False
        result.config_path = run.write_text(f"{TUNE_DIR}/best.yaml", _best_yaml(chosen, tuned))
        model = Path(chosen.user_attrs.get("model_dir", ""))
        if model.is_dir():
            target = run.path / "model"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(model, target)
            result.model_dir = target
        result.best = [
            {
                "number": t.number,
                "values": dict(zip(cfg.tune.metrics(), t.values, strict=True)),
                "params": t.params,
            }
            for t in best
        ]
    result.report = write_tune_report(study, run.path / TUNE_DIR, cfg.tune.metrics())
    log_event(logger, "search finished", study=study.study_name, best=result.best[:1])
    return result


def _best_trials(cfg: SeektuneConfig, study: Any) -> list[Any]:
    """The best trial (one objective) or the Pareto front, best on the first objective first."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    trials = [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)
    sign = 1 if cfg.tune.directions()[0] == "minimize" else -1
    return sorted(trials, key=lambda t: (sign * t.values[0], t.number))


def _drop_other_models(study: Any, keep: set[int], run: RunDir) -> None:
    """Delete the models of this run's trials that are not (or no longer) among the best."""
    trials_dir = (run.path / TUNE_DIR / "trials").resolve()
    for trial in study.get_trials(deepcopy=False):
        model = Path(trial.user_attrs.get("model_dir", ""))
        if trial.number not in keep and model.is_dir() and model.resolve().is_relative_to(trials_dir):
            shutil.rmtree(model, ignore_errors=True)


def _config_value(param: Param, value: Any) -> Any:
    return param.value_of(value) if param.type == "categorical" else value


def _best_yaml(trial: Any, cfg: SeektuneConfig) -> str:
    values = ", ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in zip(cfg.tune.metrics(), trial.values, strict=True)
    )
    header = (
        f"# The best trial of the search (trial {trial.number}: {values}); train it with `seektune train`.\n"
    )
    return header + config_to_yaml(cfg)
