"""`SeektuneTrainer`: transformers' `Trainer` with the few hooks seektune needs, and nothing else.

The loop itself (accumulation, mixed precision, DDP/DeepSpeed/FSDP through accelerate, evaluation,
checkpoint contents) is the library's. The subclass adds:

- complete-or-ignored checkpoints: the Trainer's own rotation is held back until the new checkpoint has
  its completion marker (`seektune.train.checkpoints`);
- real-token accounting: collators send `num_real_tokens`, counted here and taken out of the batch before
  the model sees it; every training log line gains real tokens/s, MFU and peak memory
  (`seektune.train.throughput`), with evaluation and checkpoint time left out of the rate;
- named profiler ranges `seektune::forward` and `seektune::backward` (cheap no-ops unless a profiler runs),
  which `seektune train --profile` uses to split a step's time;
- checkpoint weights in the model's own layout. transformers 5 fuses DeepSeek's routed experts into 3-D
  parameters at load time and `save_pretrained` splits them back into per-expert tensors (the hub
  layout), but the Trainer reloads checkpoints (on resume, and the best one at the end) with a plain
  non-strict `load_state_dict`, which skips those per-expert keys: the experts would silently keep their
  current weights. Checkpoints are therefore saved with `save_original_format=False`; the final model in
  `<run>/model` keeps the hub layout.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from torch.profiler import record_function
from transformers import PreTrainedModel

from seektune.train.callbacks import DomainSampledTrainer
from seektune.train.checkpoints import mark_complete, rotate
from seektune.train.collate import REAL_TOKENS_KEY
from seektune.train.throughput import ThroughputMeter


class SeektuneTrainer(DomainSampledTrainer):
    """The Trainer with marked checkpoints, real-token throughput in its logs and profiler ranges."""

    def __init__(
        self,
        *args: Any,
        checkpoint_identity: dict[str, Any],
        meter: ThroughputMeter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_identity = checkpoint_identity
        self.meter = meter
        self._saving_checkpoint = False
        backward = self.accelerator.backward

        def named_backward(loss: Any, **kw: Any) -> None:
            with record_function("seektune::backward"):
                backward(loss, **kw)

        self.accelerator.backward = named_backward  # the Trainer calls it from training_step

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        real = inputs.pop(REAL_TOKENS_KEY, None)
        if real is not None and self.meter is not None:
            self.meter.count(int(real))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop(REAL_TOKENS_KEY, None)  # evaluation batches pass here without training_step
        with record_function("seektune::forward"):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.meter is not None and "loss" in logs:
            logs.update(self.meter.measure())
        super().log(logs, start_time)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if self.meter is not None:
                self.meter.exclude(time.perf_counter() - started)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self._saving_checkpoint or not isinstance(model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        save_pretrained = model.save_pretrained
        model.save_pretrained = functools.partial(save_pretrained, save_original_format=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # back to the class's method

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.perf_counter()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once the new checkpoint is marked complete
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
            self._saving_checkpoint = False
        self.accelerator.wait_for_everyone()  # every process's RNG state and shard written, then the marker
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step, self.checkpoint_identity)
            if limit:
                rotate(folder.parent, limit, protect=self.state.best_model_checkpoint)
        if self.meter is not None:
            self.meter.exclude(time.perf_counter() - started)
