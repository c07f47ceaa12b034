"""Efficiency of one model: time to first token, per-token latency, throughput, peak memory, size.

Timing goes through transformers' own `generate` (greedy, exactly `max_new_tokens` new tokens:
`min_new_tokens` equals `max_new_tokens`, so an early end-of-sentence never cuts a measurement short).
A `StoppingCriteria` that never stops records `time.perf_counter()` after every generated token (after a
CUDA synchronise, so a timestamp is when the token exists, not when its kernel was queued):

- batch 1: each of the first `prompts` prompts alone, after one untimed warm-up; time to first token is
  from the call of `generate` to the first token (prefill included), the per-token latency the intervals
  between later tokens, and tokens/s all generated tokens over all the calls' time;
- batched: the same prompts in left-padded batches of `batch_size`; tokens/s = generated tokens / time;
- peak memory: the CUDA allocator's high-water mark (`seektune.train.throughput.peak_memory_bytes` after
  `torch.cuda.reset_peak_memory_stats`), or on a CPU the process's resident set sampled by a thread with
  psutil every few milliseconds during the measurement (the kernel's `ru_maxrss` that throughput.py uses
  is the whole process's lifetime high, which loading the model may already have set);
- size on disk: the weight files (*.safetensors, *.bin, *.pt, *.pth, *.gguf) of each model folder.

transformers has `TextStreamer` and benchmark scripts, but no function that returns these figures, so the
measurement is ours. MB are 2**20 bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from seektune.config import EfficiencyConfig
from seektune.errors import UserError
from seektune.evaluate.generate import GREEDY, stop_ids
from seektune.train.throughput import peak_memory_bytes

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MB = 2**20


class StepTimer(StoppingCriteria):
    """Records `time.perf_counter()` after every generation step; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class PeakMemory:
    """Peak memory while the `with` block runs: CUDA allocated on a GPU, resident set size on a CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = self.peak = int(torch.cuda.memory_allocated(self.device))
            return self
        process = psutil.Process()
        self.before = self.peak = int(process.memory_info().rss)
        self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
        self._thread.start()
        return self

    def _sample(self, process: Any) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, int(process.memory_info().rss))

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, peak_memory_bytes(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, int(psutil.Process().memory_info().rss))


def _generate(model: Any, tokenizer: Any, enc: Any, new_tokens: int, timer: StepTimer | None = None) -> Any:
    """Greedy generation of exactly `new_tokens` tokens (EOS suppressed until then)."""
    return model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        **GREEDY,
        eos_token_id=stop_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([timer]) if timer is not None else None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prompt(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> dict[str, Any]:
    """One prompt alone: {"ttft_ms", "token_ms": intervals after the first token, "total_ms", "tokens",
    "stamps": how many steps the timer saw}."""
    device = next(model.parameters()).device
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(device)
    timer = StepTimer()
    _sync(device)
    started = time.perf_counter()
    out = _generate(model, tokenizer, enc, new_tokens, timer)
    _sync(device)
    ended = time.perf_counter()
    stamps = np.asarray(timer.stamps)
    return {
        "ttft_ms": float(stamps[0] - started) * 1000,
        "token_ms": (np.diff(stamps) * 1000).tolist(),
        "total_ms": (ended - started) * 1000,
        "tokens": int(out.shape[1] - enc["input_ids"].shape[1]),
        "stamps": len(timer.stamps),
    }


def time_batched(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, batch_size: int) -> float:
    """Generated tokens per second over `prompts` in left-padded batches of `batch_size`."""
    device = next(model.parameters()).device
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    tokens, seconds = 0, 0.0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            _sync(device)
            started = time.perf_counter()
            out = _generate(model, tokenizer, enc, new_tokens)
            _sync(device)
            seconds += time.perf_counter() - started
            tokens += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
    finally:
        tokenizer.padding_side = previous_side
    return tokens / seconds


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the weight files directly in `folder` (symbolic links, as in a hub cache, followed)."""
    return sum(
        p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def size_on_disk(model_dirs: list[Path]) -> dict[str, float]:
    """MB of weight files per folder; a folder that does not exist is left out with a warning."""
    sizes: dict[str, float] = {}
    for folder in dict.fromkeys(Path(d) for d in model_dirs):
        if not folder.is_dir():
            logger.warning("efficiency: model folder %s does not exist; its size is not counted", folder)
            continue
        sizes[str(folder)] = round(weight_file_bytes(folder) / _MB, 6)
    return sizes


@torch.no_grad()
def measure_efficiency(
    model: Any, tokenizer: Any, prompts: list[str], cfg: EfficiencyConfig, model_dirs: list[Path]
) -> dict[str, Any]:
    """Latency, throughput, peak memory and size of `model` on the first `cfg.prompts` rendered prompts
    (special tokens already in them); see the module docstring for what each figure is."""
    timed = prompts[: cfg.prompts]
    if not timed:
        raise UserError(
            "eval.efficiency has no test prompt to time: add test examples or set "
            "eval.efficiency.enabled: false"
        )
    device = next(model.parameters()).device
    new_tokens = cfg.max_new_tokens
    with PeakMemory(device) as memory:
        time_prompt(model, tokenizer, timed[0], new_tokens)  # warm-up, untimed
        alone = [time_prompt(model, tokenizer, prompt, new_tokens) for prompt in timed]
        batched = time_batched(model, tokenizer, timed, new_tokens, cfg.batch_size)
    short = [a["tokens"] for a in alone if a["tokens"] != new_tokens]
    if short:
        logger.warning("efficiency: %d prompts stopped before %d new tokens", len(short), new_tokens)
    sizes = size_on_disk(model_dirs)
    latency = _latency_figures(alone)
    result = {
        "device": device.type, "prompts": len(timed), "new_tokens": new_tokens, "batch_size": cfg.batch_size,
        **{key: value for key, value in latency.items() if not key.endswith("_all")},
        "tokens_per_s_batched": round(batched, 3),
        "peak_memory_mb": round(memory.peak / _MB, 3), "memory_before_mb": round(memory.before / _MB, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_on_disk_mb": round(sum(sizes.values()), 6) if sizes else None, "size_on_disk": sizes,
        **{key: value for key, value in latency.items() if key.endswith("_all")},
    }  # fmt: skip
    logger.info(
        "efficiency: ttft %.1f ms, %.2f ms/token, %.1f tokens/s batched, peak %.0f MB",
        result["ttft_ms"], result["ms_per_token"], result["tokens_per_s_batched"], result["peak_memory_mb"],
    )  # fmt: skip
    return result


def _latency_figures(alone: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and 90th percentiles of the batch-1 samples, tokens/s at batch 1, and the raw samples."""
    ttft = [a["ttft_ms"] for a in alone]
    token_ms = [ms for a in alone for ms in a["token_ms"]]
    total_ms = [a["total_ms"] for a in alone]
    return {
        "ttft_ms": round(float(np.median(ttft)), 3),
        "ttft_ms_p90": round(float(np.percentile(ttft, 90)), 3),
        "ms_per_token": round(float(np.median(token_ms)), 3),
        "ms_per_token_p90": round(float(np.percentile(token_ms, 90)), 3),
        "tokens_per_s_batch1": round(sum(a["tokens"] for a in alone) / (sum(total_ms) / 1000), 3),
        "ttft_ms_all": [round(ms, 3) for ms in ttft],
        "token_ms_all": [round(ms, 3) for ms in token_ms],
        "total_ms_all": [round(ms, 3) for ms in total_ms],
    }
