"""Real tokens per second, model FLOPs utilisation and peak memory of a training run.

transformers' Trainer logs loss, learning rate and gradient norm; its speed figures count padding as work
(`train_tokens_per_second` from the padded dataset length) and it has no MFU. These are ours:

- real tokens: the non-padding tokens of every training batch, counted by the collators
  (`num_real_tokens`), so padding is never counted as work;
- FLOPs per real token (`training_flops_per_token`): 2 per weight in the forward pass, 2 more for the
  gradient of the activations and 2 for the weight gradient of weights that train (the usual 6N for full
  fine-tuning, about 4N for LoRA), counted over the weights a token actually meets (a routed MoE expert
  counts with the share of experts each token is sent to; embeddings are a lookup and count nothing),
  plus the attention scores and their backward (6 FLOPs per head dimension per attended position, half
  the sequence on average under a causal mask);
- the device's peak: the datasheet dense figure of known CUDA GPUs for the training dtype, or on a CPU a
  short fp32/bf16 matmul measured on the spot (a CPU's peak depends on its cores, clock and vector units,
  which no table knows); MFU is achieved FLOP/s over that peak;
- peak memory: the CUDA allocator's high-water mark on a GPU, the process's resident high-water mark on
  a CPU.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, by a substring of the device name.
_GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
    "T4": {"bf16": 0.0, "fp16": 65.0, "fp32": 8.1},
}


def _routed_share(model: nn.Module) -> float:
    """Share of routed experts a token meets (`num_experts_per_tok / n_routed_experts`), 1 without MoE."""
    config = getattr(model, "config", None)
    routed = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    per_token = getattr(config, "num_experts_per_tok", None)
    return per_token / routed if routed and per_token else 1.0


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name or name.endswith(".experts")


def training_flops_per_token(model: nn.Module, sequence_length: int) -> float:
    """FLOPs of one forward and backward pass per real token (see the module docstring)."""
    share = _routed_share(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_id = id(head.weight) if head is not None else None
    flops = 0.0
    for name, param in model.named_parameters():  # a tied head and embedding come once, as the head
        if param.dim() < 2 or (id(param) in embeddings and id(param) != head_id):
            continue
        count = param.numel() * (share if _is_routed_expert(name) else 1.0)
        flops += (6.0 if param.requires_grad else 4.0) * count
    return flops + _attention_flops_per_token(model, sequence_length)


def _attention_flops_per_token(model: nn.Module, sequence_length: int) -> float:
    config = getattr(model, "config", None)
    if config is None:
        return 0.0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
    qk = getattr(config, "qk_head_dim", None) or head_dim  # MLA: nope + rope dims
    v = getattr(config, "v_head_dim", None) or head_dim
    attended = sequence_length / 2  # causal: on average half the positions
    return 3.0 * 2.0 * layers * heads * (qk + v) * attended


def precision_key(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of `device` at `precision` ('fp32', 'bf16', 'fp16'); None for an unknown GPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAK_TFLOPS.items():
            if key in name and peaks.get(precision):
                return peaks[precision] * 1e12
        return None
    if device.type == "cpu":
        return _measured_cpu_peak(precision, torch.get_num_threads())
    return None


@functools.lru_cache(maxsize=4)
def _measured_cpu_peak(precision: str, threads: int) -> float:
    """Best of several square matmuls on this CPU (about 0.2 s): the best, so that a moment of
    contention from another process does not lower the peak (and raise the MFU above what it is)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    size = 1024 if dtype is torch.float32 else 256
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(8):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / max(best, 1e-9)


def peak_memory_bytes(device: torch.device) -> int:
    """The high-water mark of memory: CUDA allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class ThroughputMeter:
    """Counts real tokens between log lines and turns them into tokens/s, MFU and peak memory."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, device: torch.device, world: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.device = device
        self.world = world
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._tokens = 0
        self._excluded = 0.0
        self._since = time.perf_counter()

    def count(self, tokens: int) -> None:
        self._tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Take `seconds` (an evaluation, a checkpoint) out of the current interval: not training time."""
        self._excluded += seconds

    def measure(self) -> dict[str, Any]:
        """Figures since the last call; all processes together under data parallelism (call it on all)."""
        now = time.perf_counter()
        seconds = now - self._since - self._excluded
        tokens = self._all_processes(self._tokens)
        self.total_tokens += tokens
        self.total_seconds += seconds
        self._tokens, self._since, self._excluded = 0, now, 0.0
        figures: dict[str, Any] = {"peak_memory_gb": round(peak_memory_bytes(self.device) / 2**30, 3)}
        if seconds > 0 and tokens:
            figures["tokens_per_s"] = round(tokens / seconds, 1)
            if self.peak_flops:
                figures["mfu"] = _significant(
                    tokens * self.flops_per_token / seconds / (self.peak_flops * self.world)
                )
        return figures

    def _all_processes(self, tokens: int) -> int:
        """The sum over the processes of a data-parallel run (every process logs at the same steps)."""
        if self.world <= 1 or not torch.distributed.is_initialized():
            return tokens
        total = torch.tensor([tokens], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def overall(self) -> dict[str, Any]:
        """Tokens/s and MFU over the whole run's training time."""
        if not self.total_seconds or not self.total_tokens:
            return {}
        rate = self.total_tokens / self.total_seconds
        result: dict[str, Any] = {"tokens_per_s": round(rate, 1)}
        if self.peak_flops:
            result["mfu"] = _significant(rate * self.flops_per_token / (self.peak_flops * self.world))
        return result


def _significant(value: float) -> float:
    """Three significant digits: a tiny model's MFU (1e-5 on a busy CPU) must not round to 0."""
    return float(f"{value:.3g}")
