"""The before/after table: parameters and non-zero parameters (zeroed weights, fused experts, int8
tensors), relative changes against hand-computed values, the Markdown columns, and a measured row whose
size on disk is the sum of its weight files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seektune.compress.table import (
    COLUMNS,
    before_after_markdown,
    before_after_rows,
    count_parameters,
    measure_model,
    weights_memory_bytes,
)
from seektune.config import EvalConfig
from train import tinymodels

MINUS = "\u2212"
BUILDERS = {"llama": tinymodels.llama, "deepseek_v3": tinymodels.deepseek_v3}


def _ones_with_zeros(family: str) -> tuple[torch.nn.Module, int, int]:
    """A tiny model whose every weight is 1, except some zeroed blocks: (model, total, zeros)."""
    model = BUILDERS[family]()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
        attention = model.model.layers[0].self_attn
        attention.o_proj.weight[:5] = 0  # 5 whole output channels
        attention.o_proj.weight[6, :3] = 0
        zeros = 5 * attention.o_proj.in_features + 3
        if family == "deepseek_v3":
            experts = model.model.layers[1].mlp.experts
            fused = next(p for p in experts.parameters() if p.dim() == 3)
            fused[0] = 0  # one routed expert of a fused 3-D parameter
            zeros += fused[0].numel()
    total = sum(p.numel() for p in model.parameters())
    return model, total, zeros


@pytest.mark.parametrize("family", list(BUILDERS))
def test_count_parameters_counts_zeroed_weights_out(family):
    model, total, zeros = _ones_with_zeros(family)
    assert count_parameters(model) == (total, total - zeros)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_count_parameters_reads_int8_tensors(family):
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

    model, total, zeros = _ones_with_zeros(family)
    quantize_(
        model,
        Int8WeightOnlyConfig(),
        filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head",
    )
    o_proj = model.model.layers[0].self_attn.o_proj.weight
    assert isinstance(o_proj, Int8Tensor)  # ones map to 127, zeros stay 0
    assert count_parameters(model) == (total, total - zeros)


def test_weights_memory_counts_int8_data_and_scales():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tinymodels.llama()
    fp32 = weights_memory_bytes(model)
    assert fp32 == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    linears = {
        name: module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in linears)
    saved = fp32 - weights_memory_bytes(model)
    # every int8 weight saves 3 of its 4 bytes, less a float scale (and zero point) per output row
    assert 0.9 * 3 * sum(linears.values()) < saved < 3 * sum(linears.values())


def test_count_parameters_unpacks_bitsandbytes_4bit_weights(monkeypatch):
    """A Params4bit-like weight: packed bytes (two weights each) with the original shape in quant_state;
    its zeros are those of the dequantised weights."""
    from seektune.compress import table

    layer = torch.nn.Linear(8, 4, bias=False)
    packed = torch.nn.Parameter(torch.full((16, 1), 0x77, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([4, 8]))
    layer.weight = packed
    weights = torch.ones(4, 8)
    weights[0] = 0
    monkeypatch.setattr(table, "_dequantize_4bit", lambda param: weights)
    assert count_parameters(layer) == (32, 24)


def _rows() -> list[dict]:
    return [
        {"label": "source", "device": "cpu", "size_on_disk_mb": 10.0, "parameters": 2_000_000,
         "nonzero_parameters": 2_000_000, "ms_per_token": 4.0, "ttft_ms": 0, "perplexity": 5.0},
        {"label": "prune", "device": "cpu", "size_on_disk_mb": 8.0, "parameters": 2_000_000,
         "nonzero_parameters": 1_000_000, "ms_per_token": 5.0, "ttft_ms": 20.0, "perplexity": 6.0,
         "rouge_l": 0.4},
        {"label": "quantize", "device": "cpu", "size_on_disk_mb": 2.0, "parameters": 2_000_000,
         "nonzero_parameters": 1_000_000, "ms_per_token": 3.0, "ttft_ms": 10.0, "perplexity": 6.3,
         "rouge_l": 0.3, "peak_memory_mb": None, "passed": True},
    ]  # fmt: skip


def test_before_after_rows_give_relative_changes():
    rows = before_after_rows(_rows())
    assert rows[0] == _rows()[0]  # the source row has no changes
    prune, quantize = rows[1]["change_vs_source"], rows[2]["change_vs_source"]
    assert prune["size_on_disk_mb"] == pytest.approx(-0.2)
    assert prune["nonzero_parameters"] == pytest.approx(-0.5)
    assert prune["ms_per_token"] == pytest.approx(0.25)
    assert prune["parameters"] == 0
    assert prune["ttft_ms"] is None  # the source's is 0
    assert prune["rouge_l"] is None  # the source has none
    assert quantize["size_on_disk_mb"] == pytest.approx(-0.8)
    assert quantize["perplexity"] == pytest.approx(0.26)
    previous = rows[2]["change_vs_previous"]
    assert previous["size_on_disk_mb"] == pytest.approx(-0.75)
    assert previous["ttft_ms"] == pytest.approx(-0.5)
    assert previous["rouge_l"] == pytest.approx(-0.25)
    assert previous["perplexity"] == pytest.approx(0.05)
    for change in (quantize, previous):  # labels, devices, booleans and missing figures are no numbers
        assert not {"label", "device", "passed", "peak_memory_mb"} & set(change)
    assert before_after_rows([]) == []


def test_before_after_markdown_renders_every_column_with_changes():
    lines = before_after_markdown(_rows()).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", *(title for _, title in COLUMNS), "perplexity", "rouge_l"]
    assert lines[1] == "|---|" + "---:|" * (len(header) - 1)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]]
    source, prune, quantize = (dict(zip(header, row, strict=True)) for row in cells)
    assert source == {
        "model": "source", "size MB": "10", "params": "2M", "non-zero": "2M", "ms/token": "4",
        "first token ms": "0", "weights MB": "—", "peak MB": "—", "perplexity": "5", "rouge_l": "—",
    }  # fmt: skip
    assert prune["size MB"] == f"8 ({MINUS}20%)"
    assert prune["non-zero"] == f"1M ({MINUS}50%)"
    assert prune["ms/token"] == "5 (+25%)"
    assert prune["first token ms"] == "20 (+20)"  # against 0: the absolute change
    assert prune["rouge_l"] == "0.4"  # no source figure to compare with
    assert quantize["size MB"] == f"2 ({MINUS}80%)"
    assert quantize["perplexity"] == "6.3 (+26%)"
    assert quantize["peak MB"] == "—"
    assert "Changes in brackets are against the source" in lines[-1] and "cpu" in lines[-1]
    assert before_after_markdown([]) == ""


def test_measure_model_sums_the_weight_files(tmp_path: Path):
    model = tinymodels.llama().eval()
    tokenizer = tinymodels.word_tokenizer()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"\0" * 123_456)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert weights > 0 and (folder / "tokenizer.json").is_file()  # tokenizer and config are not weights

    row = measure_model(
        "source", model, tokenizer, [folder, gguf, folder], None, EvalConfig(), None, ["t12 t30 t9"], 3
    )
    assert row["size_on_disk_mb"] == round((weights + 123_456) / 2**20, 4)  # the folder counted once
    assert row["label"] == "source" and row["device"] == "cpu"
    assert (row["parameters"], row["nonzero_parameters"]) == count_parameters(model)
    assert (
        row["ms_per_token"] > 0
        and row["ttft_ms"] > 0
        and row["peak_memory_mb"] >= row["weights_memory_mb"] > 0
    )
    assert "perplexity" not in row  # no data: no evaluation

    untimed = measure_model("x", model, tokenizer, [gguf], None, EvalConfig(), None, [], 3)
    assert untimed["size_on_disk_mb"] == round(123_456 / 2**20, 4)
    assert untimed["ms_per_token"] is None and untimed["ttft_ms"] is None
