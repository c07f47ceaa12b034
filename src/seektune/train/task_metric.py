"""Task metrics during training: a fixed sample of validation conversations answered and scored at every
evaluation, so that `keep_best` and early stopping can watch ROUGE, F1 or accuracy instead of the loss.

At every evaluation the model answers the same first `train.task_metric_samples` validation conversations
(greedy, with the eval section's `max_new_tokens` and `batch_size`) and the answers are scored with the
evaluation stage's own functions (`seektune.evaluate.generate`, `text_metrics`, `classify`); the value
joins the evaluation's metrics as `eval_<metric>`. Labelled tasks (accuracy, macro_f1) read the predicted
label the way the evaluation stage does (`eval.classify_by`: the most likely choice, or the label found in
the answer).

Where the value is computed matters. `Trainer.evaluate` logs its metrics (`Trainer.log`: the log history,
then every callback's `on_log`: TensorBoard, MLflow, W&B, our progress display) *before* it calls
`on_evaluate`, so a value added in `on_evaluate` would reach early stopping and best-checkpoint selection
but never the logs. `on_log` is given the very dict that `evaluate` goes on to return to
`_determine_best_metric` (keep_best) and to pass to `EarlyStoppingCallback.on_evaluate`; the value is added
to it there, and to the log-history entry `Trainer.log` copied from it just before. For every other
callback to see it, this callback must run first: `install_first`.

Under several processes rank 0 alone generates (the others wait) and broadcasts the value, so that every
process takes the same early-stopping and checkpoint decision. Sharded weights (FSDP, ZeRO-3) cannot be
used by one process alone; `train()` refuses that combination before training.

Why our own: transformers' `compute_metrics` sees the logits of the teacher-forced evaluation batches, not
answers generated from the prompt, and no library hooks generation into the Trainer's evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from seektune.config import EvalConfig
from seektune.data.encode import last_exchange, prompt_text
from seektune.data.formats import has_answer
from seektune.distributed import broadcast_from_main, is_main_process, world_size
from seektune.errors import UserError
from seektune.evaluate.classify import LABEL_METRICS
from seektune.logs import log_event

logger = logging.getLogger(__name__)


@dataclass
class TaskSample:
    """The fixed validation prompts one task metric is computed on, with what the answers are scored by."""

    metric: str
    prompts: list[str]
    references: list[str] = field(default_factory=list)  # last assistant answers (text metrics)
    gold: list[str] = field(default_factory=list)  # labels (accuracy, macro_f1)
    choices: list[str] = field(default_factory=list)  # the labels a prediction may take

    @property
    def key(self) -> str:
        """The metric's name among the evaluation metrics."""
        return f"eval_{self.metric}"


def task_sample(
    metric: str,
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    eval_cfg: EvalConfig,
    samples: int,
    system_prompt: str | None = None,
) -> TaskSample:
    """The first `samples` validation conversations (with a label, for accuracy and macro_f1) as prompts.

    Raises UserError when the validation split has none, or (classification by likelihood) fewer than
    two labels to choose from.
    """
    labelled = metric in LABEL_METRICS
    chosen = _first_conversations(records, samples, labelled)
    if not chosen:
        raise UserError(_no_sample_message(metric, labelled))
    prompts = [prompt_text(record["messages"], tokenizer, system_prompt) for record in chosen]
    if not labelled:
        references = [last_exchange(record["messages"])[2] for record in chosen]
        return TaskSample(metric, prompts, references=references)
    gold = [record["label"] for record in chosen]
    choices = list(dict.fromkeys(eval_cfg.choices)) if eval_cfg.choices else sorted(set(gold))
    if eval_cfg.classify_by == "loglik" and len(choices) < 2:
        raise UserError(
            f"train.task_metric {metric} picks the most likely label, but the validation sample has only "
            f"{len(choices)} ({', '.join(choices)}): list the labels in eval.choices, or set "
            "eval.classify_by: generate"
        )
    return TaskSample(metric, prompts, gold=gold, choices=choices)


