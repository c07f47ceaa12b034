"""Real tokens per second, FLOPs per token, MFU and peak memory; what a training log line carries."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from tinymodels import deepseek_v3, domain_split, llama

from seektune.config import MethodConfig, TrainConfig
from seektune.errors import UserError
from seektune.models.families import FAMILIES
from seektune.models.methods import apply_method
from seektune.rundir import RunDir
from seektune.train import throughput
from seektune.train.throughput import ThroughputMeter, training_flops_per_token
from seektune.train.trainer import train

# The tiny Llama's matmul weights: per block q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down
# 32x64 (9,216), two blocks, and the untied head 64x32; embeddings are a lookup and count nothing.
LLAMA_MATMUL_WEIGHTS = 2 * 9_216 + 2_048
# Attention: 6 FLOPs x 2 blocks x 4 heads x (8 + 8) head dims x half of 16 positions.
LLAMA_ATTENTION_AT_16 = 6 * 2 * 4 * 16 * 8


def test_full_fine_tuning_costs_six_flops_per_weight_plus_attention():
    model = llama()
    assert training_flops_per_token(model, 16) == 6 * LLAMA_MATMUL_WEIGHTS + LLAMA_ATTENTION_AT_16


def test_frozen_weights_cost_four_flops_and_lora_weights_six():
    model = llama()
    peft_model, _ = apply_method(model, _lora(), FAMILIES["llama"])
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora > 0
    expected = 4 * LLAMA_MATMUL_WEIGHTS + 6 * lora + LLAMA_ATTENTION_AT_16
    assert training_flops_per_token(peft_model, 16) == expected


def test_routed_experts_count_with_the_share_each_token_meets():
    model = deepseek_v3()
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert routed > 0
    everything = training_flops_per_token(model, 2)
    model.config.num_experts_per_tok = 4  # every token meets every expert
    assert training_flops_per_token(model, 2) - everything == pytest.approx(6 * routed / 2)


def test_meter_counts_real_tokens_over_training_time_only(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_per_token=100.0, peak_flops=1e4, device=torch.device("cpu"), world=1)
    meter.count(300)
    meter.exclude(4.0)  # an evaluation inside the interval
    first = meter.measure()  # at t=10: 300 tokens in 6 s of training
    assert first["tokens_per_s"] == 50.0
    assert first["mfu"] == pytest.approx(50.0 * 100.0 / 1e4)
    assert first["peak_memory_gb"] > 0
    meter.count(100)
    second = meter.measure()  # at t=20
    assert second["tokens_per_s"] == 10.0
    assert meter.overall()["tokens_per_s"] == pytest.approx(400 / 16)


def test_cpu_peak_is_measured_and_unknown_gpus_have_none(monkeypatch):
    peak = throughput.device_peak_flops(torch.device("cpu"), "fp32")
    assert 1e8 < peak < 1e14
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    assert throughput.device_peak_flops(torch.device("cuda", 0), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.device_peak_flops(torch.device("cuda", 0), "bf16") == 989e12


def test_every_training_log_line_has_throughput_and_tensorboard_gets_it(tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SimpleNamespace(
        tokenized={"train": domain_split({"easy": 8, "hard": 8}), "validation": domain_split({"easy": 2}, 1)},
        report={"train_tokens": 100, "splits": {"train": 16}},
    )
    cfg = TrainConfig(learning_rate=0.01, batch_size=4, max_steps=4, logging_steps=2, precision="fp32")
    run = RunDir.create(tmp_path, "t")
    result = train(cfg, llama(), tokenizer, data, run, seed=0)
    lines = [row for row in result.history if "loss" in row]
    assert [row["step"] for row in lines] == [2, 4]
    for row in lines:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_memory_gb"] > 0
    assert result.tokens_per_s > 0 and 0 < result.mfu < 1
    events = EventAccumulator(str(run.logs_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/tokens_per_s", "train/mfu"} <= set(events.Tags()["scalars"])
    assert not (run.checkpoints_dir / "runs").exists()  # nothing outside the run's logs folder
    assert json.loads((run.checkpoints_dir / "checkpoint-4" / "seektune-checkpoint.json").read_text())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_reporting_to_a_tracker_that_is_not_installed_is_a_user_error(tokenizer, tmp_path):
    data = SimpleNamespace(tokenized={"train": domain_split({"easy": 4}), "validation": []}, report={})
    cfg = TrainConfig(max_steps=1, report_to=["wandb"])
    with pytest.raises(UserError, match=r"train\.report_to names wandb but the wandb package"):
        train(cfg, llama(), tokenizer, data, RunDir.create(tmp_path, "t"), seed=0)


def _lora() -> MethodConfig:
    return MethodConfig(name="lora", lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]})
