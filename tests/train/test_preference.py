"""Preference tuning (DPO, KTO, ORPO through TRL) on the reduced offline base, from prompt/chosen/rejected
rows through the data stage: the model learns to prefer the chosen answers, the saved model is the trained
one (no reference adapter), and broken pairs are refused with a message that says what is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from seektune.config import validate_config
from seektune.errors import UserError
from seektune.pipeline import run_data_stage, run_train_stage
from support import tiny_run_config

THINGS = ["apple", "sky", "leaf", "coal", "snow", "sun", "rose", "stone", "car", "cup", "door", "hat"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]


def write_pairs(path: Path, n: int = 48, **extra_rows: dict) -> Path:
    rows = [
        {
            "prompt": f"What colour is the {THINGS[i % len(THINGS)]} number {i}?",
            "chosen": f"The {THINGS[i % len(THINGS)]} is {COLOURS[i % len(COLOURS)]}.",
            "rejected": "I do not know, sorry.",
        }
        for i in range(n)
    ]
    rows += list(extra_rows.values())
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def preference_config(tmp_path: Path, base_cache: Path, objective: str = "dpo", **sections) -> dict:
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    train = {"objective": objective, "max_steps": 8, "learning_rate": 5e-3, "batch_size": 8, "eval_steps": 4}
    return tiny_run_config(
        tmp_path,
        base_cache,
        data={"sources": [{"path": str(pairs)}], "validation_ratio": 0.15, "test_ratio": 0.25},
        train={**train, **sections.pop("train", {})},
        **sections,
    )


def test_dpo_lora_learns_to_prefer_the_chosen_answers_and_saves_only_the_trained_adapter(
    tmp_path, base_cache
):
    run = run_train_stage(validate_config(preference_config(tmp_path, base_cache)))
    metrics = json.loads(run.metrics_path.read_text())["train"]
    assert metrics["test_rewards/accuracies"] >= 0.9  # held-out pairs: chosen scored above rejected
    assert metrics["test_rewards/margins"] > 0.5
    history = json.loads((run.path / "train" / "history.json").read_text())
    assert any("rewards/margins" in row for row in history)
    assert any("eval_rewards/accuracies" in row for row in history)
    losses = [row["loss"] for row in history if "loss" in row]
    assert losses[-1] < losses[0]
    model = run.path / "model"
    assert not (model / "ref").exists()  # TRL's reference adapter is not part of the result
    weights = load_file(model / "adapter_model.safetensors")
    assert all(".ref." not in key for key in weights)
    assert any("lora_B" in key and weights[key].abs().sum() > 0 for key in weights)  # B started at zero
    # the data stage wrote the pairs in TRL's conversational form: they load again as a source
    first = json.loads((run.data_dir / "train.jsonl").read_text().splitlines()[0])
    assert (
        first["chosen"][0]["role"] == "assistant"
        and first["rejected"][0]["content"] == "I do not know, sorry."
    )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_kto_and_orpo_train_on_the_same_pairs(tmp_path, base_cache, objective):
    run = run_train_stage(validate_config(preference_config(tmp_path, base_cache, objective)))
    metrics = json.loads(run.metrics_path.read_text())["train"]
    assert metrics["steps"] == 8
    assert metrics["test_rewards/margins"] > 0
    assert (run.path / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_full_fine_tuning_trains_against_a_frozen_copy(tmp_path, base_cache):
    raw = preference_config(tmp_path, base_cache, method={"name": "full"}, train={"learning_rate": 1e-4})
    run = run_train_stage(validate_config(raw))
    metrics = json.loads(run.metrics_path.read_text())["train"]
    assert metrics["test_rewards/margins"] > 0
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (run.path / "model" / "config.json").is_file()


def test_sft_rows_for_dpo_are_refused_before_training(tmp_path, base_cache):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(32)))
    raw = preference_config(tmp_path, base_cache)
    raw["data"]["sources"] = [{"path": str(chats)}]
    with pytest.raises(
        UserError, match=r"train\.objective dpo trains on preference pairs, but \d+ of \d+ training"
    ):
        run_train_stage(validate_config(raw))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "Q", "chosen": "same", "rejected": "same"},
            "'chosen' and 'rejected' are the same answer",
        ),
        (
            {"prompt": "Q", "chosen": "good"},
            "a preference pair needs both 'chosen' and 'rejected'; this row has no 'rejected'",
        ),
    ],
)
def test_a_broken_pair_stops_the_data_stage_with_its_line(tmp_path, base_cache, row, message):
    raw = preference_config(tmp_path, base_cache)
    write_pairs(Path(raw["data"]["sources"][0]["path"]), bad=row)
    with pytest.raises(UserError, match=r"pairs\.jsonl:49: " + re.escape(message)):
        run_data_stage(validate_config(raw))
    raw["data"]["on_error"] = "skip"
    run = run_data_stage(validate_config(raw))
    assert json.loads((run.data_dir / "report.json").read_text())["splits"]["train"] > 0


def test_rejected_answers_are_masked_and_pairs_equal_after_cleaning_are_dropped(tmp_path, base_cache):
    raw = preference_config(tmp_path, base_cache)
    write_pairs(
        Path(raw["data"]["sources"][0]["path"]),
        leak={"prompt": "Who to call?", "chosen": "Ask the office.", "rejected": "Mail bob@example.com now."},
        same={"prompt": "Hi?", "chosen": "<b>Hello</b>", "rejected": "Hello"},
    )
    raw["data"].update(validation_ratio=0, test_ratio=0)
    run = run_data_stage(validate_config(raw))
    rows = [json.loads(line) for line in (run.data_dir / "train.jsonl").read_text().splitlines()]
    leaked = next(row for row in rows if row["prompt"][0]["content"] == "Who to call?")
    assert "bob@example.com" not in leaked["rejected"][0]["content"]
    assert "<EMAIL>" in leaked["rejected"][0]["content"]
    assert all(row["prompt"][0]["content"] != "Hi?" for row in rows)
    report = json.loads((run.data_dir / "report.json").read_text())
    clean = next(step for step in report["steps"] if step["step"] == "clean")
    assert clean["removed"].get("same_answers") == 1
