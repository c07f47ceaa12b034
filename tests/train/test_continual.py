"""Continual learning: priority replay (p_i ∝ rank_i^-alpha), layer freezing, and a whole round on the
reduced offline base from a registered version, where replay forgets less than plain fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from tinymodels import llama

from seektune.config import ContinualConfig, validate_config
from seektune.errors import UserError
from seektune.pipeline import run_train_stage
from seektune.registry.catalog import lineage
from seektune.registry.store import open_store
from seektune.train.continual import (
    freeze_below_top_layers,
    priority_probabilities,
    replay_count,
    sample_replay,
)
from support import tiny_run_config


def test_priorities_follow_the_loss_rank_to_the_power_minus_alpha():
    probabilities = priority_probabilities(np.array([0.1, 0.5, 0.3]), alpha=1.0)  # ranks 3, 1, 2
    assert probabilities == pytest.approx(np.array([1 / 3, 1, 1 / 2]) / (11 / 6))
    assert priority_probabilities(np.array([0.1, 0.5, 0.3]), alpha=0.0) == pytest.approx([1 / 3] * 3)
    squared = priority_probabilities(np.array([2.0, 1.0]), alpha=2.0)  # ranks 1, 2: weights 1, 1/4
    assert squared == pytest.approx([0.8, 0.2])


def test_replay_draws_high_loss_examples_more_often_and_is_seeded():
    losses = np.linspace(0, 1, 100)  # example 99 has the highest loss
    draws = np.concatenate([sample_replay(losses, 10, alpha=1.0, seed=s) for s in range(200)])
    assert np.mean(draws >= 90) > 0.3 > np.mean(draws < 10)  # the top tenth is drawn far more than the bottom
    assert sample_replay(losses, 10, 1.0, seed=7) == sample_replay(losses, 10, 1.0, seed=7)
    assert len(set(sample_replay(losses, 50, 3.0, seed=1))) == 50  # without replacement


def test_replay_count_makes_the_replayed_examples_the_share_of_the_mix():
    assert replay_count(80, 0.2, pool=100) == 20  # 20 of 100 = 0.2
    assert replay_count(50, 0.5, pool=100) == 50
    assert replay_count(50, 0.5, pool=10) == 10  # the pool is all there is
    assert replay_count(50, 0.0, pool=10) == 0


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_a_replay_share_outside_0_to_1_is_refused(share):
    with pytest.raises(ValidationError, match="share"):
        ContinualConfig(replay={"share": share})
    with pytest.raises(UserError, match=r"continual\.replay\.share: input should be"):
        validate_config({"continual": {"replay": {"share": share}}})


def test_freezing_keeps_only_the_top_layers_and_the_head_trainable():
    model = llama(num_hidden_layers=4)
    frozen = freeze_below_top_layers(model, share=0.3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert frozen.layers == [2, 3] or frozen.layers == [3]
    assert all(
        any(f"layers.{i}." in n for i in frozen.layers) or "norm" in n or "lm_head" in n for n in trainable
    )
    assert not any("embed_tokens" in n or "layers.0." in n for n in trainable)
    assert frozen.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = frozen.trainable / frozen.total
    assert held >= 0.3 or frozen.layers[0] == 0


def codes(path: Path, template: str, answer: str, n: int) -> Path:
    rows = [{"question": template.format(i=i), "answer": answer.format(i=i)} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_round_from_a_registered_version_forgets_less_with_replay_than_plain_fine_tuning(
    tmp_path, base_cache
):
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    old = codes(tmp_path / "old.jsonl", "What is code {i}?", "Code {i} is alpha.", 64)
    new = codes(tmp_path / "new.jsonl", "What is code {i} now?", "Code {i} is omega now.", 64)
    train = {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 16, "warmup_ratio": 0.0}
    data = {"validation_ratio": 0.0, "test_ratio": 0.25, "max_eval_samples": 16}
    first = tiny_run_config(
        tmp_path,
        base_cache,
        name="codes",
        data={**data, "sources": [{"path": str(old)}]},
        train=train,
        registry={"enabled": True, "url": url, "model_name": "codes"},
    )
    run_train_stage(validate_config(first))

    second = tiny_run_config(
        tmp_path,
        base_cache,
        name="codes-round",
        model={"name_or_path": "registry:codes@1.0.0"},
        data={**data, "sources": [{"path": str(new)}]},
        train={**train, "max_steps": 24},
        continual={"enabled": True, "replay": {"share": 0.3, "alpha": 1.0}, "trainable_share": 0.1},
        registry={"enabled": True, "url": url, "model_name": "codes"},
    )
    run = run_train_stage(validate_config(second))
    summary = json.loads(run.metrics_path.read_text())["continual"]
    assert summary["replay"]["pool"] == 48  # the first run's training split, found through the registry
    assert summary["replay"]["replayed"] == 21  # round(0.3 * 48 / 0.7): 30% of the mix
    assert summary["replay"]["share"] == pytest.approx(0.3, abs=0.01)
    assert summary["replay"]["replayed_mean_loss"] > summary["replay"]["pool_mean_loss"]  # by priority
    assert summary["freezing"]["trainable_layers"] == [1]  # the top layer of two
    forgetting, learning = summary["forgetting"], summary["learning"]
    assert forgetting["plain"] > 0  # plain fine-tuning on the new data alone forgets the old answers
    assert forgetting["continual"] < forgetting["plain"]
    assert learning["continual"] > 0 and learning["plain"] > 0
    report = run.report_path.read_text()
    assert "## Continual learning" in report and "| plain fine-tuning |" in report
    tree = lineage(open_store(url), "codes@1.1.0")["trees"][0]
    assert [v["version"] for v in tree["ancestors"]] == ["1.0.0"]


def test_a_round_without_earlier_data_says_where_to_name_it(tmp_path, base_cache):
    raw = tiny_run_config(tmp_path, base_cache, continual={"enabled": True})
    with pytest.raises(UserError, match=r"continual\.replay\.sources is empty"):
        run_train_stage(validate_config(raw))
    raw = tiny_run_config(tmp_path, base_cache, continual={"enabled": True}, train={"objective": "dpo"})
    with pytest.raises(UserError, match=r"continual\.enabled needs train\.objective sft"):
        run_train_stage(validate_config(raw))
