"""Adapter merge: logit parity for LoRA/DoRA on Llama and DeepSeek-V3, a plain saved model, the adapter left
untouched, wrong or unmergeable bases refused; the base fingerprint and the trainer writing it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from seektune.compress.merge import merge_adapter, needs_merge
from seektune.config import AdapterConfig, MergeConfig, MethodConfig, ModelConfig
from seektune.errors import UserError
from seektune.models.adapters import apply_adapters
from seektune.models.families import detect_family
from seektune.models.fingerprint import (
    FINGERPRINT_FILE,
    base_fingerprint,
    read_fingerprint,
    write_fingerprint,
)
from seektune.models.methods import apply_method
from seektune.rundir import RunDir
from train import tinymodels

CPU = ModelConfig(device="cpu", dtype="float32")
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tokenizer():
    tokenizer = tinymodels.word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _save_base(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _ids() -> torch.Tensor:
    return torch.randint(8, tinymodels.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids()).logits


def _make_adapter(base_dir: Path, out: Path, method: str, fingerprint: bool = True, **lora) -> torch.Tensor:
    """A trained-looking adapter on the base in `base_dir` (B and DoRA magnitudes perturbed, so the
    adapter changes the output); returns base + adapter logits."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = MethodConfig(name=method, lora={"r": 4, "alpha": 8, "dropout": 0.0, **lora})
    model, _ = apply_method(base, cfg, detect_family(base.config))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    if fingerprint:
        write_fingerprint(out, model)
    return _logits(model)


def _weight_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return sorted(weights.keys())


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base(tinymodels.llama(), tmp_path_factory.mktemp("llama-base"))


@pytest.fixture(scope="module")
def deepseek_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base(tinymodels.deepseek_v3(), tmp_path_factory.mktemp("dsv3-base"))


@pytest.mark.parametrize(
    ("family", "method", "lora"),
    [
        ("llama", "lora", {}),
        ("llama", "dora", {}),
        ("deepseek", "lora", {"include_experts": True}),  # fused routed experts: PEFT's ParamWrapper
        ("deepseek", "dora", {}),
    ],
)
def test_merged_logits_equal_base_plus_adapter(
    family: str, method: str, lora: dict, llama_base: Path, deepseek_base: Path, tmp_path: Path
) -> None:
    base_dir = llama_base if family == "llama" else deepseek_base
    adapter_dir = tmp_path / "adapter"
    reference = _make_adapter(base_dir, adapter_dir, method, **lora)
    assert needs_merge(adapter_dir)
    output = merge_adapter(adapter_dir, tmp_path / "merged", MergeConfig(), CPU)
    merged = AutoModelForCausalLM.from_pretrained(output.model_dir, dtype=torch.float32)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    assert (reference - base_logits).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(_logits(merged), reference, atol=1e-5, rtol=0)
    assert _weight_names(output.model_dir) == _weight_names(base_dir)  # the hub layout (experts per expert)
    details = output.details
    assert details["base"] == str(base_dir) and details["base_verified"] is True
    assert details["adapter"]["type"] == method and details["adapter"]["r"] == 4
    assert details["adapter"]["alpha"] == 8 and details["merged_modules"] > 0
    if lora.get("include_experts"):
        assert details["adapter"]["target_parameters"]


def test_merged_folder_is_a_plain_model(llama_base: Path, tmp_path: Path) -> None:
    adapter_dir = tmp_path / "adapter"
    _make_adapter(llama_base, adapter_dir, "lora")
    before = _hashes(adapter_dir)
    out = merge_adapter(adapter_dir, tmp_path / "merged", MergeConfig(), CPU).model_dir
    assert _hashes(adapter_dir) == before  # the adapter folder is only read
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= names
    assert "adapter_config.json" not in names and not (tmp_path / ".merged-partial").exists()
    keys = _weight_names(out)
    assert keys and not any("lora" in key or "base_layer" in key for key in keys)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    assert not needs_merge(out)


