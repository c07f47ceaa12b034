"""Compression step 'distill': the model so far (the teacher) trains a student of the same tokenizer.

The student (`compress.distill.student`: a model folder or hub id, usually a smaller model of the same
family) trains for `max_steps` steps on the run's training split with the run's training engine
(`short_finetune`) and `seektune.train.distill.DistillationTrainer`'s loss: alpha * T^2 * KL to the
teacher's softened distribution + (1 - alpha) * the hard-label cross-entropy. The student is then saved as
a plain Hugging Face model with the teacher's tokenizer (its chat template included) and generation
config, whole or not at all (`save_step_model`); neither the teacher's folder nor the student's is written.

What is ours besides the wiring: the check that teacher and student share a tokenizer, before any
training. transformers compares nothing (a student of another vocabulary trains on ids that mean other
words, and the KL compares unrelated tokens); here a difference in the vocabulary or in the eos/pad/bos
ids is one `UserError` naming both models. Embedding matrices padded to different sizes are fine (the
KL compares the shared first rows). A student larger than the teacher is allowed; the report gives both
parameter counts.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from seektune.compress.finetune import short_finetune
from seektune.compress.steps import StepOutput, load_step_model, save_step_model
from seektune.config import DistillConfig, ModelConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from seektune.models.methods import count_parameters
from seektune.train.distill import HARD_KEY, KL_KEY, DistillationLog, DistillationTrainer

logger = logging.getLogger(__name__)

_SPECIAL_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")
_SAME_FAMILY = (
    "pick a student of the same family and tokenizer as the teacher (e.g. a smaller Qwen2.5 for a Qwen2.5 "
    "teacher, DeepSeek-R1-Distill-Qwen-1.5B for a DeepSeek-R1-Distill-Qwen-7B one), or set "
    "compress.distill.enabled: false"
)


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, teacher: str, student: str) -> None:
    """Raise a `UserError` unless both tokenizers map the same tokens to the same ids and agree on the
    eos, pad and bos ids."""
    problem = _vocabulary_difference(teacher_tok.get_vocab(), student_tok.get_vocab())
    if problem is None:
        for name in _SPECIAL_IDS:
            t_id, s_id = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
            if t_id != s_id:
                problem = f"their {name.removesuffix('_token_id')} tokens differ (id {t_id} vs {s_id})"
                break
    if problem is not None:
        raise UserError(
            f"distillation needs a teacher and student with the same tokenizer, but teacher {teacher!r} and "
            f"student {student!r} have different ones: {problem}; {_SAME_FAMILY}"
        )


def _vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """What first differs between two vocabularies (token -> id), or None when they are equal."""
    if teacher == student:
        return None
    sizes = f"{len(teacher)} tokens vs {len(student)}" if len(teacher) != len(student) else None
    for token, index in sorted(teacher.items(), key=lambda item: item[1]):
        if student.get(token) != index:
            other = student.get(token)
            where = "missing" if other is None else f"id {other}"
            first = f"token {token!r} is id {index} in the teacher's, {where} in the student's"
            return f"{sizes}; {first}" if sizes else first
    extra = min((index, token) for token, index in student.items() if teacher.get(token) != index)
    first = f"token {extra[1]!r} (id {extra[0]}) is only in the student's"
    return f"{sizes}; {first}" if sizes else first


def distill_model(
    teacher: Path,
    out_dir: Path,
    work_dir: Path,
    cfg: DistillConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PreparedData,
    seed: int,
) -> StepOutput:
    """Distil the model in `teacher` into `cfg.student` for `cfg.max_steps` steps on the training split
    of `data` and write the student (weights, the teacher's tokenizer, generation config) to `out_dir`,
    whole or not at all; the training sub-run lives in `work_dir`. Neither input folder is written."""
    if not cfg.student:
        raise UserError("compress.distill needs compress.distill.student (a model folder or hub id)")
    student_loaded = load_step_model(model_cfg, cfg.student, other_model=True)
    _check_plain(student_loaded.model, cfg.student)
    teacher_loaded = load_step_model(model_cfg, teacher)
    try:
        check_same_tokenizer(teacher_loaded.tokenizer, student_loaded.tokenizer, str(teacher), cfg.student)
        student, tokenizer = student_loaded.model, teacher_loaded.tokenizer
        sizes = {
            "teacher_parameters": count_parameters(teacher_loaded.model).total,
            "student_parameters": count_parameters(student).total,
        }
        if sizes["student_parameters"] >= sizes["teacher_parameters"]:
            logger.warning(
                "distillation student %s (%s parameters) is not smaller than teacher %s (%s)",
                cfg.student,
                f"{sizes['student_parameters']:,}",
                teacher,
                f"{sizes['teacher_parameters']:,}",
            )
        generation_config = getattr(teacher_loaded.model, "generation_config", None)
        student.train()
        log = DistillationLog()
        result = short_finetune(
            student,
            tokenizer,
            data,
            train_cfg,
            work_dir,
            seed,
            cfg.max_steps,
            cfg.learning_rate,
            batch_size=cfg.batch_size,
            trainer_class=DistillationTrainer,
            trainer_kwargs={
                "teacher": teacher_loaded.model,
                "temperature": cfg.temperature,
                "alpha": cfg.alpha,
            },
            callbacks=[log],
        )
    finally:
        _free(teacher_loaded)
    student.eval()
    save_step_model(student, tokenizer, out_dir, generation_config)
    details = {
        "teacher": str(teacher),
        "student": cfg.student,
        **sizes,
        "steps": result.steps,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "learning_rate": cfg.learning_rate,
        "train_loss": result.train_loss,
        **_first_and_final(log.rows),
    }
    logger.info(
        "distilled %s into %s: %d steps, final KL %s: %s",
        teacher,
        cfg.student,
        result.steps,
        details["final_distill_kl"],
        out_dir,
    )
    return StepOutput(name="distill", model_dir=Path(out_dir), details=details)


def _first_and_final(rows: list[dict[str, float]]) -> dict[str, float | None]:
    """first_/final_ loss, distill_kl and hard_loss of the training log (None when nothing was logged)."""
    facts: dict[str, float | None] = {}
    for key in ("loss", KL_KEY, HARD_KEY):
        values = [row[key] for row in rows if key in row]
        facts[f"first_{key}"] = round(values[0], 4) if values else None
        facts[f"final_{key}"] = round(values[-1], 4) if values else None
    return facts


def _check_plain(model: Any, student: str) -> None:
    """Distillation trains the student's own weights; a PEFT adapter loads frozen on its base."""
    if getattr(model, "peft_config", None):
        raise UserError(
            f"distillation student {student!r} loads as a PEFT adapter, whose weights would stay frozen: "
            "give a plain model folder or hub id (merge the adapter first with seektune compress)"
        )


def _free(loaded: Any) -> None:
    """Drop the teacher's weights (the student trains and is saved without it)."""
    device = loaded.device
    loaded.model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
