"""Bottleneck adapters: identity at init, what trains, training, save/load parity, positions, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seektune.config import AdapterConfig
from seektune.errors import UserError
from seektune.models.adapters import (
    BottleneckAdapter,
    adapter_state_dict,
    apply_adapters,
    load_adapters,
    save_adapters,
)

HIDDEN = 32  # hidden_size of the tiny family models in tests/models/conftest.py
LAYERS = 2


def _base(family_dirs: dict[str, Path], family: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()


def _batch() -> torch.Tensor:
    return torch.randint(8, 60, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _randomise_adapters(model: torch.nn.Module) -> None:
    """Give the zero-initialised up-projections weights, so the adapters change the output."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.up.weight.copy_(torch.randn(module.up.weight.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_identity_at_init_and_trainable_count(family: str, family_dirs: dict[str, Path]) -> None:
    model = _base(family_dirs, family)
    ids = _batch()
    base_logits = _logits(model, ids)
    base_names = [name for name, _ in model.named_parameters()]

    apply_adapters(model, AdapterConfig(reduction_factor=16, non_linearity="silu"))

    assert torch.equal(_logits(model, ids), base_logits)
    # bottleneck b = 32 // 16 = 2; one adapter = down (32*2 + 2) + up (2*32 + 32) = 162; 2 per block, 2 blocks
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 162 * 2 * LAYERS
    assert all("_adapter." in name for name in trainable)
    # the base keeps its parameter names: the adapted model's names are the base's plus the adapters'
    assert [name for name, _ in model.named_parameters() if name not in trainable] == base_names
    assert "model.layers.1.mlp_adapter.up.weight" in trainable


def test_training_changes_only_adapters(family_dirs: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = apply_adapters(_base(family_dirs, "deepseek_v3"), AdapterConfig(reduction_factor=4))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _batch()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(t.abs().sum() > 0 for n, t in adapter_state_dict(model).items() if n.endswith("up.weight"))


@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_save_load_into_fresh_base_gives_same_logits(
    family: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = AdapterConfig(reduction_factor=8, non_linearity="relu")
    model = apply_adapters(_base(family_dirs, family), cfg)
    _randomise_adapters(model)
    ids = _batch()
    adapted_logits = _logits(model, ids)
    assert not torch.equal(adapted_logits, _logits(_base(family_dirs, family), ids))

    save_adapters(model, tmp_path, cfg)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config == {
        "seektune_adapter": cfg.model_dump(),
        "hidden_size": HIDDEN,
        "base_model_name_or_path": str(family_dirs[family]),
    }

    loaded = load_adapters(_base(family_dirs, family), tmp_path)
    assert torch.equal(_logits(loaded, ids), adapted_logits)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_mlp_position_only(family_dirs: dict[str, Path]) -> None:
    model = apply_adapters(_base(family_dirs, "deepseek_v3"), AdapterConfig(positions=["mlp"]))
    adapter_names = sorted({name.rsplit(".", 2)[0] for name in adapter_state_dict(model)})
    assert adapter_names == ["model.layers.0.mlp_adapter", "model.layers.1.mlp_adapter"]
    assert type(model.model.layers[1].mlp).__name__ == "DeepseekV3MoE"  # the hook sits on the MoE module


def test_generate_with_adapters_matches_uncached(family_dirs: dict[str, Path]) -> None:
    model = apply_adapters(_base(family_dirs, "deepseek_v3"), AdapterConfig(reduction_factor=4))
    _randomise_adapters(model)
    ids = _batch()[:1, :6]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 7}
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


def test_bad_adapter_dirs(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    base = _base(family_dirs, "llama")
    with pytest.raises(
        UserError, match=re.escape("is not a seektune adapter folder: it needs adapter_config.json")
    ):
        load_adapters(base, tmp_path)

    cfg = AdapterConfig()
    save_adapters(apply_adapters(_base(family_dirs, "llama"), cfg), tmp_path, cfg)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "hidden_size": 64}))
    with pytest.raises(UserError, match="hidden size 64, but this base model has hidden size 32"):
        load_adapters(base, tmp_path)
    assert adapter_state_dict(base) == {}  # nothing attached when loading fails


def test_reduction_factor_too_large(family_dirs: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=re.escape("method.adapter.reduction_factor 64 leaves no bottleneck")):
        apply_adapters(_base(family_dirs, "llama"), AdapterConfig(reduction_factor=64))
