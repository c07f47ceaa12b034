"""Which process does what when `torchrun` or `accelerate launch` starts several of them.

transformers' `Trainer`, through accelerate, already trains data-parallel (DDP, DeepSpeed ZeRO, FSDP) once
the launcher has started the processes and the process group exists. What no library does is the run
around the training: one run directory for all processes, one process (rank 0) writing the files and
preparing the data while the others wait, the others loading what it prepared. These helpers say that in
one line each, on `torch.distributed`; in a single process every one of them is a no-op.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Rank 0 prepares the data (and builds or downloads the base) while the others wait at a barrier; the
# default collective timeout (10 minutes under NCCL) would end a run whose data takes longer.
WAIT_FOR_MAIN = timedelta(hours=2)


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_process_group(cpu: bool) -> None:
    """Join the launcher's process group through accelerate: gloo on a CPU, NCCL (or DeepSpeed's) on GPUs.

    `cpu` must agree with what the Trainer is told later (`TrainingArguments.use_cpu`): accelerate picks
    the backend from it, and the Trainer's own setup reuses the group made here.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    if cpu:
        PartialState(cpu=True, backend="gloo", timeout=WAIT_FOR_MAIN)
    else:
        PartialState(timeout=WAIT_FOR_MAIN)


def world_size() -> int:
    """The number of processes training together (1 without a launcher)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    """This process's rank (0 without a launcher)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return process_rank() == 0


def barrier() -> None:
    """Wait until every process has reached this point."""
    if world_size() < 2:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` in every process (a picklable object, such as the run directory's path)."""
    if world_size() < 2:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shards_parameters() -> bool:
    """Whether the launcher asked for FSDP or DeepSpeed ZeRO-3, which leave each process a shard of the
    weights (its accelerate config sets these variables for every process it starts)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config_file and os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            stage = (json.load(handle).get("zero_optimization") or {}).get("stage")
    return str(stage) == "3"
