"""Quantisation-aware training: what is fake-quantised, that training sees what the int8 model computes,
and the plain float model the step writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seektune.compress.qat import (
    SymmetricPerTokenFakeQuantizer,
    prepare_qat,
    qat_finetune,
    remove_fake_quantization,
)
from seektune.compress.quantize import quantize_model
from seektune.config import ModelConfig, QatConfig, QuantizeConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from train.tinymodels import deepseek_v3, domain_split, llama, word_tokenizer

BUILDERS = {"llama": llama, "deepseek_v3": deepseek_v3}
IDS = torch.tensor([[1, 12, 30, 9, 44, 17, 3, 60], [5, 5, 21, 8, 13, 40, 2, 11]])


def _fake_quant_linear() -> type:
    from torchao.quantization.qat import FakeQuantizedLinear

    return FakeQuantizedLinear


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seeded tiny Llama and DeepSeek-V3 saved as plain model folders with the word tokenizer."""
    root = tmp_path_factory.mktemp("qat-sources")
    folders = {}
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _model_cfg(folder: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), device="cpu", dtype="float32", int8_kernel="torchao")


def _int8_linears(model) -> set[str]:
    from torchao.quantization import Int8Tensor

    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, Int8Tensor)
    }


@pytest.mark.parametrize(
    ("family", "method"),
    [("llama", "int8_dynamic"), ("llama", "int8_weight_only"), ("deepseek_v3", "int8_dynamic")],
)
def test_the_fake_quantised_model_computes_what_the_int8_model_does(sources, tmp_path, family, method):
    source = sources[family]
    float_model = AutoModelForCausalLM.from_pretrained(source).eval()
    prepared = AutoModelForCausalLM.from_pretrained(source).eval()
    swapped = prepare_qat(prepared, method)
    quantize_model(source, tmp_path / "q", QuantizeConfig(method=method), _model_cfg(source))
    int8 = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()  # plain transformers: torchao kernels

    fake = {n for n, m in prepared.named_modules() if isinstance(m, _fake_quant_linear())}
    assert fake == _int8_linears(int8) and len(fake) == swapped > 0  # exactly the Linears quantised later
    activations = {type(prepared.get_submodule(n).activation_fake_quantizer) for n in fake}
    assert activations == ({SymmetricPerTokenFakeQuantizer} if method == "int8_dynamic" else {type(None)})
    inputs = _linear_inputs(int8, fake)
    with torch.no_grad():
        for name, (x, y) in inputs.items():  # each Linear on the int8 model's own input to it
            error = (prepared.get_submodule(name)(x) - y).abs().max()
            rounding = (float_model.get_submodule(name)(x) - y).abs().max()  # what int8 changes
            assert error < rounding / 100 and error < 1e-6, name
        reference, faked, real = (m(input_ids=IDS).logits for m in (float_model, prepared, int8))
    # Whole models differ a little more (an fp32 ulp can move an activation across a rounding step, and the
    # next layer sees it), but the fake-quantised one stays far closer to the int8 one than the float one.
    assert (faked - real).abs().mean() < (reference - real).abs().mean() / 4


def _linear_inputs(model, names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every Linear in `names` during one forward pass of `model`."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
        for name in names
    ]
    with torch.no_grad():
        model(input_ids=IDS)
    for hook in hooks:
        hook.remove()
    return seen


def test_gradients_reach_every_fake_quantised_weight(sources):
    model = AutoModelForCausalLM.from_pretrained(sources["deepseek_v3"]).train()
    prepare_qat(model, "int8_dynamic")
    model(input_ids=IDS, labels=IDS).loss.backward()
    fake = [m for m in model.modules() if isinstance(m, _fake_quant_linear())]
    assert fake and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in fake)
    assert remove_fake_quantization(model) == len(fake)
    assert not any(isinstance(m, _fake_quant_linear()) for m in model.modules())


