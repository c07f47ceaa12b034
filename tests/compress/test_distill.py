"""Distillation: the KD loss against a hand computation (shift, -100 mask, padded vocabularies, token
normalisation), the tokenizer check, and a student distilled from a teacher getting closer to it, saved as a
plain model with the teacher's tokenizer while both input folders stay as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TrainingArguments

from seektune.compress.distill import check_same_tokenizer, distill_model
from seektune.config import DistillConfig, ModelConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from seektune.train.distill import DistillationTrainer, distillation_kl
from train import tinymodels

CPU = ModelConfig(device="cpu", dtype="float32")
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
STUDENT_VOCAB = 72  # the student's embeddings padded beyond the tokenizer's 64 tokens


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(sum over labelled positions of T^2 * KL(p_teacher || p_student), number of those positions),
    position by position: the logits at i predict labels[i + 1]; the shared first vocabulary rows only."""
    vocab = min(student.shape[-1], teacher.shape[-1])
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            if labels[row, position + 1] == -100:
                continue
            p = torch.softmax(teacher[row, position, :vocab].double() / temperature, dim=-1)
            q = torch.softmax(student[row, position, :vocab].double() / temperature, dim=-1)
            total += float((p * (p.log() - q.log())).sum()) * temperature**2
            count += 1
    return total, count


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(8, tinymodels.VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    ids[1, 6:] = tinymodels.PAD
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, 0] = -100
    labels[0, 1:3] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _teacher() -> torch.nn.Module:
    """The tiny two-block Llama with a sharpened head, so its next-token distribution says something."""
    model = tinymodels.llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _student() -> torch.nn.Module:
    return tinymodels.llama(num_hidden_layers=1, vocab_size=STUDENT_VOCAB)


def _trainer(tmp_path: Path, alpha: float, temperature: float) -> DistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    return DistillationTrainer(
        model=_student().eval(),
        args=args,
        checkpoint_identity={},
        teacher=_teacher(),
        temperature=temperature,
        alpha=alpha,
    )


def test_kl_equals_a_hand_computation_over_labelled_shifted_positions():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 10, generator=generator) * 3
    teacher = torch.randn(2, 6, 12, generator=generator) * 3  # padded to 12 rows, 10 real tokens
    labels = torch.tensor([[-100, 4, 5, -100, 2, 1], [-100, -100, 3, 3, 9, -100]])
    total, count = _hand_kl(student, teacher, labels, 2.0)
    assert count == 7
    assert float(distillation_kl(student, teacher, labels, 2.0)) == pytest.approx(total / 7, rel=1e-5)
    # Normalised by the tokens of the whole accumulated batch when the Trainer gives their number.
    by_items = distillation_kl(student, teacher, labels, 2.0, num_items_in_batch=torch.tensor(20))
    assert float(by_items) == pytest.approx(total / 20, rel=1e-5)
    # Labels already shifted (transformers' shift_labels): no second shift.
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    aligned = distillation_kl(student, teacher, shifted, 2.0, shifted=True)
    assert float(aligned) == pytest.approx(total / 7, rel=1e-5)
    # Equal distributions: no divergence, whatever the padding rows hold.
    assert distillation_kl(teacher[..., :10], teacher, labels, 2.0).abs() < 1e-6


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
def test_trainer_loss_mixes_the_models_cross_entropy_and_the_kl(tmp_path, alpha):
    trainer = _trainer(tmp_path, alpha, temperature=2.0)
    batch = _batch()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        student_out = trainer.model(**batch)
        teacher_logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    kl_total, count = _hand_kl(student_out.logits, teacher_logits.logits, batch["labels"], 2.0)
    assert count == 10
    expected = alpha * kl_total / count + (1 - alpha) * float(student_out.loss)
    assert kl_total / count > 0.1 and abs(kl_total / count - float(student_out.loss)) > 0.1
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    if alpha == 0.0:
        assert float(loss) == pytest.approx(float(student_out.loss), rel=1e-6)  # plain cross-entropy


def test_both_parts_are_normalised_by_the_accumulated_batchs_tokens(tmp_path):
    trainer = _trainer(tmp_path, alpha=0.5, temperature=1.0)
    batch = _batch()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(25))
        student_out = trainer.model(**batch)
        teacher_logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    kl_total, count = _hand_kl(student_out.logits, teacher_logits.logits, batch["labels"], 1.0)
    ce_total = float(student_out.loss) * count  # the model's mean over its 10 labelled tokens
    assert float(loss) == pytest.approx(0.5 * kl_total / 25 + 0.5 * ce_total / 25, rel=1e-5)


def test_the_teacher_is_frozen_and_gets_no_gradient(tmp_path):
    trainer = _trainer(tmp_path, alpha=1.0, temperature=2.0)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(_batch())).backward()
    assert not trainer.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert all(p.grad is not None for p in trainer.model.model.layers.parameters())


