"""The search on the reduced tiny base: samplers, pruning, failures, resuming, workers, the result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from seektune.config import validate_config
from seektune.errors import UserError
from seektune.pipeline import run_pipeline, run_tune_stage
from seektune.tune.space import parse_space
from seektune.tune.study import open_storage, open_study
from support import tiny_run_config

BAD_LR = 1e-7  # learns nothing in a few steps: the pruner's clear case


def _config(tmp_path: Path, base_cache: Path, tune: dict, **sections):
    train = {"max_steps": 6, "eval_steps": 2, "logging_steps": 2, **sections.pop("train", {})}
    raw = tiny_run_config(tmp_path, base_cache, train=train, tune={"enabled": True, **tune}, **sections)
    return validate_config(raw)


def _study(run_dir: Path) -> optuna.Study:
    url = f"sqlite:///{run_dir / 'tune' / 'study.db'}"
    return optuna.load_study(study_name="t", storage=url)


def test_tpe_search_prunes_a_hopeless_trial_and_keeps_the_best(tmp_path, base_cache):
    space = {"train.learning_rate": [3e-3, BAD_LR, 1e-2]}
    cfg = _config(tmp_path, base_cache, {"n_trials": 3, "pruner_startup_trials": 1, "space": space})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"storage": url})})
    # The first two trials are queued: the config's learning rate, then one that learns nothing.
    queued = open_study(cfg, parse_space(cfg), url)
    queued.enqueue_trial({"train.learning_rate": 3e-3}, user_attrs={"baseline": True})
    queued.enqueue_trial({"train.learning_rate": BAD_LR})
    run = run_tune_stage(cfg).path

    study = optuna.load_study(study_name="t", storage=url)
    first, hopeless, third = study.trials
    assert first.state == TrialState.COMPLETE and first.user_attrs["steps"] == 6
    assert sorted(first.intermediate_values) == [32, 64, 96]  # reported against rows seen (16 per step)
    # Median pruner, one startup trial: at its first evaluation the hopeless trial is above the median.
    assert hopeless.state == TrialState.PRUNED and hopeless.user_attrs["pruned_at"] == 2
    assert hopeless.user_attrs["steps"] == 2 and list(hopeless.intermediate_values) == [32]
    assert not (Path(hopeless.user_attrs["run_dir"]) / "model").exists()
    assert third.state in (TrialState.COMPLETE, TrialState.PRUNED)
    best = study.best_trial
    # The result: the best trial's config, ready to train, and its model in the run directory.
    tuned = yaml.safe_load((run / "tune" / "best.yaml").read_text())
    assert tuned["train"]["learning_rate"] == best.params["train.learning_rate"]
    assert tuned["tune"]["enabled"] is False
    assert (run / "model" / "adapter_config.json").is_file()
    kept = [t.number for t in study.trials if (Path(t.user_attrs["run_dir"]) / "model").exists()]
    assert kept == [best.number]  # tune.keep_models: best
    assert not any((Path(t.user_attrs["run_dir"]) / "checkpoints").exists() for t in study.trials)
    report = (run / "tune" / "report.md").read_text()
    assert "pruned at step 2" in report and (run / "tune" / "trials.csv").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tune"]["best"][0]["number"] == best.number
    run_report = (run / "report.md").read_text()
    assert "## Hyperparameter search" in run_report
    assert f"the best, trial {best.number}, reached" in run_report


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, base_cache):
    # include_experts needs LoRA dropout 0: with the tiny config's 0.05 that trial stops with a UserError.
    space = {"method.lora.include_experts": [False, True]}
    cfg = _config(
        tmp_path, base_cache, {"n_trials": 4, "sampler": "grid", "space": space}, train={"max_steps": 2}
    )
    run = run_tune_stage(cfg).path
    study = _study(run)
    assert len(study.trials) == 2  # the grid has two points: the study stops there, below n_trials
    by_value = {t.params["method.lora.include_experts"]: t for t in study.trials}
    assert by_value[False].state == TrialState.COMPLETE
    assert by_value[True].state == TrialState.FAIL and "dropout" in by_value[True].user_attrs["error"]
    assert "dropout" in (run / "tune" / "report.md").read_text()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow  # a trained study twice: ~16 s, kept out of the fast part
def test_resume_continues_the_study_and_runs_an_interrupted_trial_again(tmp_path, base_cache):
    space = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    tune = {"n_trials": 1, "sampler": "random", "pruner": "none", "space": space}
    first_run = run_tune_stage(_config(tmp_path, base_cache, tune, train={"max_steps": 2})).path
    # As if the worker had been killed in its second trial: RUNNING for good, its process gone.
    study = _study(first_run)
    killed = study.ask({"train.learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
    killed.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    (first_run / "status.json").write_text(json.dumps({"state": "running"}))

    more = _config(tmp_path, base_cache, {**tune, "n_trials": 3}, train={"max_steps": 2})
    second_run = run_tune_stage(more, resume=True).path
    assert second_run != first_run
    trials = _study(first_run).trials  # the study lives on where it started
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[0].user_attrs["baseline"] and len([t for t in trials if t.user_attrs.get("baseline")]) == 1
    assert trials[1].user_attrs["interrupted"] is True
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert (second_run / "tune" / "best.yaml").is_file()
    with pytest.raises(UserError, match="nothing to resume: no unfinished search named 't'"):
        run_tune_stage(more, resume=True)  # both runs completed now


@pytest.mark.slow
def test_pareto_front_of_loss_against_trainable_parameters(tmp_path, base_cache):
    tune = {
        "n_trials": 2,
        "sampler": "grid",
        "metric": ["eval_loss", "trainable_params"],
        "space": {"method.lora.r": [1, 8]},
    }
    run = run_tune_stage(_config(tmp_path, base_cache, tune, train={"max_steps": 2})).path
    study = _study(run)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    params = {t.params["method.lora.r"]: t.values[1] for t in study.trials}
    assert params[8] == 8 * params[1]  # LoRA's trainable parameters grow with the rank
    assert (run / "tune" / "plots" / "pareto.png").is_file()


def test_a_study_refuses_another_space_under_its_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = validate_config({"name": "s", "tune": {"space": {"train.learning_rate": [1e-3, 2e-3]}}})
    open_study(first, parse_space(first), url)
    other = validate_config({"name": "s", "tune": {"space": {"method.lora.r": [4, 8]}}})
    with pytest.raises(UserError, match=r"study .s. in .* was made with another search space"):
        open_study(other, parse_space(other), url)
    maximise = validate_config(
        {"name": "s", "tune": {"space": {"train.learning_rate": [1e-3, 2e-3]}, "direction": "maximize"}}
    )
    with pytest.raises(UserError, match="optimises in another direction"):
        open_study(maximise, parse_space(maximise), url)


@pytest.mark.parametrize("url", ["journal:/no/such/folder/study.log", "postgresql://nobody@127.0.0.1:1/none"])
def test_a_storage_that_cannot_open_is_one_clear_error(url):
    with pytest.raises(UserError, match=r"cannot open tune\.storage"):
        open_storage(url)


def test_contradictory_objectives_are_refused_by_the_config():
    with pytest.raises(UserError, match="Optuna cannot prune a multi-objective study"):
        validate_config({"tune": {"metric": ["eval_loss", "latency_s"], "pruner": "median"}})
    with pytest.raises(UserError, match=r"tune\.pruner stops trials from the validation loss"):
        validate_config({"tune": {"metric": "rouge_l", "pruner": "hyperband"}})
    assert validate_config({"tune": {"metric": "rouge_l"}}).tune.pruner_name() == "none"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "cmaes"])
def test_other_samplers_run_a_small_study(tmp_path, base_cache, sampler):
    space = {
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    }
    tune = {"n_trials": 3, "sampler": sampler, "pruner": "none", "space": space}
    run = run_tune_stage(_config(tmp_path, base_cache, tune, train={"max_steps": 2})).path
    study = _study(run)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["train.learning_rate"] for t in study.trials}) == 3


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, base_cache):
    journal = tmp_path / "shared.log"
    space = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    tune = {"n_trials": 4, "sampler": "tpe", "storage": f"journal:{journal}", "space": space}
    config = tmp_path / "tune.yaml"
    raw = tiny_run_config(
        tmp_path, base_cache, train={"max_steps": 4, "eval_steps": 2}, tune={"enabled": True, **tune}
    )
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "seektune.cli", "tune", str(config)], env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err.decode()[-2000:]
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="t", storage=JournalStorage(JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # the budget is the study's; a worker may start one as the other ends
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both worked on it
    assert len([t for t in study.trials if t.user_attrs.get("baseline")]) >= 1
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "tune" / "best.yaml").is_file() for run in runs)


@pytest.mark.slow
def test_run_with_a_tune_section_evaluates_the_best_trial(tmp_path, base_cache):
    space = {"method.lora.r": [2, 8]}
    cfg = _config(
        tmp_path, base_cache, {"n_trials": 2, "sampler": "grid", "space": space}, train={"max_steps": 4}
    )
    run = run_pipeline(cfg).path
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"base", "tuned"} <= set(metrics["eval"]) and metrics["tune"]["best"]
    assert metrics["eval"]["tuned"]["perplexity"] < metrics["eval"]["base"]["perplexity"]