def test_qat_finetune_writes_a_plain_float_model_with_trained_weights(sources, tmp_path):
    source = sources["deepseek_v3"]
    before = _digest(source)
    data = PreparedData(
        records={}, tokenized={"train": domain_split({"a": 24, "easy": 24}), "validation": []}
    )
    output = qat_finetune(
        source,
        tmp_path / "qat",
        QatConfig(enabled=True, max_steps=6, learning_rate=1e-2),
        "int8_dynamic",
        _model_cfg(source),
        TrainConfig(batch_size=8, logging_steps=1, warmup_ratio=0.0),
        data,
        0,
        tmp_path / "work",
    )
    assert output.name == "qat" and output.model_dir == tmp_path / "qat"
    details = output.details
    assert details["steps"] == 6 and details["fake_quantized_linears"] > 0
    assert "per token" in details["scheme"]
    assert details["final_loss"] < details["first_loss"]
    assert _digest(source) == before  # the input folder is only read
    assert not (tmp_path / ".qat-partial").exists()

    trained = AutoModelForCausalLM.from_pretrained(output.model_dir)  # plain transformers, no torchao
    original = AutoModelForCausalLM.from_pretrained(source)
    linears = {n: m for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(type(m) is torch.nn.Linear for m in linears.values())
    assert "quantization_config" not in trained.config.to_dict()
    changed = [n for n, m in linears.items() if not torch.equal(m.weight, original.get_submodule(n).weight)]
    assert set(changed) == set(linears)  # every Linear trained (the fake-quantised ones through the STE)
    assert (output.model_dir / "tokenizer.json").is_file()
    assert (output.model_dir / "generation_config.json").is_file()


def test_a_method_without_an_int8_scheme_is_refused(sources, tmp_path):
    source = sources["llama"]
    data = PreparedData(records={}, tokenized={"train": domain_split({"a": 8}), "validation": []})
    with pytest.raises(UserError, match=r"compress\.quantize\.method.*'bnb_nf4'|'bnb_nf4'.*int8_dynamic"):
        qat_finetune(
            source,
            tmp_path / "qat",
            QatConfig(),
            "bnb_nf4",
            _model_cfg(source),
            TrainConfig(),
            data,
            0,
            tmp_path / "work",
        )
    assert not (tmp_path / "qat").exists()


@pytest.mark.parametrize(
    ("family", "method"), [("llama", "int8_weight_only"), ("deepseek_v3", "int8_dynamic")]
)
def test_the_qat_model_quantises_to_what_training_saw(sources, tmp_path, family, method):
    """QAT's output is a float model quantize_model accepts; its int8 version computes what the
    fake-quantised model trained on, and stays close to its own float logits."""
    source = sources[family]
    data = PreparedData(
        records={}, tokenized={"train": domain_split({"a": 16, "easy": 16}), "validation": []}
    )
    output = qat_finetune(
        source,
        tmp_path / "qat",
        QatConfig(enabled=True, max_steps=6, learning_rate=1e-2),
        method,
        _model_cfg(source),
        TrainConfig(batch_size=8, logging_steps=1, warmup_ratio=0.0),
        data,
        0,
        tmp_path / "work",
    )
    assert output.details["final_loss"] < output.details["first_loss"]
    assert ("per token" in output.details["scheme"]) == (method == "int8_dynamic")
    quantised = quantize_model(
        output.model_dir, tmp_path / "q", QuantizeConfig(method=method), _model_cfg(source)
    )
    assert quantised.details["quantized_linears"] == output.details["fake_quantized_linears"]

    trained = AutoModelForCausalLM.from_pretrained(output.model_dir).eval()
    faked = AutoModelForCausalLM.from_pretrained(output.model_dir).eval()
    prepare_qat(faked, method)
    int8 = AutoModelForCausalLM.from_pretrained(quantised.model_dir).eval()
    with torch.no_grad():
        for name, (x, y) in _linear_inputs(int8, _int8_linears(int8)).items():
            error = (faked.get_submodule(name)(x) - y).abs().max()
            rounding = (trained.get_submodule(name)(x) - y).abs().max()
            assert error < rounding / 100 and error < 1e-6, name  # what training saw is what int8 computes
        reference, fake, real = (m(input_ids=IDS).logits for m in (trained, faked, int8))
    assert 0 < (reference - real).abs().max() < 0.02 * reference.abs().max()
    assert (fake - real).abs().mean() < (reference - real).abs().mean()


def test_qat_after_pruning_keeps_the_zero_weights_zero(sources, tmp_path):
    pruned = tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(sources["llama"])
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, ::2] = 0  # half of every block Linear's weights, as pruning leaves them
    model.save_pretrained(pruned)
    word_tokenizer().save_pretrained(pruned)
    data = PreparedData(
        records={}, tokenized={"train": domain_split({"a": 24, "easy": 24}), "validation": []}
    )
    output = qat_finetune(
        pruned,
        tmp_path / "qat",
        QatConfig(enabled=True, max_steps=3, learning_rate=1e-2),
        "int8_weight_only",
        _model_cfg(pruned),
        TrainConfig(batch_size=8, logging_steps=1, warmup_ratio=0.0),
        data,
        0,
        tmp_path / "work",
        keep_zeros=True,
    )
    assert output.details["zeros_kept_in"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    trained = AutoModelForCausalLM.from_pretrained(output.model_dir)
    assert not any(k.endswith(("_orig", "_mask")) for k in trained.state_dict())
    for name, module in trained.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert not module.weight[:, ::2].any(), name  # still zero
            assert not torch.equal(module.weight, model.get_submodule(f"model.layers.{name}").weight)
