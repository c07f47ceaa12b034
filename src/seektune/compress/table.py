"""The before/after table of compression: one row per model (the source, then each step's result).

A row: size on disk, parameters and non-zero parameters, batch-1 latency per token and time to the first
token, memory (the weights in memory, and the peak while generating), and the evaluation's metrics on
the test split. On a CPU the process's resident size holds every model loaded so far, so the peak is the
model's own weights plus what generating added on top, not the process's figure. Timing and memory reuse
the evaluation's efficiency helpers; metrics are `evaluate_model`'s.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from seektune.config import EvalConfig
from seektune.data.prepare import PreparedData
from seektune.evaluate.efficiency import PeakMemory, time_prompt, weight_file_bytes
from seektune.report import _fmt_count, _fmt_num, _fmt_relative_change

_MB = 2**20
TIMED_PROMPTS = 3
_SKIP = {"label", "device", "n"}  # n: the evaluation's sample count, the same in every row
COLUMNS = (
    ("size_on_disk_mb", "size MB"),
    ("parameters", "params"),
    ("nonzero_parameters", "non-zero"),
    ("ms_per_token", "ms/token"),
    ("ttft_ms", "first token ms"),
    ("weights_memory_mb", "weights MB"),
    ("peak_memory_mb", "peak MB"),
)


def _files_bytes(files: list[Path]) -> int:
    total = 0
    for path in dict.fromkeys(Path(f) for f in files):
        if path.is_dir():
            total += weight_file_bytes(path)
        elif path.is_file():
            total += path.stat().st_size
    return total


def _plain(param: torch.Tensor) -> torch.Tensor:
    """A tensor whose zeros can be counted (torchao's int8 tensors: their int8 data)."""
    if type(param) in (torch.nn.Parameter, torch.Tensor):
        return param.data
    for name in ("qdata", "int_data"):
        data = getattr(param, name, None)
        if isinstance(data, torch.Tensor):
            return data
    return param.dequantize() if hasattr(param, "dequantize") else param


def _dequantize_4bit(param: torch.Tensor) -> torch.Tensor:
    """The float weights of a bitsandbytes 4-bit parameter (its packed data holds two per byte)."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(param.data, param.quant_state)


def _counted(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(weights the parameter stands for, a tensor whose zeros are its zero weights)."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:  # bitsandbytes 4-bit: numel() counts packed bytes, and NF4's zero is no 0 byte
        return math.prod(shape), _dequantize_4bit(param)
    return param.numel(), _plain(param)


def _packed_weights(model: Any) -> list[torch.Tensor]:
    """The int8 weights of PyTorch's dynamic quantised Linears (fbgemm, `seektune.models.int8_cpu`): packed
    inside the module, not among its parameters."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    weights = []
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._packed_params._weight_bias()
            weights.append(weight)
            if bias is not None:
                weights.append(bias)
    return weights


@torch.no_grad()
def count_parameters(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters), fused expert tensors and quantised weights included."""
    total = nonzero = 0
    for param in model.parameters():
        size, values = _counted(param)
        total += size
        nonzero += int(torch.count_nonzero(values))
    for weight in _packed_weights(model):
        total += weight.numel()
        nonzero += int(torch.count_nonzero(weight.int_repr() if weight.is_quantized else weight))
    return total, nonzero


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao's int8 weights: data, scales, zero points)."""
    if tensor.is_quantized:  # PyTorch's qint8: a byte a weight, a float64 scale + int64 zero point a row
        scales = tensor.q_per_channel_scales().numel() if tensor.qscheme() != torch.per_tensor_affine else 1
        return tensor.numel() + scales * 16
    if type(tensor) in (torch.nn.Parameter, torch.Tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def weights_memory_bytes(model: Any) -> int:
    """The model's parameters and buffers in memory (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(model.parameters(), model.buffers(), _packed_weights(model)):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


@torch.no_grad()
def _timing(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    timed = prompts[:TIMED_PROMPTS]
    if not timed:
        return {"ms_per_token": None, "ttft_ms": None, "weights_memory_mb": None, "peak_memory_mb": None}
    device = next(model.parameters()).device
    with PeakMemory(device) as memory:
        time_prompt(model, tokenizer, timed[0], new_tokens)  # warm-up, untimed
        samples = [time_prompt(model, tokenizer, p, new_tokens) for p in timed]
    per_token = [ms for s in samples for ms in s["token_ms"]]
    weights = weights_memory_bytes(model)
    # CUDA's peak counts allocations (the weights included); the CPU's resident size counts everything
    # loaded so far, so there only the growth while generating is this model's
    peak = memory.peak if device.type == "cuda" else weights + max(0, memory.peak - memory.before)
    return {
        "ms_per_token": round(statistics.median(per_token), 3) if per_token else None,
        "ttft_ms": round(statistics.median(s["ttft_ms"] for s in samples), 3),
        "weights_memory_mb": round(weights / _MB, 3),
        "peak_memory_mb": round(peak / _MB, 3),
    }


def measure_model(
    label: str,
    model: Any,
    tokenizer: Any,
    files: list[Path] | None,
    data: PreparedData | None,
    eval_cfg: EvalConfig,
    system_prompt: str | None,
    prompts: list[str],
    new_tokens: int,
) -> dict[str, Any]:
    """One row of the table for `model` (whose weights are in `files`: folders or single files; None: not
    measurable, e.g. a base in the hub cache)."""
    parameters, nonzero = count_parameters(model)
    row: dict[str, Any] = {
        "label": label,
        "device": next(model.parameters()).device.type,
        "size_on_disk_mb": None if files is None else round(_files_bytes(files) / _MB, 4),
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        **_timing(model, tokenizer, prompts, new_tokens),
    }
    if data is not None:
        from seektune.evaluate.metrics import evaluate_model

        scores, _ = evaluate_model(model, tokenizer, data, eval_cfg, system_prompt, label=label)
        row.update({key: value for key, value in scores.items() if key not in row})
    return row


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in row.items()
        if k not in _SKIP
        and not k.startswith("change_")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }


def before_after_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with, after the first, `change_vs_source` and `change_vs_previous`: relative changes of
    every numeric figure (None where the reference is 0 or missing)."""
    out = [dict(rows[0])] if rows else []
    for previous, row in itertools.pairwise(rows):
        entry = dict(row)
        for key, reference in (("change_vs_source", rows[0]), ("change_vs_previous", previous)):
            ref = _numeric(reference)
            entry[key] = {
                name: (value / ref[name] - 1 if ref.get(name) else None)
                for name, value in _numeric(row).items()
            }
        out.append(entry)
    return out


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    known = {key for key, _ in COLUMNS} | _SKIP
    names: list[str] = []
    for row in rows:
        names += [k for k in _numeric(row) if k not in known and k not in names]
    return names


def _cell(key: str, value: Any, source: Any, first: bool) -> str:
    text = _fmt_count(value) if key in ("parameters", "nonzero_parameters") else _fmt_num(value)
    if first or value is None or not isinstance(source, (int, float)) or isinstance(value, bool):
        return text
    return f"{text} ({_fmt_relative_change(source, value)})"


def before_after_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per model; each cell after the source's shows its change against it."""
    if not rows:
        return ""
    metrics = _metric_columns(rows)
    header = ["model", *(title for _, title in COLUMNS), *metrics]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    source = rows[0]
    for index, row in enumerate(rows):
        cells = [str(row.get("label"))]
        for key in [k for k, _ in COLUMNS] + metrics:
            cells.append(_cell(key, row.get(key), source.get(key), index == 0))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Changes in brackets are against the source. Latency is batch 1 on "
        f"{source.get('device', 'the device')}; an exported GGUF file's row is timed as transformers runs it "
        "(dequantised to float), not as llama.cpp would.",
    ]
    return "\n".join(lines)
