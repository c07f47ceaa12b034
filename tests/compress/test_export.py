"""GGUF export and the vLLM layout check: tiny Llama and Qwen2 models with a byte-level BPE tokenizer go to
GGUF (f32, f16, q8_0) and come back through transformers' GGUF reader with the same logits and tokenizer;
Llama's q/k rows are in llama.cpp's rotary order (Qwen2's as they were), Llama-3 rope scaling survives as
`rope_freqs`; what cannot be exported (DeepSeek-V3, a WordLevel tokenizer, a tensor llama.cpp has no
name for) is refused and leaves no folder; `vllm_layout_problems` names what vLLM would not load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from seektune.compress.export import export_gguf, gguf_unsupported, load_gguf, vllm_layout_problems
from seektune.config import ExportConfig, ModelConfig
from seektune.errors import UserError
from train import tinymodels

CPU = ModelConfig(device="cpu", dtype="float32")
VOCAB = tinymodels.BPE_VOCAB
EOS, PAD = 0, 1  # the BPE tokenizer's <|endoftext|> and <|pad|>
SAMPLES = ["Hello world! 12 apples,  345 pears.\n\tmerge + export", "<|endoftext|>the fox<|pad|>"]
IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # head_dim 8: frequency divisors 1, 8, 8, 8
}


def _qwen2(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        tie_word_embeddings=tied,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
    )
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: give them values the export must carry
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    return model


def _llama(**overrides) -> torch.nn.Module:
    return tinymodels.llama(
        vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, **overrides
    )


def _save(model: torch.nn.Module, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or tinymodels.bpe_tokenizer()).save_pretrained(folder)
    return folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _source_logits(folder: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _gguf_tensor(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return np.array(tensor.data, dtype=np.float32)


def _export(source: Path, out_dir: Path, gguf_type: str = "f32"):
    return export_gguf(source, out_dir, ExportConfig(gguf=True, gguf_type=gguf_type), CPU)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_f32(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _export(llama_dir, tmp_path_factory.mktemp("exports") / "llama-f32")


def test_llama_f32_round_trip(llama_dir: Path, llama_f32, tmp_path: Path) -> None:
    out = llama_f32.model_dir
    path = out / "model-f32.gguf"
    assert [p.name for p in out.iterdir()] == ["model-f32.gguf"] and llama_f32.files == [path]
    assert not (out.parent / f".{out.name}-partial").exists()
    loaded = load_gguf(out, CPU)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.family.name == "llama"
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu" and loaded.path == str(path)
    torch.testing.assert_close(_logits(loaded.model), _source_logits(llama_dir), atol=1e-4, rtol=0)
    source = AutoTokenizer.from_pretrained(llama_dir)
    for text in SAMPLES:
        assert loaded.tokenizer.encode(text) == source.encode(text)
        assert loaded.tokenizer.decode(source.encode(text)) == text
    assert (loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id) == (EOS, PAD)
    assert loaded.tokenizer.chat_template == tinymodels.BPE_TEMPLATE
    assert (loaded.model.config.eos_token_id, loaded.model.config.pad_token_id) == (EOS, PAD)
    details = llama_f32.details
    assert details["architecture"] == "llama" and details["type"] == "f32" and details["vocab_size"] == VOCAB
    assert details["bytes"] == path.stat().st_size and details["tensor_types"] == {"F32": details["tensors"]}
    # embeddings, head, final norm + 9 per block (4 attention, 3 MLP, 2 norms)
    assert details["tensors"] == 3 + 9 * 2 and details["tokenizer_round_trip"] is True
    assert details["tokenizer_pre"] == "gpt-2"


def test_llama_q_and_k_rows_are_in_llama_cpp_rotary_order(llama_dir: Path, llama_f32) -> None:
    """llama.cpp rotates pairs of adjacent rows, transformers the two halves of each head: per head, row
    2i of the file is the checkpoint's row i and row 2i+1 its row i + head_dim/2."""
    path = llama_f32.files[0]
    weights = load_file(str(llama_dir / "model.safetensors"))
    for name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        gguf_rows = _gguf_tensor(path, f"blk.0.{name}.weight").reshape(heads, 8, 32)
        hf_rows = weights[f"model.layers.0.self_attn.{hf_name}.weight"].numpy().reshape(heads, 8, 32)
        np.testing.assert_array_equal(gguf_rows[:, 0::2], hf_rows[:, :4])
        np.testing.assert_array_equal(gguf_rows[:, 1::2], hf_rows[:, 4:])
    value = weights["model.layers.0.self_attn.v_proj.weight"].numpy()
    np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_v.weight"), value)


