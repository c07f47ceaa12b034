"""Method 'freeze': what trains for a spec, its user errors, its log table and a short training run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from seektune.config import FreezeConfig, MethodConfig, SeektuneConfig
from seektune.errors import UserError
from seektune.models.families import FAMILIES
from seektune.models.methods import AVAILABLE_METHODS, apply_method, freeze_model, parse_layer_slices
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