def _other_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(tinymodels.VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")),
        pad_token="w7",
        eos_token="w2",
    )


def _bigger_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(tinymodels.VOCAB + 4)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
        pad_token="t7",
        eos_token="t2",
    )


def test_same_tokenizer_passes_and_differences_are_named():
    same = tinymodels.word_tokenizer()
    check_same_tokenizer(tinymodels.word_tokenizer(), same, "big", "small")
    with pytest.raises(UserError) as caught:
        check_same_tokenizer(tinymodels.word_tokenizer(), _other_tokenizer(), "org/teacher", "org/student")
    text = str(caught.value)
    assert "'org/teacher'" in text and "'org/student'" in text
    assert "token 't0' is id 0 in the teacher's, missing in the student's" in text
    assert "same family" in text and "\n" not in text
    with pytest.raises(UserError, match=r"64 tokens vs 68.*'t64' \(id 64\) is only in the student's"):
        check_same_tokenizer(tinymodels.word_tokenizer(), _bigger_tokenizer(), "a", "b")
    other_eos = tinymodels.word_tokenizer()
    other_eos.eos_token = "t3"
    with pytest.raises(UserError, match=r"eos tokens differ \(id 2 vs 3\)"):
        check_same_tokenizer(tinymodels.word_tokenizer(), other_eos, "a", "b")


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = tinymodels.word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return _save(_teacher(), tokenizer, tmp_path_factory.mktemp("teacher"))


def _held_out_kl(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    ids = torch.randint(8, tinymodels.VOCAB, (8, 12), generator=torch.Generator().manual_seed(99))
    labels = ids.clone()
    labels[:, 0] = -100
    with torch.no_grad():
        return float(distillation_kl(student.eval()(ids).logits, teacher.eval()(ids).logits, labels, 1.0))


@pytest.mark.slow
def test_distilled_student_gets_closer_to_the_teacher(teacher_dir, tmp_path):
    student_dir = _save(_student(), tinymodels.word_tokenizer(), tmp_path / "student")
    before = {"teacher": _digest(teacher_dir), "student": _digest(student_dir)}
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    kl_before = _held_out_kl(AutoModelForCausalLM.from_pretrained(student_dir), teacher)
    data = PreparedData(records={}, tokenized={"train": tinymodels.domain_split({"a": 48}), "validation": []})
    cfg = DistillConfig(
        enabled=True, student=str(student_dir), temperature=2.0, alpha=0.8, max_steps=24, learning_rate=1e-2
    )
    output = distill_model(
        teacher_dir,
        tmp_path / "distilled",
        tmp_path / "work",
        cfg,
        CPU,
        TrainConfig(logging_steps=4, warmup_ratio=0.0),
        data,
        0,
    )
    assert output.name == "distill" and output.model_dir == tmp_path / "distilled"
    assert {"teacher": _digest(teacher_dir), "student": _digest(student_dir)} == before  # only read
    assert not (tmp_path / ".distilled-partial").exists()

    distilled = AutoModelForCausalLM.from_pretrained(output.model_dir)  # plain transformers
    kl_after = _held_out_kl(distilled, teacher)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert AutoTokenizer.from_pretrained(output.model_dir).chat_template == TEMPLATE  # the teacher's
    assert (output.model_dir / "generation_config.json").is_file()
    assert distilled.get_input_embeddings().weight.shape[0] == STUDENT_VOCAB

    details = output.details
    assert details["teacher"] == str(teacher_dir) and details["student"] == str(student_dir)
    assert details["teacher_parameters"] > details["student_parameters"] > 0
    assert details["steps"] == 24 and details["temperature"] == 2.0 and details["alpha"] == 0.8
    assert details["final_distill_kl"] < details["first_distill_kl"]
    assert details["final_loss"] < details["first_loss"]
    mixed = 0.8 * details["final_distill_kl"] + 0.2 * details["final_hard_loss"]
    assert details["final_loss"] == pytest.approx(mixed, abs=2e-4)  # the logged parts make up the loss


def test_a_student_with_another_tokenizer_is_refused_before_training(teacher_dir, tmp_path):
    student_dir = _save(_student(), _other_tokenizer(), tmp_path / "student")
    data = PreparedData(records={}, tokenized={"train": tinymodels.domain_split({"a": 8}), "validation": []})
    cfg = DistillConfig(enabled=True, student=str(student_dir))
    with pytest.raises(UserError, match="same tokenizer") as caught:
        distill_model(teacher_dir, tmp_path / "out", tmp_path / "work", cfg, CPU, TrainConfig(), data, 0)
    assert str(teacher_dir) in str(caught.value) and str(student_dir) in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
