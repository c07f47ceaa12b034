"""fbgemm's int8 kernel for int8_dynamic models on a CPU: the same int8 weights as torchao's, logits close to
torchao's path, generate with the KV cache on Llama and DeepSeek-V3 (MLA, MoE), and where it must not apply
(int8_kernel torchao, weight-only models, float models, a GPU, a torch without fbgemm)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seektune.compress.quantize import quantize_model
from seektune.config import ModelConfig, QuantizeConfig
from seektune.errors import UserError
from seektune.models import int8_cpu
from seektune.models.int8_cpu import FbgemmInt8Linear, apply_int8_kernel, use_fbgemm_int8
from seektune.models.load import load_model
from train import tinymodels

pytestmark = pytest.mark.skipif(not int8_cpu.fbgemm_available(), reason="this torch has no fbgemm engine")

BUILDERS = {"llama": tinymodels.llama, "deepseek_v3": tinymodels.deepseek_v3}
IDS = torch.randint(8, tinymodels.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
# Largest |logit difference| over the largest |logit| of the torchao path. Measured on the project's CPU
# (VNNI, so full-range activations; with reduce_range in brackets): one token per call on the KV cache
# (decode) 0.8% (1.1%) Llama, 0.7% (1.1%) DeepSeek-V3; a batch of 2 x 10 tokens, where fbgemm's one
# activation scale covers all 20 tokens and torchao's is per token, 0.8% (1.0%) Llama, 1.0% (2.1%)
# DeepSeek-V3. Weight scales 10% off give 9-14%.
DECODE_TOLERANCE = 0.02
BATCH_TOLERANCE = 0.04


def _cfg(folder: Path, **fields) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), device="cpu", dtype="float32", **fields)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Float, int8_dynamic and (Llama) int8_weight_only folders of the seeded tiny models."""
    root = tmp_path_factory.mktemp("int8-cpu")
    out = {}
    for family, build in BUILDERS.items():
        build().save_pretrained(root / family)
        tinymodels.word_tokenizer().save_pretrained(root / family)
        out[family] = root / family
        quantize_model(
            root / family, root / f"{family}-dyn", QuantizeConfig(method="int8_dynamic"), _cfg(root)
        )
        out[f"{family}-dyn"] = root / f"{family}-dyn"
    method = QuantizeConfig(method="int8_weight_only")
    quantize_model(out["llama"], root / "llama-wo", method, _cfg(root))
    out["llama-wo"] = root / "llama-wo"
    return out


def _torchao(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _int8_linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torchao.quantization import Int8Tensor

    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, Int8Tensor)
    }


