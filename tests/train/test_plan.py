"""`seektune plan`: parameter counts equal the real model's, memory arithmetic, the micro-batch
recommendation, `check_fits`, the CLI, and the estimate against memory measured while training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

from seektune.cli import main
from seektune.config import validate_config
from seektune.errors import UserError
from seektune.models.families import detect_family
from seektune.models.methods import apply_method, count_parameters
from seektune.train.plan import (
    NF4_BYTES_PER_WEIGHT,
    RESERVED_BYTES,
    SAFETY_FRACTION,
    MemoryPlan,
    check_fits,
    estimate_plan,
    recommend_micro_batch,
)
from support import TINY_RECIPE, tiny_run_config

GIB = 2**30
ROOMY = 64 * GIB  # a device memory every tiny plan fits in

# Layer 0 dense, layer 1 MoE with routed and shared experts, MLA with a query down-projection.
TINY_V3 = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 16,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}  # fmt: skip
# Dimensions small enough to count by hand (test_memory_arithmetic_of_a_hand_computed_case).
TINY_LLAMA = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}  # fmt: skip


def _folder(tmp_path: Path, config) -> Path:
    """A model folder holding only config.json: all that planning reads."""
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)
    return folder


def _cfg(folder: Path, **sections):
    raw = {"model": {"name_or_path": str(folder), "device": "cpu"}, "data": {"max_length": 64}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora": {"r": 4}},
    "freeze": {"name": "freeze", "freeze": {"train_layers": "-1:"}},
    "adapter": {"name": "adapter", "adapter": {"reduction_factor": 8}},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("architecture", ["deepseek_v3", "llama"])
def test_parameter_counts_equal_the_real_model(tmp_path: Path, architecture: str, method: str) -> None:
    config = DeepseekV3Config(**TINY_V3) if architecture == "deepseek_v3" else LlamaConfig(**TINY_LLAMA)
    cfg = _cfg(_folder(tmp_path, config), method=METHODS[method])
    plan = estimate_plan(cfg, device_memory=ROOMY)
    model = AutoModelForCausalLM.from_config(config)
    model, _ = apply_method(model, cfg.method, detect_family(config))
    real = count_parameters(model)
    assert (plan.total_params, plan.trainable_params) == (real.total, real.trainable)
    assert 0 < plan.trainable_params <= plan.total_params


@pytest.mark.parametrize("architecture", ["deepseek_v3", "llama"])
def test_a_prefix_is_counted_and_keeps_every_block_s_activations(tmp_path: Path, architecture: str) -> None:
    config = DeepseekV3Config(**TINY_V3) if architecture == "deepseek_v3" else LlamaConfig(**TINY_LLAMA)
    folder = _folder(tmp_path, config)
    cfg = _cfg(folder, method={"name": "prefix", "prefix": {"num_virtual_tokens": 4}})
    plan = estimate_plan(cfg, device_memory=ROOMY)
    model, _ = apply_method(AutoModelForCausalLM.from_config(config), cfg.method, detect_family(config))
    real = count_parameters(model)
    assert (plan.total_params, plan.trainable_params) == (real.total, real.trainable)
    head_only = estimate_plan(
        _cfg(folder, method={"name": "freeze", "freeze": {"train_layers": "", "train_modules": ["lm_head"]}}),
        device_memory=ROOMY,
    )
    assert plan.activation_bytes_per_token > 2 * head_only.activation_bytes_per_token


def test_qlora_trains_the_lora_parameters_on_a_4_bit_base(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LlamaConfig(**TINY_LLAMA))
    lora = estimate_plan(_cfg(folder, method={"name": "lora", "lora": {"r": 8}}), device_memory=ROOMY)
    qlora = estimate_plan(_cfg(folder, method={"name": "qlora", "lora": {"r": 8}}), device_memory=ROOMY)
    assert qlora.trainable_params == lora.trainable_params == 2 * 4096  # r * (in + out) over 7 targets
    # Hand count: the 2 x 9216 block linear weights in NF4; embeddings 2 x 4096 and the norms' 160 in fp32.
    frozen_fp32 = 2 * 4096 + 160
    assert qlora.weights_bytes == round(18432 * NF4_BYTES_PER_WEIGHT) + frozen_fp32 * 4 + 8192 * 4
    assert qlora.weights_bytes < lora.weights_bytes
    # On a GPU too: what is not quantised is cast to fp32 by PEFT's prepare_model_for_kbit_training.
    on_gpu = estimate_plan(
        _cfg(folder, model={"device": "cuda"}, method={"name": "qlora", "lora": {"r": 8}}),
        device_memory=ROOMY,
    )
    assert on_gpu.weights_bytes == qlora.weights_bytes


def test_memory_arithmetic_of_a_hand_computed_case(tmp_path: Path) -> None:
    """Llama h=32, 4 heads of 8 (2 KV heads), MLP 64, vocab 128, 2 layers, untied; full fine-tuning, fp32."""
    cfg = _cfg(_folder(tmp_path, LlamaConfig(**TINY_LLAMA)), method={"name": "full"}, train={"batch_size": 2})
    plan = estimate_plan(cfg, device_memory=ROOMY)
    # embed 128*32 + lm_head 128*32 + 2 layers * (q 1024 + k 512 + v 512 + o 1024 + MLP 3*2048 + norms 64)
    # + final norm 32
    params = 4096 + 4096 + 2 * 9280 + 32
    assert plan.total_params == plan.trainable_params == params
    assert (plan.weights_bytes, plan.gradients_bytes, plan.optimizer_bytes) == (
        4 * params,
        4 * params,
        8 * params,
    )
    assert plan.autocast_copies_bytes == plan.optimizer_step_bytes == 0
    # Per token and layer (a = 4): input norm 4h+4h, q/k/v input 4h, queries 4*32 + keys 4*16 + values
    # 4*16 + output 4*32 + log-sum-exp 4*4, post norm 8h, MLP input 4h, 3*4*64, down input 4*64.
    layer = 256 + 128 + (128 + 64 + 64 + 128 + 16) + 256 + 128 + 768 + 256
    head = 12 * 128 + 4 * 32 + 8 * 32  # loss over the vocabulary, lm_head input, final norm
    assert plan.activation_bytes_per_token == 2 * layer + head == 6304
    assert plan.total_bytes(2) == 16 * params + 6304 * 64 * 2


@pytest.mark.skipif(
    torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16"
)
def test_bf16_on_a_gpu_keeps_adam_states_in_bf16_and_adds_the_step_scratch(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LlamaConfig(**TINY_LLAMA))
    cfg = _cfg(folder, model={"device": "cuda"}, method={"name": "full"})
    plan = estimate_plan(cfg, device_memory=ROOMY)
    params = plan.total_params
    assert (plan.weight_dtype, plan.precision) == ("bfloat16", "bf16")
    assert (plan.weights_bytes, plan.gradients_bytes, plan.optimizer_bytes) == (
        2 * params,
        2 * params,
        4 * params,
    )
    assert plan.optimizer_step_bytes == 2 * params
    fp16_on_fp32 = estimate_plan(
        _cfg(folder, model={"device": "cuda", "dtype": "float32"}, train={"precision": "fp16"}),
        device_memory=ROOMY,
    )
    # Every matrix but the input embedding: all parameters but the embedding's 4096 and the norms' 160.
    assert fp16_on_fp32.autocast_copies_bytes == 2 * (params - 4096 - 160)


def test_activations_match_what_autograd_keeps(tmp_path: Path) -> None:
    """The per-token formula against the bytes autograd saves for backward in a real forward pass (unique
    storages, parameters excluded), for a DeepSeek-V3 model on this CPU; the loss's backward transient
    (8 bytes per vocabulary entry) is not saved by the forward, so it is taken off the estimate."""
    config = DeepseekV3Config(**{**TINY_V3, "hidden_size": 128, "vocab_size": 512})
    folder = _folder(tmp_path, config)
    for method in METHODS:
        cfg = _cfg(folder, method=METHODS[method])
        plan = estimate_plan(cfg, device_memory=ROOMY)
        torch.manual_seed(0)
        model, _ = apply_method(AutoModelForCausalLM.from_config(config), cfg.method, detect_family(config))
        saved = _saved_bytes_per_token(model, batch=2, length=64)
        estimate = plan.activation_bytes_per_token - 8 * config.vocab_size
        assert estimate == pytest.approx(saved, rel=0.1), method


def _saved_bytes_per_token(model: torch.nn.Module, batch: int, length: int) -> float:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(storages.values()) / (batch * length)


def test_freezing_lower_blocks_keeps_no_activations_for_them(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 4}))
    full = estimate_plan(_cfg(folder, method={"name": "full"}), device_memory=ROOMY)
    top = estimate_plan(_cfg(folder, method=METHODS["freeze"]), device_memory=ROOMY)
    checkpointed = estimate_plan(
        _cfg(folder, method={"name": "full"}, train={"gradient_checkpointing": True}), device_memory=ROOMY
    )
    assert top.activation_bytes_per_token < full.activation_bytes_per_token / 2
    assert checkpointed.activation_bytes_per_token < full.activation_bytes_per_token / 2


def test_the_builtin_base_is_planned_from_its_recipe_without_building_it(tmp_path: Path) -> None:
    cfg = validate_config({"model": {"cache_dir": str(tmp_path), "base": TINY_RECIPE, "device": "cpu"}})
    plan = estimate_plan(cfg, device_memory=ROOMY)
    reduced_base = DeepseekV3Config(  # the reduced base as `seektune base build` makes it
        vocab_size=2048, hidden_size=96, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        tie_word_embeddings=True,
    )  # fmt: skip
    built = AutoModelForCausalLM.from_config(reduced_base)
    lora_free = plan.total_params - plan.trainable_params
    assert lora_free == count_parameters(built).total == 374_784  # the count its build records
    assert not list(tmp_path.iterdir())  # nothing was built or written
    assert "recipe" in plan.config_source


@pytest.mark.slow
def test_the_builtin_plan_counts_the_built_base(base_cache: Path, tmp_path: Path) -> None:
    record = next(base_cache.glob("base/*/seektune_base.json"))
    built = json.loads(record.read_text())["parameters"]
    for cache_dir in (base_cache, tmp_path):  # the built config, and the recipe alone
        cfg = validate_config(
            {"model": {"cache_dir": str(cache_dir), "base": TINY_RECIPE}, "method": {"name": "full"}}
        )
        assert estimate_plan(cfg, device_memory=ROOMY).total_params == built


def test_a_671b_deepseek_v3_plans_in_seconds_from_the_shipped_config() -> None:
    cfg = validate_config(
        {"model": {"name_or_path": "deepseek-ai/DeepSeek-V3", "device": "cuda"}, "method": {"name": "full"}}
    )
    started = time.perf_counter()
    plan = estimate_plan(cfg, device_memory=80 * GIB)
    assert time.perf_counter() - started < 60
    assert plan.total_params == plan.trainable_params == 671_026_404_352
    assert plan.config_source == "config shipped with seektune"
    assert plan.weights_bytes == 2 * plan.total_params  # bf16 on a GPU
    assert plan.recommended_micro_batch is None
    assert "shard the model across several GPUs" in plan.suggestions[-1]
    json.dumps(plan.to_dict())


@pytest.mark.parametrize(
    ("hub_id", "billions"),
    [("deepseek-ai/DeepSeek-V2-Lite-Chat", 15.71), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7.62)],
)
def test_shipped_configs_give_the_published_sizes(hub_id: str, billions: float) -> None:
    cfg = validate_config({"model": {"name_or_path": hub_id, "device": "cpu"}, "method": {"name": "full"}})
    assert estimate_plan(cfg, device_memory=ROOMY).total_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_a_config_in_the_local_hugging_face_cache_is_read(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    LlamaConfig(**TINY_LLAMA).save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = validate_config(
        {"model": {"name_or_path": "acme/tiny-llama", "device": "cpu"}, "method": {"name": "full"}}
    )
    plan = estimate_plan(cfg, device_memory=ROOMY)
    assert (plan.config_source, plan.total_params) == ("local Hugging Face cache", 26784)


def _plan(per_sequence_gib: float, static_gib: float, batch: int, accumulation: int, memory_gib: float):
    """A plan of round figures: sequences of 1024 tokens, a GPU."""
    return MemoryPlan(
        model="m", config_source="", family="llama", method="full", device="cuda", weight_dtype="bfloat16",
        precision="bf16", optimizer="adamw", sequence_length=1024, gradient_checkpointing=False,
        total_params=1, trainable_params=1, weights_bytes=int(static_gib * GIB), gradients_bytes=0,
        optimizer_bytes=0, autocast_copies_bytes=0, optimizer_step_bytes=0,
        activation_bytes_per_token=int(per_sequence_gib * GIB / 1024), configured_micro_batch=batch,
        configured_accumulation=accumulation, device_memory=int(memory_gib * GIB),
        device_memory_source="given",
    )  # fmt: skip


def test_recommendation_takes_the_largest_fitting_power_of_two() -> None:
    # 40 GiB GPU: 0.9 * 40 - 1 = 35 GiB usable; 10 GiB + 3 GiB per sequence: at most 8 sequences.
    assert recommend_micro_batch(_plan(3, 10, batch=16, accumulation=2, memory_gib=40)) == (8, 4)
    # Everything fits: never more sequences per pass than configured per optimiser step.
    assert recommend_micro_batch(_plan(0.01, 1, batch=4, accumulation=1, memory_gib=80)) == (4, 1)
    assert recommend_micro_batch(_plan(0.01, 1, batch=12, accumulation=1, memory_gib=80)) == (8, 2)
    assert recommend_micro_batch(_plan(0.01, 1, batch=256, accumulation=1, memory_gib=80)) == (64, 4)
    assert recommend_micro_batch(_plan(30, 10, batch=8, accumulation=1, memory_gib=40)) is None


def test_check_fits_names_the_micro_batch_that_fits(tmp_path: Path) -> None:
    cfg = _cfg(
        _folder(tmp_path, LlamaConfig(**TINY_LLAMA)), method={"name": "full"}, train={"batch_size": 64}
    )
    plan = estimate_plan(cfg, device_memory=ROOMY)
    # Memory for exactly 16 sequences (and not 32).
    memory = math.ceil((plan.total_bytes(16) + RESERVED_BYTES) / SAFETY_FRACTION["cpu"]) + 1
    with pytest.raises(UserError) as raised:
        check_fits(cfg, memory)
    message = str(raised.value)
    assert message.startswith("train.batch_size 64 at sequence length 64 needs about")
    assert message.endswith("set train.batch_size: 16 and train.gradient_accumulation_steps: 4")
    check_fits(cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 16})}), memory)


def test_check_fits_says_what_would_fit_when_nothing_does(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LlamaConfig(**TINY_LLAMA))
    cfg = _cfg(folder, method={"name": "full"}, data={"max_length": 4096})
    plan = estimate_plan(cfg, device_memory=ROOMY)
    checkpointed = estimate_plan(
        _cfg(
            folder, method={"name": "full"}, data={"max_length": 4096}, train={"gradient_checkpointing": True}
        ),
        device_memory=ROOMY,
    )
    between = (plan.total_bytes(1) + checkpointed.total_bytes(1)) // 2  # checkpointing fits, plain does not
    memory = math.ceil((between + RESERVED_BYTES) / SAFETY_FRACTION["cpu"])
    with pytest.raises(UserError, match=r"not even train\.batch_size 1 fits: ") as raised:
        check_fits(cfg, memory)
    assert "set train.gradient_checkpointing: true (train.batch_size" in str(raised.value)


def test_check_fits_passes_over_a_hub_model_it_cannot_read_offline() -> None:
    cfg = validate_config({"model": {"name_or_path": "acme/no-such-model"}, "train": {"batch_size": 64}})
    assert check_fits(cfg, GIB) is None


def test_cli_plan_prints_the_table(tmp_path: Path, capsys) -> None:
    folder = _folder(tmp_path, DeepseekV3Config(**TINY_V3))
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name_or_path: {folder}\n  device: cpu\nmethod:\n  name: lora\n")
    assert main(["plan", str(config), "--device-memory-gb", "16"]) == 0
    out = capsys.readouterr().out
    for row in (
        "parameters",
        "trainable",
        "weights",
        "gradients",
        "optimizer states",
        "activations per token",
    ):
        assert row in out
    assert "recommended: train.batch_size: 8 and train.gradient_accumulation_steps: 1" in out


def test_cli_plan_of_an_unknown_hub_model_exits_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  name_or_path: acme/no-such-model\n")
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "acme/no-such-model" in err and "huggingface-cli download acme/no-such-model config.json" in err


# ---------------------------------------------------------------------------------------------------------
# The estimate against memory measured while training


def test_a_run_whose_batch_cannot_fit_stops_before_anything_is_written(tmp_path, base_cache, capsys):
    raw = tiny_run_config(tmp_path, base_cache, train={"batch_size": 1_000_000})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size 1000000" in err and "set train.batch_size: 64" in err
    assert not (tmp_path / "runs").exists()