def test_run_directory_source(llama_base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_adapter(llama_base, run / "model", "lora")
    (run / "status.json").write_text("{}")
    assert needs_merge(run)
    assert merge_adapter(run, tmp_path / "merged", MergeConfig(), CPU).details["base_verified"]


def test_wrong_base_with_fingerprint_is_refused(llama_base: Path, tmp_path: Path) -> None:
    other = tinymodels.llama()
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    other_dir = _save_base(other, tmp_path / "other-base")
    adapter_dir = tmp_path / "adapter"
    _make_adapter(llama_base, adapter_dir, "lora")
    with pytest.raises(UserError, match="not trained on") as caught:
        merge_adapter(adapter_dir, tmp_path / "merged", MergeConfig(base=str(other_dir)), CPU)
    assert str(llama_base) in str(caught.value) and str(other_dir) in str(caught.value)
    assert "compress.merge.base" in str(caught.value)
    assert not (tmp_path / "merged").exists()


def test_base_of_another_size_is_refused(llama_base: Path, tmp_path: Path) -> None:
    bigger = _save_base(tinymodels.llama(hidden_size=64, intermediate_size=128), tmp_path / "bigger")
    adapter_dir = tmp_path / "adapter"
    _make_adapter(llama_base, adapter_dir, "lora", fingerprint=False)  # only PEFT's shape check remains
    with pytest.raises(UserError, match="another size") as caught:
        merge_adapter(adapter_dir, tmp_path / "merged", MergeConfig(base=str(bigger)), CPU)
    assert "size mismatch" in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_without_fingerprint_merges_with_a_warning(
    llama_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter_dir = tmp_path / "adapter"
    _make_adapter(llama_base, adapter_dir, "lora", fingerprint=False)
    output = merge_adapter(adapter_dir, tmp_path / "merged", MergeConfig(), CPU)
    assert output.details["base_verified"] is False
    assert any("cannot verify" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("marker_key", "weights", "what"),
    [
        ("seektune_adapter", "adapters.safetensors", "bottleneck"),
        ("seektune_prefix", "prefix.safetensors", "prefix"),
    ],
)
def test_unmergeable_folders(marker_key: str, weights: str, what: str, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({marker_key: {}, "base_model_name_or_path": "b"})
    )
    (tmp_path / weights).write_bytes(b"")
    with pytest.raises(UserError, match=what) as caught:
        needs_merge(tmp_path)
    assert "compress.enabled: false" in str(caught.value) and "method.name lora" in str(caught.value)


def test_plain_model_and_hub_id_need_no_merge(llama_base: Path) -> None:
    assert not needs_merge(llama_base)
    assert not needs_merge(Path("org/some-model"))


def test_fingerprint_ignores_adapters_and_dtype_but_sees_weights(llama_base: Path) -> None:
    def load(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(llama_base, dtype=dtype)

    expected = base_fingerprint(load())
    assert expected.startswith("sha256:") and base_fingerprint(load()) == expected
    assert base_fingerprint(load(torch.bfloat16)) == expected
    lora = MethodConfig(name="dora", lora={"r": 4, "target_modules": "all-linear"})
    peft_model, _ = apply_method(load(), lora, detect_family(load().config))
    assert base_fingerprint(peft_model) == expected
    assert base_fingerprint(apply_adapters(load(), AdapterConfig())) == expected
    changed = load()
    with torch.no_grad():
        changed.model.layers[-1].input_layernorm.weight[0] += 0.5
    assert base_fingerprint(changed) != expected


def test_fingerprint_file_round_trip(llama_base: Path, tmp_path: Path) -> None:
    assert read_fingerprint(tmp_path) is None
    model = AutoModelForCausalLM.from_pretrained(llama_base)
    write_fingerprint(tmp_path, model)
    assert read_fingerprint(tmp_path) == base_fingerprint(model)
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["base"] == str(llama_base)
    (tmp_path / FINGERPRINT_FILE).write_text("{not json")
    assert read_fingerprint(tmp_path) is None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_save_final_writes_the_fingerprint_of_a_peft_model(
    method: str, llama_base: Path, tmp_path: Path
) -> None:
    from seektune.train.trainer import _save_final

    model = AutoModelForCausalLM.from_pretrained(llama_base)
    expected = base_fingerprint(model)
    if method == "lora":
        model, _ = apply_method(model, MethodConfig(name="lora"), detect_family(model.config))
    trainer = SimpleNamespace(
        model=model,
        is_world_process_zero=lambda: True,
        accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
        save_model=lambda folder: model.save_pretrained(folder),
    )
    final = _save_final(trainer, _tokenizer(), RunDir.create_at(tmp_path / "run"))
    assert read_fingerprint(final) == (expected if method == "lora" else None)


@pytest.mark.slow
def test_a_trained_lora_run_records_its_base_and_merges_verified(tmp_path: Path, base_cache: Path) -> None:
    from seektune.config import SeektuneConfig
    from seektune.pipeline import run_train_stage
    from support import tiny_run_config

    cfg = SeektuneConfig(**tiny_run_config(tmp_path, base_cache, eval={"enabled": False}))
    run = run_train_stage(cfg).path
    assert read_fingerprint(run / "model") is not None
    output = merge_adapter(run, tmp_path / "merged", cfg.compress.merge, cfg.model)
    assert output.details["base_verified"] is True and output.details["merged_modules"] > 0
