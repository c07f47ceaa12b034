"""`DistillationTrainer`: the run's `SeektuneTrainer` training a student on a frozen teacher's soft labels.

The loss is classic forward knowledge distillation (Hinton et al., 2015) mixed with the hard-label loss:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The hard part is the student model's own cross-entropy (transformers shifts the labels); the KL term is
taken over the same positions: the logits at position i predict label i + 1, and positions whose next
label is -100 (the prompt, padding, the first token of each packed example) are left out. Both terms are
normalised like the Trainer's loss: by the number of labelled tokens of the whole accumulated batch when
the Trainer counts it (`num_items_in_batch`), else by the micro-batch's, so gradient accumulation and
multi-process training weigh them alike. T^2 keeps the KL gradients' scale independent of T. Teacher and
student must share a tokenizer, but their embedding matrices may be padded to different sizes (2048 vs
2056 rows): the KL compares the first min(V_teacher, V_student) logits.

Why not TRL: `GKDTrainer` and `DistillationTrainer` (trl 1.16) implement on-policy distillation (the
student generates completions that the teacher then scores, arXiv 2306.13649) with a generalised JSD and
no hard-label term, on TRL's own SFT data pipeline (prompt/messages columns). Here the student learns
from the teacher's distribution on the run's prepared training split, with the run's training engine
(`SeektuneTrainer`: marked checkpoints, real-token throughput, health checks); plain forward KD needs only
a second forward pass, which is this file.

Logged beside `loss` at every logging step: `distill_kl` (T^2 * KL) and `hard_loss` (the cross-entropy),
averaged like `loss`, so that loss = alpha * distill_kl + (1 - alpha) * hard_loss.
The teacher is replicated on every process (not sharded under DeepSpeed ZeRO-3 or FSDP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from seektune.train.collate import REAL_TOKENS_KEY
from seektune.train.loop import SeektuneTrainer

IGNORE_INDEX = -100
KL_KEY = "distill_kl"
HARD_KEY = "hard_loss"
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch", REAL_TOKENS_KEY)


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the positions that predict a
    label (not -100) and divided by `num_items_in_batch` (default: the number of those positions).

    Logits are (batch, seq, vocab), labels (batch, seq); the logits at position i predict `labels[i + 1]`
    unless `shifted` (labels already aligned with the logits, like transformers' `shift_labels`). Only the
    first min(V_student, V_teacher) logits are compared (vocabularies padded to different sizes).
    """
    if not shifted:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    keep = labels.to(student_logits.device) != IGNORE_INDEX
    # Only the labelled positions, in float32: (positions, vocab), not (batch, seq, vocab) twice over.
    student = student_logits[..., :vocab][keep].float() / temperature
    teacher = teacher_logits[..., :vocab].to(student_logits.device)[keep].float() / temperature
    kl_sum = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="sum", log_target=True
    )
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(kl_sum.device)
    return kl_sum * temperature**2 / denominator


class DistillationTrainer(SeektuneTrainer):
    """`SeektuneTrainer` whose loss mixes the student's hard-label loss with T^2-scaled KL to `teacher`."""

    def __init__(self, *args: Any, teacher: Any, temperature: float, alpha: float, **kwargs: Any) -> None:
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"distillation alpha must lie in [0, 1], got {alpha}")
        super().__init__(*args, **kwargs)
        device = next(self.model.parameters()).device
        if next(teacher.parameters()).device != device:
            teacher = teacher.to(device)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        # Per-optimiser-step sums of the two parts since the last log, as the Trainer sums `loss`.
        self._parts = {KL_KEY: torch.zeros((), device=device), HARD_KEY: torch.zeros((), device=device)}
        self._parts_logged_step = 0

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        teacher_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        shift_labels = inputs.get("shift_labels")
        labels = shift_labels if shift_labels is not None else inputs["labels"]
        hard, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.no_grad():
            teacher_logits = self.teacher(**teacher_inputs).logits
        kl = distillation_kl(
            outputs.logits,
            teacher_logits,
            labels,
            self.temperature,
            num_items_in_batch,
            shifted=shift_labels is not None,
        )
        kl = kl * self._device_scale(num_items_in_batch)  # as the Trainer scaled `hard`
        loss = self.alpha * kl + (1 - self.alpha) * hard
        if model.training:
            self._accumulate(kl, hard, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _device_scale(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        """The factor `Trainer.compute_loss` multiplies a loss normalised by the global token count with
        (`average_tokens_across_devices`: DDP averages the gradients, which would divide it again)."""
        scaled = (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
        )
        if not scaled:
            return 1.0
        if self.args.n_gpu > 1:
            return float(self.args.n_gpu)
        return float(self.accelerator.num_processes // self.get_tp_size())

    def _accumulate(
        self, kl: torch.Tensor, hard: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> None:
        """Add this micro-batch's parts as `training_step` adds its loss: divided by the accumulation
        steps unless already normalised over the accumulated batch."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        divisor = 1 if scaled else steps
        self._parts[KL_KEY] += kl.detach() / divisor
        self._parts[HARD_KEY] += hard.detach().mean() / divisor

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        steps = self.state.global_step - self._parts_logged_step
        if "loss" in logs and steps > 0:
            for key, total in self._parts.items():
                logs[key] = self.accelerator.reduce(total.clone(), "mean").item() / steps
                total.zero_()
            self._parts_logged_step = self.state.global_step
        super().log(logs, start_time)


class DistillationLog(TrainerCallback):
    """Keeps the training log lines that carry the distillation parts (`step`, `loss`, `distill_kl`,
    `hard_loss`), for the step's report; `TrainResult.history` keeps only the common keys."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if logs and KL_KEY in logs:
            keep = ("step", "loss", KL_KEY, HARD_KEY)
            self.rows.append({"step": state.global_step, **{k: logs[k] for k in keep if k in logs}})
