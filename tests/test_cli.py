"""The CLI: dispatch, one-line errors with exit code 2, config commands."""

import json
from pathlib import Path

import pytest

from seektune.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_show_prints_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n")
    code, out, _ = run_cli(["config", "show", str(path), "--set", "method.lora.r=4"], capsys)
    assert code == 0
    assert "learning_rate: 0.001" in out
    assert "r: 4" in out
    assert "max_grad_norm: 1.0" in out  # defaults are written out


def test_config_schema_is_json(capsys):
    code, out, _ = run_cli(["config", "schema"], capsys)
    assert code == 0
    assert "train" in json.loads(out)["properties"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "missing.yaml"], "config file missing.yaml does not exist"),
        (["config", "show", "{cfg}", "--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["config", "show", "{cfg}", "--set", "train.batch_size=x"], "train.batch_size"),
        (["tune", "{cfg}"], "tune.space is empty"),
        (
            ["tune", "{cfg}", "--set", "tune.space={train.learnin_rate: [0.1]}"],
            "did you mean 'learning_rate'",
        ),
        (
            [
                "tune",
                "{cfg}",
                "--set",
                "tune.storage=journal:/no/dir/x.log",
                "--set",
                "tune.space={seed: [1]}",
            ],
            "tune.storage",
        ),
        (["run", "{cfg}", "--set", "tune.enabled=true"], "tune.space is empty"),
        (["serve", "./no-such-model"], "./no-such-model does not exist"),
        (["registry", "show", "nobody@1.0.0"], "no model named 'nobody'"),
        (["registry", "promote", "nobody@1.0.0", "live"], "stage 'live' is not one of"),
        (["run", "{cfg}", "--set", "method.name=prefix", "--set", "data.packing=true"], "data.packing"),
        (["train", "{cfg}", "--set", "method.name=bogus"], "method.name"),
        (["train", "{cfg}", "--set", "method.name=qlora", "--set", "model.device=cpu"], "needs a CUDA GPU"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, args, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    code, _, err = run_cli([a.replace("{cfg}", str(cfg)) for a in args], capsys)
    assert code == 2
    assert expected in err
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_model_path_fails_cleanly_before_a_run_directory_is_made(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\nmodel:\n  name_or_path: {tmp_path / 'no-such-model'}\n")
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert code == 2
    assert "no-such-model" in err and "is not a directory" in err
    assert not (tmp_path / "runs").exists()  # the memory check reads the model config first


def test_eval_of_a_missing_model_path_marks_its_run_directory_failed(tmp_path, capsys, base_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\nmodel:\n  cache_dir: {base_cache}\n"
        f"  base: {json.dumps(_tiny_recipe())}\n"
    )
    code, _, err = run_cli(["eval", str(cfg), "--model", str(tmp_path / "no-such-model")], capsys)
    assert code == 2 and "is not a directory" in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "no-such-model" in status["error"]
    assert (run_dir / "config.yaml").is_file()


def test_empty_dataset_is_a_user_error(tmp_path, capsys, base_cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\nmodel:\n  cache_dir: {base_cache}\n"
        f"  base: {json.dumps(_tiny_recipe())}\ndata:\n  sources:\n    - path: {empty}\n"
    )
    code, _, err = run_cli(["data", "prepare", str(cfg)], capsys)
    assert code == 2
    assert "empty.jsonl has no records (the file is empty)" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "run", str(tmp_path / "missing.yaml")])


def test_log_json_emits_json_events(tmp_path, capsys, base_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\nmodel:\n  cache_dir: {base_cache}\n"
        f"  base: {json.dumps(_tiny_recipe())}\ndata:\n  max_train_samples: 8\n  max_eval_samples: 4\n"
    )
    code, out, err = run_cli(["--log-json", "data", "prepare", str(cfg)], capsys)
    assert code == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(e["event"] == "data prepared" and e["train"] == 8 for e in events)
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0].strip())
    assert (run_dir / "data" / "train.jsonl").is_file()
    assert (run_dir / "logs" / "events.jsonl").is_file()


def _tiny_recipe() -> dict:
    from support import TINY_RECIPE

    return TINY_RECIPE


def test_log_json_errors_are_json(tmp_path, capsys):
    code, _, err = run_cli(["--log-json", "run", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    event = json.loads(err.strip().splitlines()[-1])
    assert event["level"] == "ERROR" and "does not exist" in event["error"]


def test_empty_test_split_stops_before_training(tmp_path, capsys, base_cache):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\nmodel:\n  cache_dir: {base_cache}\n"
        f"  base: {json.dumps(_tiny_recipe())}\ndata:\n  test_ratio: 0\n  sources:\n    - path: {data}\n"
    )
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert code == 2
    assert "test split is empty" in err
