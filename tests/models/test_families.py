"""Family detection, loading, LoRA on every family, the DeepSeek chat template and user errors."""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from seektune.config import BUILTIN_BASE, LoraConfig, MethodConfig, ModelConfig
from seektune.errors import UserError
from seektune.models.families import (
    DEEPSEEK_CHAT_TEMPLATE,
    DEEPSEEK_SPECIAL_TOKENS,
    FAMILIES,
    detect_family,
    ensure_chat_template,
)
from seektune.models.load import load_model, pick_device, pick_dtype, resolve_model_path
from seektune.models.methods import TrainableSummary, apply_method, load_adapter

FAMILY_NAMES = ["deepseek_v3", "deepseek_v2", "llama", "qwen2"]


def _absent_by_design(config) -> set[str]:
    """Preset names the architecture does not build: MLA has q_proj or q_a/q_b_proj, never both."""
    if not hasattr(config, "kv_lora_rank"):
        return set()
    return {"q_a_proj", "q_b_proj"} if config.q_lora_rank is None else {"q_proj"}


def _batch() -> torch.Tensor:
    return torch.randint(8, 60, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------
# Every family: load, detect, LoRA parity at B = 0, gradients


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_on_family(family: str, family_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(family_dirs[family])))
    assert loaded.family is FAMILIES[family]
    assert loaded.dtype == torch.float32
    assert loaded.tokenizer.chat_template == DEEPSEEK_CHAT_TEMPLATE
    model = loaded.model
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    expected = set(FAMILIES[family].lora_target_modules) - _absent_by_design(model.config)
    assert expected <= module_names

    ids = _batch()
    model.eval()
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
    peft_model, summary = apply_method(model, MethodConfig(name="lora"), loaded.family)
    assert set(peft_model.peft_config["default"].target_modules) == expected
    assert 0 < summary.trainable < summary.total
    peft_model.eval()
    with torch.no_grad():
        lora_logits = peft_model(ids).logits
    torch.testing.assert_close(lora_logits, base_logits, atol=1e-6, rtol=0)

    peft_model.train()
    loss = peft_model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_mla_lora_reaches_shared_but_not_routed_experts(family: str, family_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(family_dirs[family])))
    peft_model, _ = apply_method(loaded.model, MethodConfig(name="lora"), loaded.family)
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert any(".mlp.shared_experts.gate_proj." in n for n in lora_names)
    assert any(".layers.0.mlp.down_proj." in n for n in lora_names)  # the dense first layer
    assert not any(".mlp.experts." in n for n in lora_names)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n, _ in peft_model.named_parameters())


def test_saved_mla_adapter_loads_back_whole(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """PEFT alone would drop the shared-expert and dense-MLP weights on load (huggingface/peft#3711)."""
    cfg = ModelConfig(name_or_path=str(family_dirs["deepseek_v3"]))
    loaded = load_model(cfg)
    peft_model, _ = apply_method(loaded.model, MethodConfig(name="lora"), loaded.family)
    torch.manual_seed(2)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.eval()
    ids = _batch()
    with torch.no_grad():
        tuned_logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = load_adapter(load_model(cfg).model, tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned_logits, atol=1e-6, rtol=0)
    assert any(".shared_experts.down_proj.lora_B" in n for n, _ in reloaded.named_parameters())


def test_dora_keeps_base_logits(family_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(family_dirs["deepseek_v3"])))
    ids = _batch()
    with torch.no_grad():
        base_logits = loaded.model(ids).logits.clone()
    method = MethodConfig(name="dora", lora=LoraConfig(r=4, target_modules=["o_proj", "kv_b_proj"]))
    peft_model, _ = apply_method(loaded.model, method, loaded.family)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, base_logits, atol=1e-5, rtol=0)


def test_full_method_trains_everything(family_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(family_dirs["llama"])))
    loaded.model.requires_grad_(False)
    model, summary = apply_method(loaded.model, MethodConfig(name="full"), loaded.family)
    assert summary.trainable == summary.total == sum(p.numel() for p in model.parameters())


