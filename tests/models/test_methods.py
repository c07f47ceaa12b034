"""Method 'freeze': what trains for a spec, its user errors, its log table and a short training run.
LoRA with method.lora.include_experts: the fused routed experts get a per-expert update that trains,
saves and loads back whole."""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from seektune.config import FreezeConfig, LoraConfig, MethodConfig, SeektuneConfig
from seektune.errors import UserError
from seektune.models.families import FAMILIES
from seektune.models.methods import (
    AVAILABLE_METHODS,
    apply_method,
    freeze_model,
    fused_expert_parameters,
    load_adapter,
    parse_layer_slices,
)
from seektune.pipeline import check_stages_available

LAYERS = 4  # more blocks than the conftest's 2, so that '0:1,3:' leaves a gap


def _tiny(family_dirs: dict[str, Path], family: str, **overrides) -> nn.Module:
    """The conftest's tiny model of `family`, rebuilt with LAYERS blocks (fresh, seeded weights)."""
    config = AutoConfig.from_pretrained(family_dirs[family])
    config.num_hidden_layers = LAYERS
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _in_blocks(model: nn.Module, blocks: set[int]) -> set[str]:
    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def _freeze(**fields) -> MethodConfig:
    return MethodConfig(name="freeze", freeze=FreezeConfig(**fields))


# ---------------------------------------------------------------------------------------------------------
# Slices


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("-2:", 4, [2, 3]),
        ("0:1,3:", 4, [0, 3]),
        ("8:", 12, [8, 9, 10, 11]),
        ("0:4,10:12", 12, [0, 1, 2, 3, 10, 11]),
        (" ::2 , 1:3", 6, [0, 1, 2, 4]),
        ("-1", 4, [3]),
        ("", 4, []),
    ],
)
def test_parse_layer_slices(spec: str, count: int, expected: list[int]) -> None:
    assert parse_layer_slices(spec, count) == expected


# ---------------------------------------------------------------------------------------------------------
# Exactly the expected parameters train


def test_default_trains_top_two_blocks_norm_and_head(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "deepseek_v3")
    _, summary = apply_method(model, MethodConfig(name="freeze"), FAMILIES["deepseek_v3"])
    expected = _in_blocks(model, {2, 3}) | {"model.norm.weight", "lm_head.weight"}
    assert _trainable(model) == expected
    assert "model.layers.3.mlp.experts.gate_up_proj" in expected  # the fused routed experts train too
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_gapped_slices_on_llama(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "llama")
    selection = freeze_model(model, FreezeConfig(train_layers="0:1,3:", train_modules=[]))
    assert selection.block_indices == [0, 3]
    assert _trainable(model) == _in_blocks(model, {0, 3})
    assert len(_in_blocks(model, {0, 3})) == 18  # 9 parameters per Llama block


def test_patterns_train_and_freeze(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "deepseek_v3")
    freeze_model(
        model,
        FreezeConfig(
            train_layers="-2:", train_modules=["model.embed_tokens"], freeze_modules=["*.mlp.experts.*"]
        ),
    )
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in (2, 3) for p in ("gate_up_proj", "down_proj")}
    assert _trainable(model) == (_in_blocks(model, {2, 3}) - experts) | {"model.embed_tokens.weight"}


def test_head_only_and_wildcard_across_blocks(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "llama")
    freeze_model(
        model, FreezeConfig(train_layers="", train_modules=["lm_head", "model.layers.*.input_layernorm"])
    )
    assert _trainable(model) == {"lm_head.weight"} | {
        f"model.layers.{i}.input_layernorm.weight" for i in range(4)
    }


