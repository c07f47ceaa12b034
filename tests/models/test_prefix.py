"""Prefix tuning: logits equal a hand-fed cache, what trains, training (with gradient checkpointing and the
Trainer), save/load parity through load_model, batched generation with left padding, errors."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DynamicCache, Trainer, TrainingArguments

from seektune.config import AdapterConfig, DataConfig, MethodConfig, ModelConfig, PrefixConfig
from seektune.errors import UserError
from seektune.models.adapters import apply_adapters, save_adapters
from seektune.models.families import FAMILIES
from seektune.models.load import load_model
from seektune.models.methods import apply_method
from seektune.models.prefix import (
    apply_prefix,
    check_prefix_compatible,
    is_prefix_folder,
    load_prefix,
    prefix_encoder,
    save_prefix,
)

N = 3  # virtual tokens
PAD = 7  # pad_token_id of the tiny models (tests/models/conftest.py)
# Per-token prefix width over both layers of the tiny models: MLA caches the latent (kv_lora_rank 16) and the
# rotary key (qk_rope_head_dim 8) per layer; Llama 2 kv heads x head_dim 8 for keys and for values.
WIDTH = {"deepseek_v3": 2 * (16 + 8), "llama": 2 * (2 * 8 + 2 * 8)}


def _base(family_dirs: dict[str, Path], family: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()


def _prefixed(family_dirs: dict[str, Path], family: str, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"num_virtual_tokens": N, "projection_hidden_size": 16, **cfg}
    return apply_prefix(_base(family_dirs, family), PrefixConfig(**cfg))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 6 tokens, the second left-padded by 2."""
    ids = torch.randint(8, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask


def _cache_name(model: torch.nn.Module) -> str:
    """The name the installed transformers takes and returns the key-value cache under: `cache` from 5.24 on,
    `past_key_values` before (5.24 ignores that name when `cache` is set too)."""
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def _hand_fed(
    base: torch.nn.Module, states: list, ids: torch.Tensor, mask: torch.Tensor, first_position: int = 0
):
    """The base model's output with the prefix states put in a DynamicCache by hand, the mask extended over
    them and the real tokens at positions first_position, first_position + 1, ..."""
    cache = DynamicCache(config=base.config)
    for index, (keys, values) in enumerate(states):
        cache.update(keys.expand(len(ids), -1, -1, -1), values.expand(len(ids), -1, -1, -1), index)
    full_mask = torch.cat([torch.ones(len(ids), N, dtype=mask.dtype), mask], dim=-1)
    positions = torch.arange(first_position, first_position + ids.shape[1]).unsqueeze(0)
    cache_argument = {_cache_name(base): cache}
    return base(input_ids=ids, attention_mask=full_mask, position_ids=positions, labels=ids, **cache_argument)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "llama", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_logits_equal_hand_fed_cache(family: str, projection: bool, family_dirs: dict[str, Path]) -> None:
    model = _prefixed(family_dirs, family, projection=projection)
    base = _base(family_dirs, family)
    ids, mask = _batch()
    with torch.no_grad():
        states = prefix_encoder(model)()
        logits = model(input_ids=ids, attention_mask=mask).logits
        reference = _hand_fed(base, states, ids, mask).logits
        shifted = _hand_fed(base, states, ids, mask, first_position=N).logits  # PEFT's positions
        plain = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[real], atol=1e-6, rtol=0)
    assert (logits[real] - shifted[real]).abs().max() > 1e-4  # the real tokens start at position 0
    assert (logits[real] - plain[real]).abs().max() > 1e-4  # the prefix matters