def test_source_folder_is_only_read(llama_dir: Path, tmp_path: Path) -> None:
    before = _hashes(llama_dir)
    _export(llama_dir, tmp_path / "out")
    assert _hashes(llama_dir) == before


@pytest.mark.parametrize(("gguf_type", "stored", "atol"), [("f16", "F16", 2e-3), ("q8_0", "Q8_0", 2e-2)])
def test_llama_f16_and_q8_0_load_and_agree(
    gguf_type: str, stored: str, atol: float, llama_dir: Path, llama_f32, tmp_path: Path
) -> None:
    output = _export(llama_dir, tmp_path / gguf_type, gguf_type)
    # every matrix in the file's type, norms F32 (as llama.cpp writes them)
    assert output.details["tensor_types"] == {stored: 16, "F32": 5}
    assert output.details["bytes"] < llama_f32.details["bytes"] * (0.55 if gguf_type == "f16" else 0.35)
    loaded = load_gguf(output.model_dir, CPU)
    reference = _source_logits(llama_dir)
    after = _logits(loaded.model)
    assert 0 < (after - reference).abs().max() <= atol
    agreement = (after.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agreement >= 0.9
    prompt = IDS[:1, :8]
    source_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": PAD}
    expected = source_model.generate(prompt, **greedy)[0, 8:]
    produced = loaded.model.generate(prompt, **greedy)[0, 8:]
    assert (expected[:6] == produced[:6]).all()


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_f32_round_trip(tied: bool, tmp_path: Path) -> None:
    qwen2_dir = _save(_qwen2(tied), tmp_path / "qwen2")
    output = _export(qwen2_dir, tmp_path / "out")
    # a tied head is the embedding matrix: llama.cpp files then have no output tensor
    assert output.details["tensors"] == 2 + 12 * 2 + (0 if tied else 1)
    loaded = load_gguf(output.model_dir, CPU)
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM" and loaded.family.name == "qwen2"
    assert loaded.model.config.tie_word_embeddings is tied
    torch.testing.assert_close(_logits(loaded.model), _source_logits(qwen2_dir), atol=1e-4, rtol=0)
    # transformers gives Qwen2 its own pre-tokenizer (a regex split), which llama.cpp calls qwen2
    assert output.details["tokenizer_pre"] == "qwen2" and output.details["tokenizer_round_trip"] is True
    source = AutoTokenizer.from_pretrained(qwen2_dir)
    assert all(loaded.tokenizer.encode(t) == source.encode(t) for t in SAMPLES)
    weights = load_file(str(qwen2_dir / "model.safetensors"))
    path = output.files[0]
    for name, hf_name in (("attn_q.weight", "q_proj.weight"), ("attn_k.bias", "k_proj.bias")):
        hf_tensor = weights[f"model.layers.1.self_attn.{hf_name}"].numpy()
        np.testing.assert_array_equal(_gguf_tensor(path, f"blk.1.{name}"), hf_tensor)  # not permuted


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path: Path) -> None:
    source = _save(_llama(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512), tmp_path / "llama3")
    output = _export(source, tmp_path / "out")
    path = output.files[0]
    np.testing.assert_allclose(_gguf_tensor(path, "rope_freqs.weight"), [1, 8, 8, 8])
    loaded = load_gguf(output.model_dir, CPU).model
    torch.testing.assert_close(_logits(loaded), _source_logits(source), atol=1e-4, rtol=0)
    expected = AutoModelForCausalLM.from_pretrained(source).model.rotary_emb.inv_freq
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, expected)
    # transformers' reader alone ignores the tensor: its frequencies are the unscaled ones
    plain = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.testing.assert_close(plain.model.rotary_emb.inv_freq[1:], expected[1:] * 8)


def test_deepseek_v3_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = _save(tinymodels.deepseek_v3(vocab_size=VOCAB, pad_token_id=PAD), tmp_path / "dsv3")
    reason = gguf_unsupported(source)
    assert reason == (
        "compress.export.gguf supports llama and qwen2 models (the R1 distills); "
        f"{source} is deepseek_v3: turn compress.export.gguf off"
    )
    with pytest.raises(UserError) as caught:
        _export(source, tmp_path / "out")
    assert str(caught.value) == reason
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out-partial").exists()


