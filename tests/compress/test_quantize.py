"""Post-training quantisation: torchao's int8 paths on tiny Llama and DeepSeek-V3 (a folder that loads
with plain transformers and with seektune, int8 weights with per-channel scales, logits and greedy tokens
close to fp32, a smaller file, counts in the details), the source never touched, and the refusals (an
already-quantised source, a GPU method on a CPU). The bitsandbytes paths run where a CUDA GPU exists."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from seektune.compress.quantize import already_quantized, quantize_model
from seektune.compress.table import count_parameters
from seektune.config import ModelConfig, QuantizeConfig
from seektune.errors import UserError
from seektune.models.load import load_model
from train import tinymodels

BUILDERS = {"llama": tinymodels.llama, "deepseek_v3": tinymodels.deepseek_v3}
CPU_METHODS = ("int8_weight_only", "int8_dynamic")
GPU_METHODS = ("bnb_int8", "bnb_nf4", "fp8")
PROMPT_LEN = 16
# Measured on the seeded tiny models: the largest logit difference is 0.4-0.7% of the largest |logit|.
RELATIVE_LOGIT_TOLERANCE = 0.02


def _ids() -> torch.Tensor:
    return torch.randint(8, tinymodels.VOCAB, (4, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cpu(folder: Path, device: str = "cpu") -> ModelConfig:
    # int8_kernel torchao: these tests check torchao's own path (auto may swap in fbgemm kernels).
    return ModelConfig(name_or_path=str(folder), device=device, dtype="float32", int8_kernel="torchao")


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The Linear layers TorchAoConfig quantises: all but the output embedding."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seeded tiny models saved in fp32 with the word tokenizer."""
    root = tmp_path_factory.mktemp("quantize-sources")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
        tinymodels.word_tokenizer().save_pretrained(root / name)
    return {name: root / name for name in BUILDERS}


@pytest.fixture(scope="module")
def quantised(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple]:
    """Every (family, CPU method) quantised once: (output, source hashes before, source hashes after)."""
    root = tmp_path_factory.mktemp("quantized")
    done = {}
    for family, source in sources.items():
        for method in CPU_METHODS:
            before = _hashes(source)
            output = quantize_model(
                source, root / f"{family}-{method}", QuantizeConfig(method=method), _cpu(source)
            )
            done[family, method] = (output, before, _hashes(source))
    return done


@pytest.fixture(scope="module")
def models(sources, quantised) -> dict:
    """The fp32 models by family and the quantised ones by (family, method), loaded with plain
    transformers (torchao's kernels), in eval mode."""
    loaded: dict = {f: AutoModelForCausalLM.from_pretrained(s).eval() for f, s in sources.items()}
    for key, (output, _, _) in quantised.items():
        loaded[key] = AutoModelForCausalLM.from_pretrained(output.model_dir).eval()
    return loaded


CASES = [(family, method) for family in BUILDERS for method in CPU_METHODS]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_int8_weights_with_one_scale_per_output_channel(quantised, models, family, method):
    from torchao.quantization import Int8Tensor

    output, _, _ = quantised[family, method]
    model, original = models[family, method], models[family]
    names = _linear_names(original)
    assert names
    for name in names:
        weight = model.get_submodule(name).weight
        out_features, in_features = original.get_submodule(name).weight.shape
        assert isinstance(weight, Int8Tensor), name
        assert weight.qdata.dtype == torch.int8 and tuple(weight.qdata.shape) == (out_features, in_features)
        float_weight = original.get_submodule(name).weight.detach()
        scale = weight.scale.reshape(-1)
        assert scale.numel() == out_features, name  # one scale per output channel: its largest |weight|
        torch.testing.assert_close(scale, float_weight.abs().amax(dim=1) / 127.5)  # over the symmetric grid
        rounding = (weight.qdata.float() * scale[:, None] - float_weight).abs() / scale[:, None]
        assert rounding.max() <= 0.5 + 1e-4, name  # each weight rounded to its nearest int8 step
        dynamic = getattr(weight, "act_quant_kwargs", None) is not None
        assert dynamic == (method == "int8_dynamic"), name
    assert type(model.lm_head.weight) is torch.nn.Parameter  # the output embedding stays float
    assert model.lm_head.weight.dtype == torch.float32
    assert already_quantized(output.model_dir) == "torchao"


@pytest.mark.parametrize(("family", "method"), CASES)
def test_logits_and_greedy_tokens_stay_close_to_fp32(models, family, method):
    reference, model = models[family], models[family, method]
    ids = _ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    difference = (expected - got).abs().max() / expected.abs().max()
    assert 0 < difference < RELATIVE_LOGIT_TOLERANCE  # rounded, but close
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tinymodels.PAD}
    answer = model.generate(ids[:1], **greedy)[0, PROMPT_LEN:]
    assert len(answer) > 0
    assert answer.tolist() == reference.generate(ids[:1], **greedy)[0, PROMPT_LEN:].tolist()


@pytest.mark.parametrize(("family", "method"), CASES)
def test_seektune_load_model_reads_the_quantised_folder(quantised, models, family, method):
    from torchao.quantization import Int8Tensor

    output, _, _ = quantised[family, method]
    loaded = load_model(_cpu(output.model_dir))
    plain = models[family, method]
    assert all(isinstance(loaded.model.get_submodule(n).weight, Int8Tensor) for n in _linear_names(plain))
    assert loaded.tokenizer.pad_token_id == tinymodels.PAD
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(_ids()).logits, plain(_ids()).logits)