def _first_conversations(records: Iterable[dict[str, Any]], limit: int, labelled: bool) -> list[dict]:
    """The first `limit` records that are conversations with an answer (and a label when `labelled`)."""
    chosen: list[dict[str, Any]] = []
    for record in records:
        if len(chosen) >= limit:
            break
        answered = bool(record.get("messages")) and has_answer(record["messages"])
        if answered and (not labelled or (record.get("label") or "").strip()):
            chosen.append(record)
    return chosen


def _no_sample_message(metric: str, labelled: bool) -> str:
    if labelled:
        return (
            f"train.task_metric {metric} needs labelled validation conversations, but no validation "
            "conversation has a label: map a label column (data.sources[].fields.label), or set "
            "train.task_metric to a text metric (e.g. rouge_l) or null (with train.best_metric: eval_loss)"
        )
    return (
        f"train.task_metric {metric} scores answers to validation conversations, but the validation split "
        "holds none (documents only): give conversations with answers (data.validation_ratio above 0 or "
        "validation files), or set train.task_metric: null and train.best_metric: eval_loss"
    )


def task_metric_value(model: Any, tokenizer: Any, sample: TaskSample, eval_cfg: EvalConfig) -> float:
    """The metric of `model` on the sample: answers generated greedily and scored (no gradients)."""
    from seektune.evaluate.classify import choice_predictions, classification_stats, label_from_text
    from seektune.evaluate.generate import generate_answers
    from seektune.evaluate.text_metrics import text_metric_stats

    greedy = eval_cfg.model_copy(update={"do_sample": False})  # values must compare across steps
    if sample.metric not in LABEL_METRICS:
        answers = [g.text for g in generate_answers(model, tokenizer, sample.prompts, greedy)]
        stats = text_metric_stats(sample.metric, answers, sample.references, eval_cfg.chinese_tokenization)
        return stats.value()
    if eval_cfg.classify_by == "loglik":
        predicted = choice_predictions(model, tokenizer, sample.prompts, sample.choices, eval_cfg.batch_size)
    else:
        answers = generate_answers(model, tokenizer, sample.prompts, greedy)
        predicted = [label_from_text(g.text, sample.choices) for g in answers]
    return classification_stats(sample.metric, predicted, sample.gold, sample.choices).value()


class TaskMetricCallback(TrainerCallback):
    """Adds `eval_<metric>` to every evaluation's metrics, before they are logged; keeps (step, value)."""

    def __init__(self, sample: TaskSample, tokenizer: Any, eval_cfg: EvalConfig | None = None) -> None:
        self.sample = sample
        self.tokenizer = tokenizer
        self.eval_cfg = eval_cfg or EvalConfig()
        self.values: list[tuple[int, float]] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None, **kwargs: Any
    ) -> None:
        key = self.sample.key
        if logs is None or "eval_loss" not in logs or key in logs:
            return  # a training log line, or already scored
        started = time.perf_counter()
        value = float(_computed_on_main(lambda: self.compute(model)))
        logs[key] = value  # the dict evaluate() returns: keep_best and early stopping read it
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1][key] = value  # Trainer.log copied `logs` into the history just before
        self.values.append((state.global_step, value))
        seconds = round(time.perf_counter() - started, 2)
        log_event(logger, "task metric", step=state.global_step, **{key: round(value, 4)}, seconds=seconds)

    def compute(self, model: Any) -> float:
        """The metric of `model` now, in eval mode; the model's mode is restored afterwards."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return task_metric_value(model, self.tokenizer, self.sample, self.eval_cfg)
        finally:
            model.train(was_training)


def install_first(trainer: Any, callback: TrainerCallback) -> None:
    """Make `callback` the Trainer's first: its `on_log` must run before the loggers' (module docstring)."""
    trainer.callback_handler.callbacks.insert(0, callback)


def _computed_on_main(compute: Callable[[], float]) -> float:
    """`compute()` on rank 0, its value in every process; a failure on rank 0 fails every process."""
    if world_size() < 2:
        return compute()
    value, error = None, None
    if is_main_process():
        try:
            value = compute()
        except Exception as exc:  # the other processes wait in the broadcast: tell them before failing
            broadcast_from_main((None, f"{type(exc).__name__}: {exc}"))
            raise
    value, error = broadcast_from_main((value, error))
    if error is not None:
        raise RuntimeError(f"the task metric failed on rank 0: {error}")
    return value