def test_trainable_summary_text() -> None:
    summary = TrainableSummary(trainable=1234, total=5678)
    assert str(summary) == "trainable 1,234 of 5,678 parameters (21.73%)"
    assert TrainableSummary(0, 0).ratio == 0.0


# ---------------------------------------------------------------------------------------------------------
# Chat template


def _render(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tiny_tokenizer.chat_template = None
    ensure_chat_template(tiny_tokenizer)
    return tiny_tokenizer


def test_template_renders_deepseek_format(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    expected = (
        "<｜begin▁of▁sentence｜>Be brief.\n\nAnswer in English."
        "<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
    )
    assert _render(chat_tokenizer, messages) == expected


def test_template_drops_reasoning_of_earlier_turns(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nagain</think>6"},
    ]
    text = _render(chat_tokenizer, messages)
    assert "add them" not in text
    assert "<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>3+3?" in text
    # The final assistant message is the training target: its reasoning is kept.
    assert text.endswith("<｜Assistant｜><think>\nagain</think>6<｜end▁of▁sentence｜>")


def test_template_generation_prompt(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    plain = _render(chat_tokenizer, messages, add_generation_prompt=True)
    assert plain == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    thinking = _render(chat_tokenizer, messages, add_generation_prompt=True, thinking=True)
    assert thinking.endswith("<｜Assistant｜><think>\n")


def test_template_tokens_are_special(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    tokens = chat_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == DEEPSEEK_SPECIAL_TOKENS["bos"]
    assert tokens[-1] == DEEPSEEK_SPECIAL_TOKENS["assistant"]
    assert DEEPSEEK_SPECIAL_TOKENS["user"] in tokens


def test_ensure_chat_template_keeps_own_and_takes_override(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tiny_tokenizer.chat_template = "{{ 'own' }}"
    ensure_chat_template(tiny_tokenizer)
    assert tiny_tokenizer.chat_template == "{{ 'own' }}"
    ensure_chat_template(tiny_tokenizer, "{{ 'override' }}")
    assert tiny_tokenizer.chat_template == "{{ 'override' }}"


# ---------------------------------------------------------------------------------------------------------
# Family detection, paths, devices and user errors


def test_unknown_model_type_is_a_user_error() -> None:
    config = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(UserError, match=r"'gpt2'.*deepseek_v3.*model\.family"):
        detect_family(config)
    assert detect_family(config, "llama") is FAMILIES["llama"]


def test_missing_local_path_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_model(ModelConfig(name_or_path=str(missing)))
    with pytest.raises(UserError, match=r"config\.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))


def test_hub_id_missing_offline_is_one_user_error() -> None:
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as info:
        load_model(ModelConfig(name_or_path="seektune-tests/no-such-model", device="cpu"))
    assert "huggingface-cli download seektune-tests/no-such-model" in str(info.value)
    assert "\n" not in str(info.value)


def test_builtin_base_is_built_by_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    fake = types.ModuleType("seektune.models.tiny")
    fake.ensure_base = lambda base, cache_dir: calls.append((base, cache_dir)) or tmp_path
    monkeypatch.setitem(sys.modules, "seektune.models.tiny", fake)
    cfg = ModelConfig(name_or_path=BUILTIN_BASE, cache_dir=tmp_path)
    assert resolve_model_path(cfg) == str(tmp_path)
    assert calls == [(cfg.base, tmp_path)]


def test_unknown_target_module_is_a_user_error(family_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(family_dirs["deepseek_v3"])))
    method = MethodConfig(name="lora", lora=LoraConfig(target_modules=["o_proj", "k_proj"]))
    with pytest.raises(UserError, match=r"'k_proj'.*kv_b_proj"):
        apply_method(loaded.model, method, loaded.family)


def test_a_method_the_config_cannot_name_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        apply_method(torch.nn.Linear(2, 2), MethodConfig.model_construct(name="bogus"), FAMILIES["llama"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_gpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"no CUDA GPU.*device: auto or cpu"):
        pick_device("cuda")


def test_dtype_choice(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    with caplog.at_level(logging.WARNING, logger="seektune.models.load"):
        assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert "no fast bfloat16 path" in caplog.text
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