def _relative_gap(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_load_model_moves_every_int8_dynamic_linear_to_fbgemm(folders, family, caplog):
    torchao = _int8_linears(_torchao(folders[f"{family}-dyn"]))
    with caplog.at_level(logging.INFO, logger="seektune.models.load"):
        loaded = load_model(_cfg(folders[f"{family}-dyn"]))
    swapped = {n: m for n, m in loaded.model.named_modules() if isinstance(m, FbgemmInt8Linear)}
    assert len(torchao) > 0
    assert set(swapped) == set(torchao)
    assert type(loaded.model.lm_head) is torch.nn.Linear  # the output head stays float
    assert "int8 kernel fbgemm" in caplog.text
    for name, module in swapped.items():  # the same int8 weights and scales: nothing re-quantised
        packed = module.weight()
        assert torch.equal(packed.int_repr(), torchao[name].qdata)
        assert torch.equal(packed.q_per_channel_scales().float(), torchao[name].scale.reshape(-1))


@pytest.mark.parametrize("reduce_range", [None, True], ids=["auto-range", "reduce-range"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_logits_are_close_to_the_torchao_path(folders, family, reduce_range):
    torchao = _torchao(folders[f"{family}-dyn"])
    fbgemm = _torchao(folders[f"{family}-dyn"])
    assert use_fbgemm_int8(fbgemm, reduce_range=reduce_range) > 0
    with torch.no_grad():
        batch = _relative_gap(fbgemm(IDS).logits, torchao(IDS).logits)
        # Decode: one token per call on the KV cache, as generate runs it.
        cache_ao = cache_fb = None
        gaps = []
        for step in range(IDS.shape[1]):
            token = IDS[:1, step : step + 1]
            out_ao = torchao(token, cache=cache_ao, use_cache=True)
            out_fb = fbgemm(token, cache=cache_fb, use_cache=True)
            cache_ao, cache_fb = out_ao.cache, out_fb.cache
            gaps.append(_relative_gap(out_fb.logits, out_ao.logits))
    assert max(gaps) < DECODE_TOLERANCE
    assert batch < BATCH_TOLERANCE


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generate_runs_on_the_kv_cache_after_the_swap(folders, family):
    loaded = load_model(_cfg(folders[f"{family}-dyn"]))
    prompt = IDS[:1, :6]
    with torch.no_grad():
        out = loaded.model.generate(
            prompt,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        assert out.sequences.shape == (1, 18)
        # torchao's model, teacher-forced on the generated tokens, predicts what generate's steps saw.
        reference = _torchao(folders[f"{family}-dyn"])(out.sequences).logits[0, 5:-1]
    steps = torch.cat(out.logits)
    assert _relative_gap(steps, reference) < BATCH_TOLERANCE
    assert torch.equal(out.sequences[0, 6:], steps.argmax(-1))  # greedy on its own logits


def test_int8_kernel_torchao_leaves_the_model_untouched(folders):
    loaded = load_model(_cfg(folders["deepseek_v3-dyn"], int8_kernel="torchao"))
    assert not any(isinstance(m, FbgemmInt8Linear) for m in loaded.model.modules())
    assert set(_int8_linears(loaded.model)) == set(_int8_linears(_torchao(folders["deepseek_v3-dyn"])))


def test_weight_only_and_float_models_keep_their_layers(folders):
    weight_only = _torchao(folders["llama-wo"])
    assert apply_int8_kernel(weight_only, "auto", torch.device("cpu")) == "torchao"
    assert len(_int8_linears(weight_only)) > 0  # float activations: fbgemm would change the numerics
    plain = _torchao(folders["llama"])
    assert apply_int8_kernel(plain, "fbgemm", torch.device("cpu")) is None
    assert all(type(m) is not FbgemmInt8Linear for m in plain.modules())


def test_fbgemm_where_it_cannot_run_is_a_user_error(folders, monkeypatch):
    model = _torchao(folders["llama-dyn"])
    with pytest.raises(UserError, match=r"int8_kernel is fbgemm.*loads on cuda"):
        apply_int8_kernel(model, "fbgemm", torch.device("cuda"))
    assert apply_int8_kernel(model, "auto", torch.device("cuda")) == "torchao"
    monkeypatch.setattr(int8_cpu, "fbgemm_available", lambda: False)
    with pytest.raises(UserError, match="no fbgemm engine"):
        apply_int8_kernel(model, "fbgemm", torch.device("cpu"))
    assert apply_int8_kernel(model, "auto", torch.device("cpu")) == "torchao"
    assert len(_int8_linears(model)) > 0


def test_a_swapped_model_refuses_to_be_saved(folders, tmp_path):
    loaded = load_model(_cfg(folders["llama-dyn"]))
    with pytest.raises(RuntimeError, match=r"cannot be saved.*int8_kernel torchao"):
        loaded.model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_the_compression_table_counts_the_swapped_weights(folders, family):
    from seektune.compress.table import count_parameters, weights_memory_bytes

    torchao = _torchao(folders[f"{family}-dyn"])
    fbgemm = _torchao(folders[f"{family}-dyn"])
    assert use_fbgemm_int8(fbgemm) > 0
    assert count_parameters(fbgemm) == count_parameters(torchao)  # packed weights are still weights
    # int8 data either way; torchao keeps float32 scales, PyTorch float64 ones with an int64 zero point,
    # which weigh on these 32-wide rows (a fp32 model would be about 3x the torchao one)
    assert 1 < weights_memory_bytes(fbgemm) / weights_memory_bytes(torchao) < 1.3