def test_tied_head_trains_the_embedding_and_says_so(
    family_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny(family_dirs, "llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.INFO, logger="seektune"):
        freeze_model(model, FreezeConfig(train_layers="", train_modules=["lm_head"]))
    assert model.model.embed_tokens.weight.requires_grad
    assert _trainable(model) == {"model.embed_tokens.weight"}  # one tensor under two names
    assert "model.embed_tokens (tied to lm_head.weight: training one trains both)" in caplog.text


def test_log_table_names_blocks_and_counts(
    family_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny(family_dirs, "llama")
    with caplog.at_level(logging.INFO, logger="seektune"):
        freeze_model(model, FreezeConfig(train_layers="1:3"))
    lines = caplog.text.splitlines()
    # A Llama block: q 32x32, k and v 16x32, o 32x32, gate/up 64x32, down 32x64, two norms of 32.
    block = 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3 + 32 * 2
    assert any("model.layers blocks 1-2 (of 0-3)" in line and f"{2 * block:,}" in line for line in lines)
    assert any(line.split()[:2] == ["lm_head", "4,096"] for line in lines)  # 128 x 32
    assert any(line.split()[:2] == ["model.norm", "32"] for line in lines)


# ---------------------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"train_layers": "x:"}, "method.freeze.train_layers 'x:': cannot read 'x:' as a Python slice"),
        ({"train_layers": "0:4:0"}, "cannot read '0:4:0' as a Python slice"),
        ({"train_layers": "0:1,,3:"}, "cannot read '' as a Python slice"),
        ({"train_layers": "8:"}, "'8:' selects no decoder block; the model has 4 blocks (0 to 3)"),
        ({"train_layers": "0:1,9"}, "'9' selects no decoder block; the model has 4 blocks"),
        ({"train_modules": ["lm_haed"]}, "method.freeze.train_modules: 'lm_haed' matches no parameter"),
        (
            {"freeze_modules": ["*.expert.*"]},
            "method.freeze.freeze_modules: '*.expert.*' matches no parameter",
        ),
        ({"train_layers": "", "train_modules": []}, "leaves no parameter to train"),
        (
            {"train_layers": "-1:", "train_modules": [], "freeze_modules": ["model.layers.3"]},
            "leaves no parameter",
        ),
    ],
)
def test_user_errors(fields: dict, message: str, family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "deepseek_v3")
    with pytest.raises(UserError) as caught:
        apply_method(model, _freeze(**fields), FAMILIES["deepseek_v3"])
    assert message in str(caught.value)


def test_unknown_pattern_lists_names_and_leaves_model_untouched(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "deepseek_v3")
    with pytest.raises(UserError) as caught:
        freeze_model(model, FreezeConfig(train_modules=["head"]))
    for name in ("model.embed_tokens", "model.layers.*.self_attn", "model.layers.*.mlp", "lm_head"):
        assert name in str(caught.value)
    assert all(param.requires_grad for param in model.parameters())


def test_model_without_block_list() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(UserError, match="found no list of decoder blocks"):
        freeze_model(model, FreezeConfig(train_layers="0:", train_modules=[]))
    freeze_model(model, FreezeConfig(train_layers="", train_modules=["1"]))
    assert _trainable(model) == {"1.weight", "1.bias"}


def test_pipeline_accepts_freeze() -> None:
    assert "freeze" in AVAILABLE_METHODS
    check_stages_available(SeektuneConfig(method=MethodConfig(name="freeze")))


# ---------------------------------------------------------------------------------------------------------
# Training: the loss falls, frozen parameters stay bit-identical, trained ones move


@pytest.mark.parametrize(("family", "layers"), [("deepseek_v3", "-2:"), ("llama", "0:1,3:")])
def test_training_moves_only_trained_parameters(
    family: str, layers: str, family_dirs: dict[str, Path]
) -> None:
    model = _tiny(family_dirs, family)
    model, _ = apply_method(model, _freeze(train_layers=layers), FAMILIES[family])
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trained = _trainable(model)
    ids = torch.randint(8, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in trained:
            assert not torch.equal(param, before[name]), f"{name} trains but did not change"
        else:
            assert param.grad is None and torch.equal(param, before[name]), f"{name} is frozen but changed"


# ---------------------------------------------------------------------------------------------------------
# LoRA on the fused routed experts (method.lora.include_experts)

EXPERT_LORA = LoraConfig(r=4, dropout=0.0, include_experts=True)
IDS = torch.randint(8, 60, (2, 12), generator=torch.Generator().manual_seed(1))


def _lora(lora: LoraConfig = EXPERT_LORA, name: str = "lora") -> MethodConfig:
    return MethodConfig(name=name, lora=lora)


def _expert_lora_params(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if ".mlp.experts." in n and ".lora_" in n}


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomise_lora_b(peft_model: nn.Module, experts_only: bool = False) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and (not experts_only or ".mlp.experts." in name):
                param.normal_(std=0.2)


def test_fused_expert_parameters_found(family_dirs: dict[str, Path]) -> None:
    model = _tiny(family_dirs, "deepseek_v3")  # block 0 dense, blocks 1-3 MoE
    assert fused_expert_parameters(model) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2, 3) for p in ("gate_up_proj", "down_proj")
    ]
    assert fused_expert_parameters(_tiny(family_dirs, "llama")) == []


