"""`seektune train --profile`: a few training steps under `torch.profiler`, and where their time went.

torch's profiler records every operator; what a user wants to know is which part of a step is slow. We
run `WAIT + WARMUP` steps unrecorded (first-step allocations and lazy initialisation would distort the
picture) and `ACTIVE` recorded steps, then split the recorded steps' wall time into phases by the named
ranges the step runs through:

- data loading: the DataLoader's `enumerate(DataLoader)#...__next__` range (torch names it);
- forward and backward: `seektune::forward` / `seektune::backward` (`seektune.train.loop`);
- optimizer: `Optimizer.step#...` and `Optimizer.zero_grad#...` (torch names them);
- communication: collective operations (all-reduce, all-gather, reduce-scatter, broadcast; gloo or NCCL),
  taken out of the phase they ran in (under DDP, the backward pass);
- other: the rest of the step (the Trainer's bookkeeping, callbacks, logging).

Times are host (CPU) wall times. On a GPU the host waits for the device at synchronisation points, so the
phases still add up to the step, and the operator table shows device time. The full trace is written for
Perfetto / chrome://tracing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

WAIT, WARMUP, ACTIVE = 1, 1, 3
PROFILE_STEPS = WAIT + WARMUP + ACTIVE
TOP_OPERATORS = 12

_PHASE_PREFIXES = {
    "data loading": ("enumerate(DataLoader)",),
    "forward": ("seektune::forward",),
    "backward": ("seektune::backward",),
    "optimizer": ("Optimizer.step#", "Optimizer.zero_grad#"),
}
_COLLECTIVES = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast")


class ProfilerCallback(TrainerCallback):
    """Runs `torch.profiler` over the first `PROFILE_STEPS` steps, then stops training."""

    def __init__(self, trace_path: Path, device: torch.device) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.trace_path = trace_path
        self.device = device
        self.summary: dict[str, Any] | None = None
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
            on_trace_ready=self._ready,
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._profiler.step()
        if self.summary is not None:
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._profiler.stop()

    def _ready(self, profiler: Any) -> None:
        self.summary = summarize(profiler.key_averages(), self.device)
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.trace_path.with_name(f".{self.trace_path.name}.partial")
        profiler.export_chrome_trace(str(partial))
        os.replace(partial, self.trace_path)


def summarize(averages: Any, device: torch.device) -> dict[str, Any]:
    """Phase shares of the recorded steps and the top operators by their own time."""
    step_us = sum(e.cpu_time_total for e in averages if e.key.startswith("ProfilerStep"))
    phases = {
        phase: sum(e.cpu_time_total for e in averages if e.key.startswith(prefixes))
        for phase, prefixes in _PHASE_PREFIXES.items()
    }
    communication = sum(e.cpu_time_total for e in averages if _is_collective(e.key))
    phases["backward"] = max(phases["backward"] - communication, 0.0)
    phases["communication"] = communication
    phases["other"] = max(step_us - sum(phases.values()), 0.0)
    on_gpu = device.type == "cuda"
    operators = [e for e in averages if not _is_range(e.key)]
    operators.sort(key=lambda e: _self_time(e, on_gpu), reverse=True)
    operator_total = sum(_self_time(e, on_gpu) for e in operators) or 1.0
    return {
        "steps": ACTIVE,
        "step_ms": round(step_us / ACTIVE / 1000, 2),
        "phases": {
            name: {
                "ms_per_step": round(us / ACTIVE / 1000, 2),
                "share": round(us / step_us, 4) if step_us else 0,
            }
            for name, us in phases.items()
        },
        "time_kind": "device" if on_gpu else "cpu",
        "operators": [
            {
                "name": e.key,
                "calls": e.count,
                "self_ms_per_step": round(_self_time(e, on_gpu) / ACTIVE / 1000, 3),
                "share": round(_self_time(e, on_gpu) / operator_total, 4),
            }
            for e in operators[:TOP_OPERATORS]
        ],
    }


def _is_collective(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _COLLECTIVES) and not lowered.startswith("profilerstep")


def _is_range(name: str) -> bool:
    """Named ranges and autograd's per-node wrappers: they hold operators, they are not operators."""
    return name.startswith(
        ("ProfilerStep", "seektune::", "enumerate(DataLoader)", "Optimizer.", "autograd::engine::")
    )


def _self_time(event: Any, on_gpu: bool) -> float:
    if on_gpu:
        return float(getattr(event, "self_device_time_total", 0.0) or 0.0)
    return float(event.self_cpu_time_total)


def print_profile(summary: dict[str, Any], console: Any) -> None:
    """Two rich tables: the phases of a step, and the operators that took the most time."""
    from rich.table import Table

    phases = Table(title=f"Where a training step's time goes ({summary['step_ms']} ms per step)")
    phases.add_column("phase")
    phases.add_column("ms / step", justify="right")
    phases.add_column("share", justify="right")
    for name, figures in summary["phases"].items():
        phases.add_row(name, f"{figures['ms_per_step']:.1f}", f"{figures['share']:.1%}")
    console.print(phases)
    operators = Table(title=f"Top operators by own {summary['time_kind'].upper()} time")
    operators.add_column("operator")
    operators.add_column("calls / step", justify="right")
    operators.add_column("ms / step", justify="right")
    operators.add_column("share", justify="right")
    for op in summary["operators"]:
        operators.add_row(
            op["name"],
            f"{op['calls'] / summary['steps']:g}",
            f"{op['self_ms_per_step']:.2f}",
            f"{op['share']:.1%}",
        )
    console.print(operators)
