"""Data-parallel runs: two CPU processes (gloo) under torchrun train exactly like one process.

The end-to-end tests launch `python -m torch.distributed.run --nproc_per_node 2 -m seektune.cli ...`
against a one-process run of the same config with the same global batch, and compare what each wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from seektune.config import validate_config
from seektune.data.prepare import load_prepared
from seektune.errors import UserError
from support import tiny_run_config

GLOBAL_BATCH = 8
STEPS = 4
WORDS = "the river runs past old stone houses while children count boats and birds above".split()  # noqa: SIM905


def _qa_file(folder: Path, n: int = 80) -> Path:
    """A small question/answer JSONL (much quicker to prepare than the built-in task)."""
    path = folder / "qa.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            question = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 9))
            answer = " ".join(WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(6 + (i * 11) % 25))
            row = {"question": f"Question {i}: what follows {question}?", "answer": f"Answer {i}: {answer}."}
            handle.write(json.dumps(row) + "\n")
    return path


def _launch(tmp_path: Path, base_cache: Path, processes: int, command: str, **sections) -> Path:
    """Run `seektune <command>` in `processes` processes on one global batch; return its output_dir."""
    folder = tmp_path / f"{command}-{processes}"
    folder.mkdir()
    raw = tiny_run_config(
        folder,
        base_cache,
        data={"sources": [{"path": str(_qa_file(folder))}], **sections.pop("data", {})},
        method={"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},  # no per-process RNG
        train={
            "batch_size": GLOBAL_BATCH // processes,
            "max_steps": STEPS,
            "logging_steps": 1,
            "report_to": [],
        },
        **sections,
    )
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    argv = [sys.executable, *(launcher if processes > 1 else []), "-m", "seektune.cli", command, str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return Path(raw["output_dir"])


def _only_run(output_dir: Path) -> Path:
    runs = [path for path in output_dir.iterdir() if path.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "model" / "adapter_model.safetensors").is_file()
    return run


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in json.loads((run / "train" / "history.json").read_text()) if "loss" in row]


def _events(run: Path, event: str) -> list[dict]:
    lines = (run / "logs" / "events.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["event"] == event]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, base_cache, packing):
    one = _only_run(_launch(tmp_path, base_cache, 1, "train", data={"packing": packing}))
    two = _only_run(_launch(tmp_path, base_cache, 2, "train", data={"packing": packing}))
    # Why the losses agree: accelerate shards each global batch of the one shared sampler order between
    # the processes (rank 0 the first 4 examples, rank 1 the next 4; seektune sizes the length-grouped
    # sampler by the global batch, so the order does not depend on the split), and the Trainer's
    # average_tokens_across_devices divides each process's summed token loss by the token count of the
    # whole global batch, so the averaged gradients and the logged mean loss are those of one process on
    # all 8 examples. Only the order of floating-point sums differs (measured: about 1e-7 relative).
    assert len(_losses(one)) == STEPS
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    trained_one = load_file(one / "model" / "adapter_model.safetensors")
    trained_two = load_file(two / "model" / "adapter_model.safetensors")
    assert trained_two.keys() == trained_one.keys()
    for name, tensor in trained_one.items():
        assert (trained_two[name] - tensor).abs().max().item() < 1e-4, name
    # One writer: rank 0 alone logged to the run's files and recorded the two processes.
    assert [row["processes"] for row in _events(two, "run started")] == [2]
    assert json.loads((two / "metrics.json").read_text())["train"]["steps"] == STEPS


@pytest.mark.slow
def test_run_under_two_processes_evaluates_once_in_rank_0(tmp_path, base_cache):
    run = _only_run(_launch(tmp_path, base_cache, 2, "run", eval={"max_new_tokens": 8}))
    evaluation = json.loads((run / "metrics.json").read_text())["eval"]
    assert set(evaluation) >= {"base", "tuned", "improvement"}
    answers = (run / "eval" / "tuned-answers.jsonl").read_text().splitlines()
    assert len(answers) == evaluation["tuned"]["n"]
    assert (run / "report.md").is_file()


def test_load_prepared_reads_back_every_split_an_empty_one_too(tmp_path):
    for kind in ("records", "tokenized"):
        for split, n in (("train", 3), ("validation", 0), ("test", 1)):
            rows = {"input_ids": [[1, 2, 3]] * n, "source": ["qa"] * n}
            Dataset.from_dict(rows).save_to_disk(str(tmp_path / kind / split))
    (tmp_path / "report.json").write_text(json.dumps({"fingerprint": "abc"}))
    data = load_prepared(tmp_path)
    assert {split: len(rows) for split, rows in data.tokenized.items()} == {
        "train": 3,
        "validation": 0,
        "test": 1,
    }
    assert data.tokenized["validation"].column_names == ["input_ids", "source"]
    assert data.records["train"][0] == {"input_ids": [1, 2, 3], "source": "qa"}
    assert data.report["fingerprint"] == "abc"


def test_load_prepared_without_prepared_data_names_the_command(tmp_path):
    with pytest.raises(UserError, match="seektune data prepare"):
        load_prepared(tmp_path)


def test_launch_refuses_what_several_processes_cannot_do_together(tmp_path, base_cache, monkeypatch):
    from seektune import pipeline

    monkeypatch.setattr(pipeline, "world_size", lambda: 2)
    pinned = validate_config(tiny_run_config(tmp_path, base_cache, model={"device": "cuda:1"}))
    with pytest.raises(UserError, match=re.escape("set model.device: auto")):
        pipeline._check_launch(pinned, "train")
    cfg = validate_config(tiny_run_config(tmp_path, base_cache))
    pipeline._check_launch(cfg, "run")  # plain data parallelism evaluates in rank 0
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=re.escape("eval.enabled: false")):
        pipeline._check_launch(cfg, "run")
    pipeline._check_launch(cfg, "train")  # training LoRA alone is fine under FSDP
    adapter = validate_config(tiny_run_config(tmp_path, base_cache, method={"name": "adapter"}))
    with pytest.raises(UserError, match=re.escape("use method.name lora")):
        pipeline._check_launch(adapter, "train")