def test_include_experts_adds_per_expert_lora(family_dirs: dict[str, Path]) -> None:
    without, base_summary = apply_method(
        _tiny(family_dirs, "deepseek_v3"), _lora(LoraConfig(r=4, dropout=0.0)), FAMILIES["deepseek_v3"]
    )
    with_experts, summary = apply_method(_tiny(family_dirs, "deepseek_v3"), _lora(), FAMILIES["deepseek_v3"])
    # Per MoE block, 4 experts x rank 4: gate_up_proj (32 x 32) adds 16 * (32 + 32), down_proj (32 x 16)
    # adds 16 * (16 + 32); three MoE blocks.
    assert summary.trainable - base_summary.trainable == 3 * (16 * 64 + 16 * 48) == 5376
    assert sum(p.numel() for p in _expert_lora_params(with_experts).values()) == 5376
    assert not _expert_lora_params(without)
    # The dense MLP and shared experts keep their module LoRA (PEFT's v4 rewrite stays off).
    names = {n for n, _ in with_experts.named_parameters()}
    assert "base_model.model.model.layers.1.mlp.shared_experts.down_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.default.weight" in names


def test_expert_lora_starts_as_identity_and_equals_merged_update(family_dirs: dict[str, Path]) -> None:
    base_logits = _logits(_tiny(family_dirs, "deepseek_v3"))
    peft_model, _ = apply_method(_tiny(family_dirs, "deepseek_v3"), _lora(), FAMILIES["deepseek_v3"])
    torch.testing.assert_close(_logits(peft_model), base_logits, atol=1e-6, rtol=0)  # B = 0 at init
    _randomise_lora_b(peft_model, experts_only=True)
    reference = _tiny(family_dirs, "deepseek_v3")
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.ParamWrapper):
                owner = name.replace(".base_layer", "")
                weights[f"{owner}.{module.parameter_name}"] += module.get_delta_weight("default")
    adapted = _logits(peft_model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    torch.testing.assert_close(adapted, _logits(reference), atol=1e-5, rtol=1e-5)


def test_expert_lora_trains(family_dirs: dict[str, Path]) -> None:
    peft_model, _ = apply_method(_tiny(family_dirs, "deepseek_v3"), _lora(), FAMILIES["deepseek_v3"])
    experts = _expert_lora_params(peft_model)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # 4.87 -> 4.65 on this seed
    assert len(experts) == 12  # lora_A and lora_B of two fused weights in three MoE blocks
    for name, param in experts.items():
        assert param.requires_grad and not torch.equal(param, before[name]), f"{name} did not train"
    for name, param in peft_model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert not param.requires_grad and torch.equal(param, before[name])


def test_expert_lora_saves_and_loads_whole(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    peft_model, _ = apply_method(_tiny(family_dirs, "deepseek_v3"), _lora(), FAMILIES["deepseek_v3"])
    _randomise_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(_tiny(family_dirs, "deepseek_v3"), tmp_path / "adapter")
    saved, loaded = _expert_lora_params(peft_model), _expert_lora_params(reloaded)
    assert len(loaded) == 12 and loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("family", "method", "message"),
    [
        (
            "llama",
            _lora(),
            "method.lora.include_experts is true but this model has no fused routed experts",
        ),
        (
            "deepseek_v3",
            _lora(name="dora"),
            "method.lora.include_experts does not work with method.name 'dora'",
        ),
        (
            "deepseek_v3",
            _lora(LoraConfig(include_experts=True)),
            "method.lora.include_experts needs method.lora.dropout 0 (it is 0.05)",
        ),
    ],
)
def test_include_experts_user_errors(
    family: str, method: MethodConfig, message: str, family_dirs: dict[str, Path]
) -> None:
    model = _tiny(family_dirs, family)
    with pytest.raises(UserError) as caught:
        apply_method(model, method, FAMILIES[family])
    assert message in str(caught.value)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # checked before wrapping