def test_training_forward_and_gradient_checkpointing_see_the_prefix(family_dirs: dict[str, Path]) -> None:
    """Train mode with labels (as the Trainer calls it) on DeepSeek-V3 with its MoE block: the loss equals the
    hand-fed reference, and gradient checkpointing gives the same loss and gradients."""
    model = _prefixed(family_dirs, "deepseek_v3").train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        reference = _hand_fed(_base(family_dirs, "deepseek_v3"), prefix_encoder(model)(), ids, mask).logits

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        output.loss.backward()
        torch.testing.assert_close(output.logits[mask.bool()], reference[mask.bool()], atol=1e-6, rtol=0)
        assert getattr(output, _cache_name(model)) is None  # nothing cached while training
        return output.loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert torch.equal(checkpointed_loss, loss)
    assert all(g.abs().sum() > 0 for g in grads)
    for grad, checkpointed in zip(grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(checkpointed, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_only_the_prefix_trains(family: str, family_dirs: dict[str, Path]) -> None:
    direct = _prefixed(family_dirs, family, projection=False)
    trainable = {name: p.numel() for name, p in direct.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == N * WIDTH[family]
    assert all(name.startswith("seektune_prefix.") for name in trainable)

    torch.manual_seed(0)
    model, summary = apply_method(
        _base(family_dirs, family),
        MethodConfig(name="prefix", prefix=PrefixConfig(num_virtual_tokens=N, projection_hidden_size=16)),
        FAMILIES[family],
    )
    # embedding (N x hidden 32), Linear 32 -> 16, Linear 16 -> WIDTH
    assert summary.trainable == N * 32 + (32 * 16 + 16) + (16 * WIDTH[family] + WIDTH[family])
    assert model.seektune_prefix_config.projection is True


@pytest.mark.parametrize("projection", [False, True])
def test_steps_on_one_batch_lower_the_loss(projection: bool, family_dirs: dict[str, Path]) -> None:
    model = _prefixed(family_dirs, "deepseek_v3", projection=projection).train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)
    ids, mask = _batch()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_trainer_with_gradient_checkpointing_trains_the_prefix(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _prefixed(family_dirs, "deepseek_v3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = _batch()
    rows = [
        {"input_ids": i.tolist(), "attention_mask": m.tolist(), "labels": i.tolist()}
        for i, m in zip(ids, mask, strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=0.3,
        lr_scheduler_type="constant",
        activation_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows * 2))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.05
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_save_then_load_model_gives_same_logits_and_tokens(
    family: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _prefixed(family_dirs, family)
    save_prefix(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {
        "seektune_prefix": model.seektune_prefix_config.model_dump(),
        "base_model_name_or_path": str(family_dirs[family]),
    }
    assert is_prefix_folder(tmp_path)

    loaded = load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu")).model.eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.seektune_prefix.mlp is None  # the saved states, not the MLP
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "pad_token_id": PAD}
    assert torch.equal(
        loaded.generate(ids, do_sample=False, **kwargs), model.generate(ids, do_sample=False, **kwargs)
    )
    sampled = []
    for generator_model in (model, loaded):
        torch.manual_seed(5)
        sampled.append(generator_model.generate(ids, do_sample=True, top_k=0, **kwargs))
    assert torch.equal(sampled[0], sampled[1])


def test_generate_batched_with_left_padding(family_dirs: dict[str, Path]) -> None:
    """Batched left-padded generation gives each row what it gets alone, and that is greedy decoding of the
    hand-fed reference."""
    model = _prefixed(family_dirs, "deepseek_v3", projection=False)
    base = _base(family_dirs, "deepseek_v3")
    ids, mask = _batch()
    new = 5
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    uncached = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD, use_cache=False
    )
    assert torch.equal(batched, uncached)
    states = [(k.detach(), v.detach()) for k, v in prefix_encoder(model)()]
    for row in range(2):
        prompt = ids[row : row + 1, mask[row].bool()]
        alone = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
        assert torch.equal(alone[0], batched[row, mask[row].bool().tolist() + [True] * new])
        tokens = prompt
        with torch.no_grad():
            for _ in range(new):
                logits = _hand_fed(base, states, tokens, torch.ones_like(tokens)).logits
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=-1)
        assert torch.equal(alone, tokens)


def test_packing_and_static_cache_are_refused(family_dirs: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=re.escape("(data.packing: true)")):
        check_prefix_compatible(DataConfig(packing=True))
    check_prefix_compatible(DataConfig(packing=False))

    model = _prefixed(family_dirs, "llama").train()
    ids = torch.randint(8, 60, (1, 6))
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two examples in one row, no attention mask
    with pytest.raises(UserError, match=re.escape("set data.packing to false")):
        model(input_ids=ids, position_ids=packed_positions, labels=ids, use_cache=False)

    with pytest.raises(
        UserError, match="generation used StaticCache: leave the generation config's cache_imp"
    ):
        model.eval().generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=PAD)


def test_bad_prefix_folders(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=re.escape("is not a seektune prefix folder: it needs adapter_config.json")
    ):
        load_prefix(_base(family_dirs, "llama"), tmp_path)

    save_prefix(_prefixed(family_dirs, "llama"), tmp_path / "llama")
    base = _base(family_dirs, "deepseek_v3")
    message = "layers.0.keys: saved (2, 3, 8), the model caches (1, 3, 16)): load it onto the base it was"
    with pytest.raises(UserError, match=re.escape(message)):
        load_prefix(base, tmp_path / "llama")
    assert not hasattr(base, "seektune_prefix")  # nothing attached when loading fails

    save_adapters(
        apply_adapters(_base(family_dirs, "llama"), AdapterConfig()), tmp_path / "adapter", AdapterConfig()
    )
    assert not is_prefix_folder(tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(_prefixed(family_dirs, "llama"), PrefixConfig())
