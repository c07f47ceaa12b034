"""Pruning: global L1 over the whole pool (fused experts included), the cubic schedule, recovery that keeps
pruned weights at zero, channels and heads removed physically by importance, a plain saved model, and the
source folder only read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from seektune.compress import prune
from seektune.compress.prune import dense_mlps, prune_model, sparsity_schedule, unstructured_pool
from seektune.compress.steps import StepOutput
from seektune.config import ModelConfig, PruneConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from train import tinymodels

CPU = ModelConfig(device="cpu", dtype="float32")
BUILDERS = {"llama": tinymodels.llama, "deepseek_v3": tinymodels.deepseek_v3}
IDS = torch.tensor([[1, 12, 30, 9, 44, 17, 3, 60], [5, 5, 21, 8, 13, 40, 2, 11]])
TRAIN = TrainConfig(batch_size=8, logging_steps=1, warmup_ratio=0.0)


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    tinymodels.word_tokenizer().save_pretrained(folder)
    return folder


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return sorted(weights.keys())


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _data(train: bool = True) -> PreparedData:
    rows = {"train": tinymodels.domain_split({"a": 24, "easy": 24})} if train else {}
    return PreparedData(records={}, tokenized={**rows, "validation": []})


def _prune(source: Path, out: Path, data: PreparedData | None = None, **cfg) -> StepOutput:
    config = PruneConfig(enabled=True, **cfg)
    return prune_model(source, out, out.parent / "work", config, CPU, TRAIN, data or _data(False), 0)


def _pool_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [getattr(module, name).detach() for module, name in unstructured_pool(model)]


def _pool_names(model: torch.nn.Module) -> set[str]:
    owners = {id(module): name for name, module in model.named_modules()}
    return {f"{owners[id(module)]}.{name}" for module, name in unstructured_pool(model)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-sources")
    return {name: _save(build(), root / name) for name, build in BUILDERS.items()}


def test_schedule_is_cubic() -> None:
    assert sparsity_schedule(0.5, 1) == [0.5]
    schedule = sparsity_schedule(0.8, 4)
    expected = [0.8 * (1 - 0.75**3), 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.25**3), 0.8]
    assert schedule == pytest.approx(expected)
    assert schedule[0] == pytest.approx(0.4625)  # most is pruned early, little near the end


@pytest.mark.parametrize("family", BUILDERS)
def test_unstructured_prunes_the_smallest_weights_of_the_whole_pool(sources, tmp_path, family):
    source = sources[family]
    before = _digest(source)
    output = _prune(source, tmp_path / "pruned", mode="unstructured", sparsity=0.6)
    assert _digest(source) == before  # the source folder is only read
    assert not (tmp_path / ".pruned-partial").exists()
    details = output.details
    assert details["mode"] == "unstructured" and details["steps"] == 1
    assert abs(details["pool_zero_share"] - 0.6) < 0.01
    assert 0 < details["all_zero_share"] < details["pool_zero_share"]

    assert _keys(output.model_dir) == _keys(source)  # the model's own names: no weight_orig / weight_mask
    pruned, original = _load(output.model_dir), _load(source)
    weights, originals = _pool_weights(pruned), _pool_weights(original)
    zeros = torch.cat([(w == 0).flatten() for w in weights])
    magnitudes = torch.cat([w.abs().flatten() for w in originals])
    assert abs(zeros.float().mean().item() - 0.6) < 0.01  # the reloaded model has the zeros
    assert details["pool_parameters"] == zeros.numel()
    # Global L1: every pruned weight was no larger than every kept one, across all layers together...
    assert magnitudes[zeros].max() <= magnitudes[~zeros].min()
    # (pruning each layer to 60% on its own would break this with near certainty); kept weights unchanged.
    for kept, start in zip(weights, originals, strict=True):
        torch.testing.assert_close(kept[kept != 0], start[kept != 0], rtol=0, atol=0)
    pool = _pool_names(pruned)
    starts = original.state_dict()
    for name, tensor in pruned.state_dict().items():
        if name not in pool:
            assert torch.equal(tensor, starts[name]), name  # embeddings, head, norms, routers untouched
    if family == "deepseek_v3":
        experts = pruned.model.layers[1].mlp.experts
        assert details["pool_expert_parameters"] == experts.gate_up_proj.numel() + experts.down_proj.numel()
        assert (experts.gate_up_proj == 0).any() and (experts.down_proj == 0).any()


def test_gradual_schedule_hits_the_intermediate_targets(sources, tmp_path):
    output = _prune(sources["llama"], tmp_path / "pruned", mode="unstructured", sparsity=0.7, steps=3)
    per_step = output.details["per_step"]
    assert [row["step"] for row in per_step] == [1, 2, 3]
    for row, target in zip(per_step, sparsity_schedule(0.7, 3), strict=True):
        assert row["target"] == pytest.approx(target)
        assert abs(row["sparsity_reached"] - target) < 0.01
        assert "recovery_first_loss" not in row  # recovery_steps 0: no fine-tuning
    assert abs(output.details["pool_zero_share"] - 0.7) < 0.01


def test_large_pools_get_their_threshold_from_a_sample(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(prune, "EXACT_THRESHOLD_LIMIT", 1000)
    monkeypatch.setattr(prune, "SAMPLE_SIZE", 2**14)
    output = _prune(sources["deepseek_v3"], tmp_path / "pruned", mode="unstructured", sparsity=0.5)
    assert abs(output.details["pool_zero_share"] - 0.5) < 0.01


@pytest.mark.parametrize("family", BUILDERS)
def test_channels_shrink_the_dense_mlps(sources, tmp_path, family):
    output = _prune(sources[family], tmp_path / "pruned", mode="channels", sparsity=0.25)
    details = output.details
    assert details["channels_before"] == 64 and details["channels_after"] == 48
    assert details["parameters_after"] < details["parameters_before"]
    model, original = _load(output.model_dir), _load(sources[family])  # plain from_pretrained
    assert model.config.intermediate_size == 48
    mlps = dense_mlps(model)
    assert len(mlps) == details["dense_mlps"] == (2 if family == "llama" else 1)
    for mlp in mlps:
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (48, 32)
        assert mlp.down_proj.weight.shape == (32, 48)
    if family == "deepseek_v3":  # the MoE block's experts and shared experts are left alone
        moe, start = model.model.layers[1].mlp, original.model.layers[1].mlp
        assert "experts" in details["left_alone"]
        for name, tensor in moe.state_dict().items():
            assert torch.equal(tensor, start.state_dict()[name]), name
    assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (2, 12)


@pytest.mark.parametrize("family", BUILDERS)
def test_the_least_important_channel_is_the_one_removed(tmp_path, family):
    model = BUILDERS[family]()
    dead = {}
    with torch.no_grad():
        for index, mlp in enumerate(dense_mlps(model)):
            dead[index] = 5 + 7 * index  # another channel in every block
            mlp.down_proj.weight[:, dead[index]] = 0  # the channel adds nothing to the residual stream
    source = _save(model, tmp_path / "source")
    output = _prune(source, tmp_path / "pruned", mode="channels", sparsity=1 / 64)
    pruned = _load(output.model_dir)
    assert pruned.config.intermediate_size == 63
    for index, (mlp, start) in enumerate(zip(dense_mlps(pruned), dense_mlps(model), strict=True)):
        kept = [j for j in range(64) if j != dead[index]]
        assert torch.equal(mlp.gate_proj.weight, start.gate_proj.weight[kept])
        assert torch.equal(mlp.down_proj.weight, start.down_proj.weight[:, kept])
    torch.testing.assert_close(_logits(pruned), _logits(model.eval()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["channels", "heads"])
def test_removing_nothing_leaves_the_model_as_it_was(sources, tmp_path, mode):
    output = _prune(sources["deepseek_v3"], tmp_path / "pruned", mode=mode, sparsity=0.0)
    pruned, original = _load(output.model_dir), _load(sources["deepseek_v3"])
    assert _keys(output.model_dir) == _keys(sources["deepseek_v3"])
    assert output.details["parameters_after"] == output.details["parameters_before"]
    torch.testing.assert_close(_logits(pruned), _logits(original), atol=0, rtol=0)


@pytest.mark.parametrize("family", BUILDERS)
def test_heads_shrink_the_attention(sources, tmp_path, family):
    output = _prune(sources[family], tmp_path / "pruned", mode="heads", sparsity=0.5)
    details = output.details
    model = _load(output.model_dir)
    assert details["heads_before"] == 4 and details["heads_after"] == model.config.num_attention_heads == 2
    attention = model.model.layers[0].self_attn
    if family == "llama":  # one key-value group of two query heads left, head_dim kept at 8
        assert details["unit"] == "key-value group" and model.config.num_key_value_heads == 1
        assert model.config.head_dim == 8
        assert attention.q_proj.weight.shape == (16, 32) and attention.k_proj.weight.shape == (8, 32)
        assert attention.o_proj.weight.shape == (32, 16)
    else:  # MLA: per head 16 query rows, 8 + 8 key/value rows, 8 output columns
        assert details["unit"] == "head" and model.config.num_key_value_heads == 2
        assert attention.q_proj.weight.shape == (32, 32) and attention.kv_b_proj.weight.shape == (32, 16)
        assert attention.o_proj.weight.shape == (32, 16)
    assert details["parameters_after"] < details["parameters_before"]
    assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (2, 12)


def _qwen2() -> torch.nn.Module:
    """A tiny Qwen2 (biases on q/k/v_proj), built like tinymodels.llama."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=tinymodels.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tinymodels.PAD,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).float()