def test_adapter_folder_is_judged_by_its_base(llama_dir: Path, tmp_path: Path) -> None:
    deepseek = _save(tinymodels.deepseek_v3(vocab_size=VOCAB, pad_token_id=PAD), tmp_path / "dsv3")
    for base, supported in ((llama_dir, True), (deepseek, False)):
        adapter = tmp_path / f"adapter-{base.name}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base)})
        )
        tinymodels.bpe_tokenizer().save_pretrained(adapter)
        reason = gguf_unsupported(adapter)
        assert (reason is None) if supported else ("deepseek_v3" in reason and str(deepseek) in reason)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "llama", "attention_bias": True}, "biases"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
        ({"model_type": "qwen2", "quantization_config": {"quant_method": "torchao"}}, "quantised"),
    ],
)
def test_configs_the_reader_would_not_keep_are_refused(config: dict, reason: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = gguf_unsupported(tmp_path)
    assert message is not None and reason in message and message.endswith("turn compress.export.gguf off")


def test_word_level_tokenizer_is_refused(tmp_path: Path) -> None:
    source = _save(tinymodels.llama(), tmp_path / "word", tinymodels.word_tokenizer())
    reason = gguf_unsupported(source)
    assert reason is not None and "WordLevel" in reason and "byte-level BPE" in reason
    with pytest.raises(UserError, match="WordLevel"):
        _export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_no_folder(llama_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "masked"
    shutil.copytree(llama_dir, source)
    weights = load_file(str(source / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight_mask"] = torch.ones(32, 64)  # a pruning leftover
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    assert gguf_unsupported(source) is None  # only the tensors tell
    with pytest.raises(UserError, match="weight_mask") as caught:
        _export(source, tmp_path / "out")
    assert "llama.cpp has no name" in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out-partial").exists()


# -- vLLM layout ---------------------------------------------------------------------------------------


def test_a_saved_model_has_the_vllm_layout(llama_dir: Path) -> None:
    assert vllm_layout_problems(llama_dir) == []


def test_pickle_weights_only(llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    shutil.copytree(llama_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    problems = vllm_layout_problems(folder)
    assert len(problems) == 1 and "pytorch_model.bin" in problems[0] and "safetensors" in problems[0]


def test_pruning_and_peft_leftovers(llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "masked"
    shutil.copytree(llama_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight_mask"] = torch.ones(32, 64)
    weights["model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    problems = vllm_layout_problems(folder)
    assert len(problems) == 1 and "2 tensors" in problems[0]
    assert "weight_mask" in problems[0] and "lora_A" in problems[0]


def test_missing_tokenizer_config_and_index(llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    weights = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:5]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: weights[n] for n in names[5:]}, str(folder / "model-00002-of-00002.safetensors"))
    problems = vllm_layout_problems(folder)
    assert len(problems) == 3
    assert "config.json" in problems[0] and "index" in problems[1] and "tokenizer" in problems[2]


@pytest.mark.parametrize(
    ("method", "readable"), [("torchao", True), ("bitsandbytes", True), ("quanto", False)]
)
def test_quantisation_methods(method: str, readable: bool, llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / method
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (folder / "config.json").write_text(json.dumps(config))
    problems = vllm_layout_problems(folder)
    assert problems == [] if readable else (len(problems) == 1 and method in problems[0])


def test_an_adapter_folder_is_no_vllm_model(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    problems = vllm_layout_problems(tmp_path)
    assert "PEFT adapter" in problems[0] and any("base_model.model." in p for p in problems)


def test_a_head_pruned_llama_says_its_head_size(llama_dir: Path, tmp_path: Path) -> None:
    from seektune.compress.prune import prune_model
    from seektune.config import PruneConfig, TrainConfig
    from seektune.data.prepare import PreparedData

    pruned = prune_model(
        llama_dir,
        tmp_path / "pruned",
        tmp_path / "work",
        PruneConfig(enabled=True, mode="heads", sparsity=0.5),
        CPU,
        TrainConfig(),
        PreparedData(records={}, tokenized={}),
        0,
    ).model_dir
    config = json.loads((pruned / "config.json").read_text())
    assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]
    assert gguf_unsupported(pruned) is None
    out = _export(pruned, tmp_path / "gguf").model_dir
    fields = GGUFReader(str(out / "model-f32.gguf")).fields
    assert int(fields["llama.attention.key_length"].parts[-1][0]) == config["head_dim"]
    torch.testing.assert_close(_logits(load_gguf(out, CPU).model), _source_logits(pruned), atol=1e-4, rtol=0)


def test_head_pruning_before_a_qwen2_export_is_refused(tmp_path: Path) -> None:
    folder = _save(_qwen2(), tmp_path / "qwen2")
    assert gguf_unsupported(folder) is None
    assert "prune channels instead" in gguf_unsupported(folder, heads_pruned=True)
