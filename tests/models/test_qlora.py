"""QLoRA: a 4-bit NF4 base (bitsandbytes, CUDA only) under a LoRA adapter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from seektune.config import LoraConfig, MethodConfig, ModelConfig
from seektune.errors import UserError
from seektune.models.load import four_bit_config, load_model
from seektune.models.methods import apply_method

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_four_bit_config_is_nf4_with_double_quantisation():
    config = four_bit_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert "lm_head" in config.llm_int8_skip_modules


@pytest.mark.skipif(HAS_BNB, reason="checks the message when bitsandbytes is missing")
def test_four_bit_loading_without_bitsandbytes_is_a_user_error(family_dirs: dict[str, Path]):
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        load_model(ModelConfig(name_or_path=str(family_dirs["deepseek_v3"])), four_bit=True)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_a_four_bit_base_and_its_adapter_reloads(family_dirs: dict[str, Path], tmp_path):
    import bitsandbytes as bnb

    loaded = load_model(ModelConfig(name_or_path=str(family_dirs["llama"]), device="cuda"), four_bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    method = MethodConfig(name="qlora", lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    model, trainable = apply_method(loaded.model, method, loaded.family)
    assert 0 < trainable.trainable < trainable.total
    batch = torch.randint(8, 100, (2, 12), device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path), device="cuda"), four_bit=True)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=batch).logits, expected)
