"""The search report: studies built in memory with `create_trial`, no training."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
import optuna.visualization.matplotlib
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from seektune.tune.report import write_tune_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
    "lora_r": IntDistribution(4, 32),
    "target_modules": CategoricalDistribution(['["q_proj", "v_proj"]', "all-linear"]),
}
LONG_ERROR = "CUDA out of memory. Tried to allocate 2.00 GiB; " + "x" * 200 + " END-OF-ERROR"


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _params(lr: float, r: int, target: str = "all-linear") -> dict[str, Any]:
    return {"learning_rate": lr, "lora_r": r, "target_modules": target}


def _add(study: optuna.Study, state: TrialState, params: dict[str, Any], **kwargs: Any) -> None:
    study.add_trial(create_trial(state=state, params=params, distributions=SPACE, **kwargs))


def _single_objective_study(direction: str = "minimize") -> optuna.Study:
    """Baseline 2.0 (trial 0), best 1.5 (trial 1), a pruned and a failed trial; 423 steps, 20 pruned."""
    study = optuna.create_study(directions=[direction], study_name="search-demo")
    study.set_user_attr("sampler", "TPESampler(seed=7)")
    study.set_user_attr("pruner", "MedianPruner(n_warmup_steps=10)")
    attrs = {"steps": 100, "runtime_s": 30.0}
    _add(study, TrialState.COMPLETE, _params(1e-4, 8), value=2.0, user_attrs={**attrs, "baseline": True})
    _add(study, TrialState.COMPLETE, _params(3e-4, 16, '["q_proj", "v_proj"]'), value=1.5, user_attrs=attrs)
    _add(study, TrialState.COMPLETE, _params(1e-3, 4), value=1.8, user_attrs={**attrs, "model_dir": "/m/2"})
    _add(study, TrialState.COMPLETE, _params(5e-4, 32, '["q_proj", "v_proj"]'), value=1.6, user_attrs=attrs)
    _add(
        study,
        TrialState.PRUNED,
        _params(1e-2, 4),
        intermediate_values={10: 2.7, 20: 2.5},
        user_attrs={"steps": 20, "pruned_at": 20},
    )
    _add(study, TrialState.FAIL, _params(1e-2, 32), user_attrs={"steps": 3, "error": LONG_ERROR})
    return study


@pytest.fixture(scope="module")
def single_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("single") / "tune"
    return out_dir, write_tune_report(_single_objective_study(), out_dir, ["eval_loss"])


def _report_text(out_dir: Path) -> str:
    return (out_dir / "report.md").read_text(encoding="utf-8")


def _trial_rows(report: str) -> dict[str, str]:
    """The rows of the 'All trials' table by trial number."""
    table = report.split("### All trials", 1)[1]
    cells = [(line.split("|")[1].strip(), line) for line in table.splitlines() if line.startswith("| ")]
    return {number: line for number, line in cells if number.isdigit()}


def test_files_are_written_and_summary_is_json(single_report: tuple[Path, dict[str, Any]]) -> None:
    out_dir, summary = single_report
    assert summary["plots"] == ["plots/history.png", "plots/importance.png", "plots/slice.png"]
    assert summary["skipped_plots"] == {}
    for rel in summary["plots"]:
        assert (out_dir / rel).read_bytes().startswith(PNG_MAGIC)
        assert f"]({rel})" in _report_text(out_dir)
    assert not (out_dir / "plots" / "pareto.png").exists()
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_best_trial_baseline_and_improvement(single_report: tuple[Path, dict[str, Any]]) -> None:
    out_dir, summary = single_report
    assert summary["study"] == "search-demo" and "- Study: search-demo" in _report_text(out_dir)
    assert summary["trials"] == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert summary["best"]["number"] == 1
    assert summary["best"]["values"] == {"eval_loss": 1.5}
    assert summary["best"]["params"] == _params(3e-4, 16, '["q_proj", "v_proj"]')
    assert summary["baseline"]["number"] == 0
    assert summary["improvement"] == {"eval_loss": pytest.approx(-0.25)}  # (1.5 - 2.0) / 2.0
    assert summary["steps"] == {"total": 423, "pruned": 20}  # 4 × 100 + 20 + 3
    assert set(summary["importances"]) == set(SPACE)
    assert sum(summary["importances"].values()) == pytest.approx(1.0)
    report = _report_text(out_dir)
    assert report.startswith("## Hyperparameter search")
    assert "25% lower eval\\_loss than the config's own values (trial 0: 2 → 1.5)" in report
    assert "Trial 1: eval\\_loss 1.5." in report
    assert "Sampler: TPESampler(seed=7)" in report and "MedianPruner(n\\_warmup\\_steps=10)" in report
    assert "Trials: 6 (4 complete, 1 pruned, 1 failed)" in report
    assert "423 in all; pruned trials used 20 of them (4.73%)" in report


def test_pruned_and_failed_trials_have_their_note(single_report: tuple[Path, dict[str, Any]]) -> None:
    rows = _trial_rows(_report_text(single_report[0]))
    assert set(rows) == {"0", "1", "2", "3", "4", "5"}
    assert "pruned" in rows["4"] and "pruned at step 20" in rows["4"]
    assert "failed" in rows["5"] and "CUDA out of memory" in rows["5"]
    note = rows["5"].rstrip(" |").rsplit("|", 1)[1].strip()
    assert note.endswith("…") and len(note) == 80 and "END-OF-ERROR" not in rows["5"]
    assert "the config's own values" in rows["0"]


def test_csv_has_a_row_per_trial_with_param_columns(single_report: tuple[Path, dict[str, Any]]) -> None:
    with (single_report[0] / "trials.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["number"] for row in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [row["state"] for row in rows] == ["COMPLETE"] * 4 + ["PRUNED", "FAIL"]
    assert rows[1]["eval_loss"] == "1.5" and rows[5]["eval_loss"] == ""
    assert rows[1]["param.target_modules"] == '["q_proj", "v_proj"]'
    assert rows[3]["param.lora_r"] == "32" and float(rows[2]["param.learning_rate"]) == 1e-3
    assert rows[4]["pruned_at"] == "20" and rows[5]["error"] == LONG_ERROR
    assert rows[0]["baseline"] == "True" and rows[2]["model_dir"] == "/m/2" and rows[0]["steps"] == "100"


def test_one_complete_trial_skips_the_plots_and_says_why(tmp_path: Path) -> None:
    study = optuna.create_study(direction="minimize", study_name="tiny")
    _add(study, TrialState.COMPLETE, _params(1e-4, 8), value=2.0, user_attrs={"steps": 5, "baseline": True})
    _add(study, TrialState.PRUNED, _params(1e-3, 8), intermediate_values={3: 3.0}, user_attrs={"steps": 3})
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "slice.png").write_bytes(b"stale")
    summary = write_tune_report(study, tmp_path, ["eval_loss"])
    assert summary["plots"] == [] and summary["importances"] == {}
    assert set(summary["skipped_plots"]) == {"history", "importance", "slice"}
    assert not (tmp_path / "plots" / "slice.png").exists()
    report = _report_text(tmp_path)
    assert "- No importance plot: needs at least 2 complete trials; the study has 1." in report
    assert "- No slice plot: needs at least 2 complete trials; the study has 1." in report
    assert "![" not in report
    assert "The config's own values (trial 0) are the best the search found." in report
    assert "pruned at step 3" in _trial_rows(report)["1"]  # no pruned_at attr: Optuna's last step
    json.dumps(summary, allow_nan=False)


def test_same_params_everywhere_skips_importance_and_slice(tmp_path: Path) -> None:
    study = optuna.create_study(direction="minimize")
    for value in (2.0, 1.9, 2.1):
        _add(study, TrialState.COMPLETE, _params(1e-4, 8), value=value)
    summary = write_tune_report(study, tmp_path, ["eval_loss"])
    assert summary["plots"] == ["plots/history.png"]
    assert "same parameter values" in summary["skipped_plots"]["importance"]
    assert "same parameter values" in summary["skipped_plots"]["slice"]
    assert "no baseline to compare with" in _report_text(tmp_path) and summary["improvement"] == {}


def test_maximised_metric_improvement_reads_higher(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, _params(1e-4, 8), value=0.4, user_attrs={"baseline": True})
    _add(study, TrialState.COMPLETE, _params(1e-3, 16), value=0.5)
    _add(study, TrialState.COMPLETE, _params(1e-5, 4), value=0.3)
    summary = write_tune_report(study, tmp_path, ["rouge_l"])
    assert summary["best"]["number"] == 1
    assert summary["improvement"] == {"rouge_l": pytest.approx(0.25)}  # (0.5 - 0.4) / 0.4
    assert "25% higher rouge\\_l than the config's own values (trial 0: 0.4 → 0.5)." in _report_text(tmp_path)


def test_multi_objective_draws_the_pareto_front_and_lists_it(tmp_path: Path) -> None:
    # A (1.0, 100) and B (2.0, 50) are the front; the baseline (2.0, 80) is dominated by B.
    study = optuna.create_study(directions=["minimize", "minimize"])
    _add(study, TrialState.COMPLETE, _params(1e-4, 8), values=[2.0, 80], user_attrs={"baseline": True})
    _add(study, TrialState.COMPLETE, _params(1e-3, 16), values=[1.0, 100])
    _add(study, TrialState.COMPLETE, _params(1e-5, 4), values=[2.0, 50])
    _add(study, TrialState.COMPLETE, _params(3e-3, 32), values=[2.5, 120])
    summary = write_tune_report(study, tmp_path, ["eval_loss", "trainable_params"])
    assert "best" not in summary
    assert [entry["number"] for entry in summary["pareto"]] == [1, 2]
    assert summary["pareto"][0]["values"] == {"eval_loss": 1.0, "trainable_params": 100.0}
    assert (tmp_path / "plots" / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    assert summary["plots"][0] == "plots/pareto.png" and "history" not in summary["skipped_plots"]
    assert summary["improvement_trial"] == 1
    assert summary["improvement"] == {
        "eval_loss": pytest.approx(-0.5),
        "trainable_params": pytest.approx(0.25),
    }
    report = _report_text(tmp_path)
    front = report.split("### Pareto front", 1)[1].split("###", 1)[0]
    assert "| 1 | 1 | 100 |" in front and "| 2 | 2 | 50 |" in front and "| 3 |" not in front
    assert "Trial 1 reached 50% lower eval\\_loss than the config's own values" in report
    assert (
        "25% higher trainable\\_params than the config's own values (trial 0: 80 → 100), which is worse"
        in report
    )
    json.dumps(summary, allow_nan=False)


def test_three_objectives_skip_the_pareto_plot(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    _add(study, TrialState.COMPLETE, _params(1e-4, 8), values=[2.0, 80, 0.1])
    summary = write_tune_report(study, tmp_path, ["eval_loss", "trainable_params", "rouge_l"])
    assert summary["skipped_plots"]["pareto"] == "needs at least 2 complete trials; the study has 1"
    assert [entry["number"] for entry in summary["pareto"]] == [0]


def test_failing_evaluator_and_plot_are_skipped_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("evaluator exploded")

    monkeypatch.setattr(optuna.importance, "get_param_importances", broken)
    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_slice", broken)
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    for index, values in enumerate(([2.0, 80, 0.1], [1.0, 90, 0.2], [1.5, 70, 0.3])):
        _add(study, TrialState.COMPLETE, _params(10 ** -(index + 3), 8 + index), values=values)
    summary = write_tune_report(study, tmp_path, ["eval_loss", "trainable_params", "rouge_l"])
    assert summary["plots"] == [] and summary["importances"] == {}
    assert (
        summary["skipped_plots"]["pareto"]
        == "a Pareto front is drawn for 2 objectives only; this study has 3"
    )
    assert (
        summary["skipped_plots"]["importance"]
        == "the importance evaluator failed: RuntimeError: evaluator exploded"
    )
    assert summary["skipped_plots"]["slice"] == "drawing failed: RuntimeError: evaluator exploded"
    assert "No slice plot: drawing failed" in _report_text(tmp_path)


def test_figures_are_closed(single_report: tuple[Path, dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_metric_names_must_match_the_objectives(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 metric names for 1 objectives"):
        write_tune_report(optuna.create_study(), tmp_path, ["eval_loss", "trainable_params"])