def _linear_weight_bytes(folder: Path, names: list[str]) -> int:
    """Bytes in model.safetensors of the Linear weights `names` (int8 data, scales and zero points)."""
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 - safe_open is not iterable
            module, _, tensor = key.rpartition(".")
            if module in names and (tensor == "weight" or tensor.startswith("_weight_")):
                t = weights.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize(("family", "method"), CASES)
def test_linear_weights_take_under_30_percent_of_fp32_on_disk(quantised, sources, models, family, method):
    output, _, _ = quantised[family, method]
    names = _linear_names(models[family])
    fp32 = _linear_weight_bytes(sources[family], names)
    int8 = _linear_weight_bytes(output.model_dir, names)
    # every Linear weight was found in the fp32 file
    assert fp32 == 4 * sum(models[family].get_submodule(n).weight.numel() for n in names)
    assert 0 < int8 <= 0.30 * fp32
    assert (output.model_dir / "model.safetensors").stat().st_size < (
        sources[family] / "model.safetensors"
    ).stat().st_size


@pytest.mark.parametrize(("family", "method"), CASES)
def test_details_count_what_was_quantised_and_the_source_is_untouched(quantised, models, family, method):
    output, before, after = quantised[family, method]
    original = models[family]
    names = _linear_names(original)
    quantised_params = sum(original.get_submodule(n).weight.numel() for n in names)
    total = sum(p.numel() for p in original.parameters())
    assert output.name == "quantize" and output.files == []
    assert output.details["method"] == method
    assert output.details["quantized_linears"] == len(names)
    assert output.details["parameters_quantized"] == quantised_params
    assert output.details["parameters_left_float"] == total - quantised_params
    assert ("per token" in output.details["scheme"]) == (method == "int8_dynamic")
    assert after == before  # the source folder is only read
    assert (output.model_dir / "tokenizer.json").is_file()
    assert not output.model_dir.with_name(f".{output.model_dir.name}-partial").exists()


def test_quantising_an_already_quantised_model_is_refused(quantised, tmp_path):
    output, _, _ = quantised["llama", "int8_dynamic"]
    before = _hashes(output.model_dir)
    with pytest.raises(UserError, match=r"already quantised \(torchao\).*float model") as error:
        quantize_model(
            output.model_dir,
            tmp_path / "twice",
            QuantizeConfig(method="int8_dynamic"),
            _cpu(output.model_dir),
        )
    assert "\n" not in str(error.value)
    assert str(output.model_dir) in str(error.value)
    assert _hashes(output.model_dir) == before
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("method", GPU_METHODS)
def test_gpu_methods_stop_with_one_line_on_a_cpu(sources, tmp_path, monkeypatch, method, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = sources["llama"]
    before = _hashes(source)
    with pytest.raises(UserError, match=f"compress.quantize.method {method} needs a CUDA GPU") as error:
        quantize_model(source, tmp_path / "q", QuantizeConfig(method=method), _cpu(source, device=device))
    assert "\n" not in str(error.value) and "int8_dynamic" in str(error.value)
    assert not (tmp_path / "q").exists()
    assert _hashes(source) == before


@pytest.mark.parametrize("method", ["bnb_int8", "bnb_nf4"])
def test_bitsandbytes_missing_is_one_line(sources, tmp_path, monkeypatch, method):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # checked before anything loads
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    source = sources["llama"]
    with pytest.raises(UserError, match=f"{method} needs bitsandbytes: pip install bitsandbytes"):
        quantize_model(source, tmp_path / "q", QuantizeConfig(method=method), _cpu(source, device="auto"))
    assert not (tmp_path / "q").exists()


def test_fp8_on_an_older_gpu_is_one_line(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    source = sources["llama"]
    with pytest.raises(UserError, match=r"fp8 needs a GPU of compute capability 8\.9.*this one has 8\.0"):
        quantize_model(source, tmp_path / "q", QuantizeConfig(method="fp8"), _cpu(source, device="auto"))
    assert not (tmp_path / "q").exists()


def test_a_failure_while_writing_leaves_no_output_folder(sources, tmp_path, monkeypatch):
    import seektune.models.load as load

    class BrokenTokenizer:
        def save_pretrained(self, folder: str) -> None:
            (Path(folder) / "tokenizer.json").write_text("{")  # half-written
            raise OSError("disk full")

    monkeypatch.setattr(load, "load_tokenizer", lambda *args, **kwargs: BrokenTokenizer())
    source = sources["llama"]
    out = tmp_path / "q"
    with pytest.raises(OSError, match="disk full"):
        quantize_model(source, out, QuantizeConfig(method="int8_weight_only"), _cpu(source))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes)")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("method", ["bnb_int8", "bnb_nf4"])
def test_bitsandbytes_methods_on_a_gpu(sources, tmp_path, method):
    source = sources["llama"]
    before = _hashes(source)
    output = quantize_model(
        source, tmp_path / "q", QuantizeConfig(method=method), ModelConfig(name_or_path=str(source))
    )
    names = _linear_names(AutoModelForCausalLM.from_pretrained(source))
    assert output.details["quantized_linears"] == len(names)
    assert _hashes(source) == before
    model = AutoModelForCausalLM.from_pretrained(output.model_dir, device_map={"": "cuda"}).eval()
    fp32_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(source).parameters())
    assert count_parameters(model)[0] == fp32_total  # 4-bit weights counted unpacked
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).cuda().eval()
    ids = _ids().cuda()
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits.float()
    # 4-bit NF4 rounds much more coarsely than int8; both stay well inside the logit scale.
    tolerance = 0.05 if method == "bnb_int8" else 0.25
    assert (expected - got).abs().max() / expected.abs().max() < tolerance
    greedy = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=tinymodels.PAD)
    assert greedy.shape[1] > PROMPT_LEN
