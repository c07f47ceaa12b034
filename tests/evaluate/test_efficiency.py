"""Efficiency figures on tiny models: exact token counts, consistent latency and throughput figures, size on
disk against the files save_pretrained wrote, the score by hand. No timing thresholds (shared CPUs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from seektune.config import EfficiencyConfig
from seektune.errors import UserError
from seektune.evaluate import efficiency
from seektune.evaluate.efficiency import (
    PeakMemory,
    measure_efficiency,
    size_on_disk,
    time_prompt,
    weight_file_bytes,
)
from train.tinymodels import deepseek_v3, llama, word_tokenizer

EOS = 2
PROMPTS = ["t11 t12 t13 t14", "t20 t21", "t30 t31 t32 t33 t34 t35", "t40"]


def eager_to_stop(model):
    """The model's head puts a huge logit on EOS, so without min_new_tokens it stops after one token."""

    def favour_eos(module, args, logits):
        bonus = torch.zeros(logits.shape[-1], device=logits.device)
        bonus[EOS] = 100.0
        return logits + bonus

    model.get_output_embeddings().register_forward_hook(favour_eos)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return eager_to_stop(llama())


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


def test_the_hooked_model_would_stop_at_once(model, tokenizer):
    enc = tokenizer(["t11 t12"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, eos_token_id=EOS, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] - enc["input_ids"].shape[1] == 1  # the timing must therefore force the length


def test_the_step_timer_sees_every_one_of_exactly_max_new_tokens(model, tokenizer):
    timing = time_prompt(model, tokenizer, "t11 t12 t13", 7)
    assert timing["tokens"] == 7 and timing["stamps"] == 7
    assert len(timing["token_ms"]) == 6
    assert timing["ttft_ms"] > 0 and all(ms >= 0 for ms in timing["token_ms"])
    assert timing["ttft_ms"] + sum(timing["token_ms"]) <= timing["total_ms"]


def test_measure_efficiency_figures_are_positive_and_consistent(model, tokenizer, saved, monkeypatch):
    shapes: list[tuple[int, int, int]] = []
    generate = efficiency._generate

    def recording(model_, tokenizer_, enc, new_tokens, timer=None):
        out = generate(model_, tokenizer_, enc, new_tokens, timer)
        shapes.append((out.shape[0], enc["input_ids"].shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(efficiency, "_generate", recording)
    cfg = EfficiencyConfig(prompts=3, max_new_tokens=6, batch_size=2)
    tokenizer.padding_side = "right"
    result = measure_efficiency(model, tokenizer, PROMPTS, cfg, [saved])

    assert tokenizer.padding_side == "right"  # restored after the left-padded batches
    # warm-up + 3 prompts alone + batches of 2 and 1; every row gets exactly 6 new tokens.
    assert [rows for rows, _, _ in shapes] == [1, 1, 1, 1, 2, 1]
    assert all(total - prompt == 6 for _, prompt, total in shapes)
    assert {k: result[k] for k in ("device", "prompts", "new_tokens", "batch_size")} == {
        "device": "cpu",
        "prompts": 3,
        "new_tokens": 6,
        "batch_size": 2,
    }
    assert len(result["ttft_ms_all"]) == 3 and len(result["token_ms_all"]) == 3 * 5
    for key in ("ttft_ms", "ms_per_token", "tokens_per_s_batch1", "tokens_per_s_batched", "peak_memory_mb"):
        assert result[key] > 0, key
    assert result["ttft_ms_p90"] >= result["ttft_ms"] and result["ms_per_token_p90"] >= result["ms_per_token"]
    # 18 tokens over the three calls' total time: 1000 / mean(total ms per token).
    per_token_ms = [total / 6 for total in result["total_ms_all"]]
    assert result["tokens_per_s_batch1"] == pytest.approx(1000 / (sum(per_token_ms) / 3), rel=1e-3)
    assert result["peak_memory_mb"] >= result["memory_before_mb"] > 0
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    weights = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    assert result["size_on_disk"] == {str(saved): pytest.approx(weights / 2**20, abs=1e-6)}
    assert result["size_on_disk_mb"] == result["size_on_disk"][str(saved)]


def test_peak_memory_on_cpu_sees_a_transient_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(50_000_000)  # 200 MB, every page written
        time.sleep(0.2)  # the sampling thread looks every 5 ms
        del block
    assert memory.peak - memory.before > 150 * 2**20


def test_size_on_disk_counts_weight_files_per_folder(saved, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"\0" * 3000)
    (adapter / "adapter_config.json").write_text("{}")  # not a weight file
    (adapter / "nested").mkdir()
    model_bytes = sum(f.stat().st_size for f in saved.iterdir() if f.suffix == ".safetensors")
    assert weight_file_bytes(saved) == model_bytes > 0
    assert weight_file_bytes(adapter) == 3000
    sizes = size_on_disk([saved, adapter, tmp_path / "missing", adapter])
    assert sizes == {str(saved): round(model_bytes / 2**20, 6), str(adapter): round(3000 / 2**20, 6)}


def test_a_deepseek_v3_model_is_timed_too(tokenizer, tmp_path):
    model = eager_to_stop(deepseek_v3())
    cfg = EfficiencyConfig(prompts=1, max_new_tokens=3, batch_size=4)
    result = measure_efficiency(model, tokenizer, PROMPTS[:1], cfg, [tmp_path])
    assert len(result["token_ms_all"]) == 2 and result["size_on_disk"] == {str(tmp_path): 0.0}


def test_no_prompt_to_time_is_a_user_error(model, tokenizer):
    with pytest.raises(UserError, match=r"eval\.efficiency"):
        measure_efficiency(model, tokenizer, [], EfficiencyConfig(), [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_and_timing(tokenizer):
    model = eager_to_stop(llama()).cuda()
    cfg = EfficiencyConfig(prompts=2, max_new_tokens=4, batch_size=2)
    result = measure_efficiency(model, tokenizer, PROMPTS, cfg, [])
    assert result["device"] == "cuda" and len(result["token_ms_all"]) == 2 * 3
    assert result["peak_memory_mb"] > result["memory_before_mb"] > 0  # the cache and activations
    assert result["size_on_disk_mb"] is None