HEAD_BUILDERS = {
    **BUILDERS,
    "qwen2": _qwen2,
    "deepseek_v3_q_lora": lambda: tinymodels.deepseek_v3(q_lora_rank=16),  # query through q_a/q_b_proj
}


@pytest.mark.parametrize("family", HEAD_BUILDERS)
def test_the_least_important_head_is_the_one_removed(tmp_path, family):
    model = HEAD_BUILDERS[family]()
    gqa = family in ("llama", "qwen2")
    # GQA: key-value group 1 (query heads 2 and 3, o_proj columns 16..31); MLA: head 2 (columns 16..23).
    dead, columns, sparsity = (1, slice(16, 32), 0.5) if gqa else (2, slice(16, 24), 0.25)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, columns] = 0  # the unit adds nothing
    source = _save(model, tmp_path / "source")
    pruned = _load(_prune(source, tmp_path / "pruned", mode="heads", sparsity=sparsity).model_dir)
    for layer, start in zip(pruned.model.layers, model.model.layers, strict=True):
        attention, before = layer.self_attn, start.self_attn
        if gqa:
            kept = [i for i in range(16) if i // 8 != dead]
            assert torch.equal(attention.k_proj.weight, before.k_proj.weight[kept])
            if family == "qwen2":
                assert torch.equal(attention.k_proj.bias, before.k_proj.bias[kept])
        else:
            kept = [i for i in range(64) if i // 16 != dead]
            query = "q_proj" if family == "deepseek_v3" else "q_b_proj"
            assert torch.equal(getattr(attention, query).weight, getattr(before, query).weight[kept])
    torch.testing.assert_close(_logits(pruned), _logits(model.eval()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["channels", "heads"])
def test_structured_sparsity_one_is_refused_by_the_config(mode):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"sparsity 1.0 with mode .* would remove every"):
        PruneConfig(enabled=True, mode=mode, sparsity=1.0)


def test_an_adapter_is_refused_with_merge_first(sources, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(sources["llama"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="merge it first"):
        _prune(tmp_path / "adapter", tmp_path / "pruned", mode="unstructured")


def test_a_family_without_a_structured_layout_is_refused(tmp_path):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tinymodels.PAD,
    )  # fmt: skip
    source = _save(AutoModelForCausalLM.from_config(config), tmp_path / "mistral")
    forced = CPU.model_copy(update={"family": "llama"})  # loads, but is no Llama module layout
    cfg = PruneConfig(enabled=True, mode="heads")
    with pytest.raises(UserError, match=r"compress\.prune\.mode.*llama, qwen2, deepseek_v2, deepseek_v3"):
        prune_model(source, tmp_path / "pruned", tmp_path / "work", cfg, forced, TRAIN, _data(False), 0)


def test_recovery_without_a_training_split_is_refused(sources, tmp_path):
    with pytest.raises(UserError, match=r"compress\.prune\.recovery_steps"):
        _prune(sources["llama"], tmp_path / "pruned", mode="unstructured", recovery_steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("family", BUILDERS)
def test_recovery_keeps_pruned_weights_zero_and_the_loss_falls(sources, tmp_path, family):
    cfg = {"mode": "unstructured", "sparsity": 0.5}
    plain = _pool_weights(_load(_prune(sources[family], tmp_path / "plain", **cfg).model_dir))
    output = _prune(
        sources[family], tmp_path / "recovered", _data(), recovery_steps=6, recovery_learning_rate=1e-2, **cfg
    )
    (row,) = output.details["per_step"]
    assert row["recovery_last_loss"] < row["recovery_first_loss"]
    recovered = _pool_weights(_load(output.model_dir))
    for before, after in zip(plain, recovered, strict=True):
        assert torch.equal(after == 0, before == 0)  # the same weights pruned, none revived by training
    assert not all(torch.equal(a, b) for a, b in zip(plain, recovered, strict=True))  # the rest trained


@pytest.mark.slow
@pytest.mark.parametrize(("family", "mode"), [("llama", "heads"), ("deepseek_v3", "channels")])
def test_gradual_structured_pruning_with_recovery(sources, tmp_path, family, mode):
    output = _prune(
        sources[family], tmp_path / "pruned", _data(), mode=mode, sparsity=0.5, steps=2, recovery_steps=4,
        recovery_learning_rate=1e-2,
    )  # fmt: skip
    per_step = output.details["per_step"]
    expected = [0.5, 0.5] if mode == "heads" else [28 / 64, 0.5]  # 2 groups: round(0.4375 * 2) = 1
    assert [row["sparsity_reached"] for row in per_step] == expected
    assert all(row["recovery_last_loss"] < row["recovery_first_loss"] for row in per_step)
    model = _load(output.model_dir)
    assert model.generate(IDS, max_new_tokens=2, do_sample=False).shape == (2, 10)
