"""Task metrics during training: logged beside eval_loss, equal to a hand computation, and watched by
keep_best and early stopping when `train.best_metric` is task_metric."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError
from safetensors.torch import load_file
from tinymodels import llama, word_tokenizer
from tokenizers import pre_tokenizers
from transformers import TrainerControl, TrainerState

from seektune.config import EvalConfig, TrainConfig, validate_config
from seektune.data.encode import encode_chat, prompt_text
from seektune.errors import UserError
from seektune.rundir import RunDir
from seektune.train import task_metric
from seektune.train.task_metric import TaskMetricCallback, TaskSample, task_metric_value, task_sample
from seektune.train.trainer import _best_metric, _task_metric, train

# Tokens t10..t19 and t30..t63 only: t2 (EOS) and t7 (pad) are added tokens, matched inside "t20" or "t71".
ANSWER = "t10 t11 t12"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tests' word tokenizer split on white space, with a plain chat template ending answers in EOS."""
    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}t2 {% endif %}{% endfor %}"
    )
    return tokenizer


def _conversation(i: int, answer: str = ANSWER, label: str = "") -> dict:
    question = f"t{30 + i % 30} t{31 + i % 30}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "text": "", "label": label}


def _data(tokenizer, validation_records: list[dict], train_size: int = 16) -> SimpleNamespace:
    """What train() reads of PreparedData: tokenised splits, validation records, the token count."""

    def rows(records):
        encoded = [encode_chat(r["messages"], tokenizer, 32)[0] for r in records if r["messages"]]
        return Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in encoded])

    train_records = [_conversation(i) for i in range(train_size)]
    return SimpleNamespace(
        records={"train": train_records, "validation": validation_records},
        tokenized={"train": rows(train_records), "validation": rows(validation_records)},
        report={"train_tokens": 100},
    )


def _cfg(**kwargs) -> TrainConfig:
    base = {"learning_rate": 0.05, "batch_size": 4, "eval_steps": 1, "logging_steps": 1, "precision": "fp32"}
    return TrainConfig(**{**base, **kwargs})


def test_the_metric_is_logged_at_every_evaluation_and_equals_the_hand_computation(chat_tokenizer, tmp_path):
    from seektune.evaluate.generate import generate_answers
    from seektune.evaluate.text_metrics import text_metric_stats

    validation = [_conversation(40 + i) for i in range(4)]
    validation.insert(1, {"messages": [], "text": "t40 t41", "label": ""})  # a document: not generated on
    data = _data(chat_tokenizer, validation)
    cfg = _cfg(max_steps=3, keep_best=False, task_metric="token_f1", task_metric_samples=3)
    eval_cfg = EvalConfig(max_new_tokens=4, batch_size=2, do_sample=True)  # the callback decodes greedily
    model, run = llama(), RunDir.create(tmp_path, "t")
    result = train(cfg, model, chat_tokenizer, data, run, seed=0, eval_cfg=eval_cfg)

    evaluations = [row for row in result.history if "eval_loss" in row]
    assert [row["step"] for row in evaluations] == [1, 2, 3]
    assert all("eval_token_f1" in row for row in evaluations)
    assert not any("eval_token_f1" in row for row in result.history if "loss" in row)  # training lines
    # By hand on the trained model (keep_best off: the weights of step 3), on the first 3 conversations.
    prompts = [prompt_text(validation[i]["messages"], chat_tokenizer) for i in (0, 2, 3)]
    greedy = eval_cfg.model_copy(update={"do_sample": False})
    answers = generate_answers(model, chat_tokenizer, prompts, greedy)
    expected = text_metric_stats("token_f1", [a.text for a in answers], [ANSWER] * 3, "char").value()
    assert evaluations[-1]["eval_token_f1"] == pytest.approx(expected, abs=1e-9)
    assert result.task_metric == {"eval_token_f1": round(expected, 4)}  # the final evaluation, in the scores
    assert result.scores()["eval_token_f1"] == round(expected, 4)
    assert len({row["eval_token_f1"] for row in evaluations}) > 1  # it follows training: not a constant

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run.logs_dir / "tensorboard")).Reload()
    logged = {event.step: event.value for event in board.Scalars("eval/token_f1")}
    assert logged[3] == pytest.approx(evaluations[-1]["eval_token_f1"], abs=1e-6)


def test_keep_best_and_early_stopping_follow_the_task_metric_not_the_loss(
    chat_tokenizer, tmp_path, monkeypatch
):
    scripted = iter([0.1, 0.5, 0.2, 0.3, 0.25])  # best at step 2, then 2 evaluations without improvement
    monkeypatch.setattr(task_metric, "task_metric_value", lambda *args: next(scripted))
    data = _data(chat_tokenizer, [_conversation(40 + i) for i in range(4)])
    cfg = _cfg(
        max_steps=10,
        task_metric="rouge_l",
        best_metric="task_metric",
        early_stopping_patience=2,
        save_total_limit=2,
    )
    run = RunDir.create(tmp_path, "t")
    result = train(cfg, llama(), chat_tokenizer, data, run, seed=0)

    evaluations = [row for row in result.history if "eval_loss" in row]
    scored = [(row["step"], row["eval_rouge_l"]) for row in evaluations]
    assert scored == [(1, 0.1), (2, 0.5), (3, 0.2), (4, 0.3)]
    assert result.steps == 4  # stopped after patience (2) evaluations without a higher rouge_l
    losses = [row["eval_loss"] for row in evaluations]
    assert min(losses) < losses[1]  # the loss alone would have kept another checkpoint
    final, best = load_file(run.path / "model" / "model.safetensors"), run.checkpoints_dir / "checkpoint-2"
    kept = load_file(best / "model.safetensors")
    latest = load_file(run.checkpoints_dir / "checkpoint-4" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[name], kept[name]) and not torch.equal(final[name], latest[name])
    state = TrainerState.load_from_json(str(run.checkpoints_dir / "checkpoint-4" / "trainer_state.json"))
    assert state.best_metric == 0.5 and state.best_model_checkpoint.endswith("checkpoint-2")


def test_best_metric_arguments_and_config_validation():
    assert _best_metric(_cfg(task_metric="chrf", best_metric="task_metric"), keep_best=True) == {
        "metric_for_best_model": "eval_chrf", "greater_is_better": True,
    }  # fmt: skip
    assert _best_metric(_cfg(task_metric="chrf"), keep_best=True) == {
        "metric_for_best_model": "eval_loss", "greater_is_better": False,
    }  # fmt: skip
    assert _best_metric(_cfg(task_metric="chrf"), keep_best=False)["metric_for_best_model"] is None
    with pytest.raises(ValidationError, match=r"train\.best_metric task_metric needs train\.task_metric"):
        TrainConfig(best_metric="task_metric")
    with pytest.raises(UserError, match=r"train: .*train\.best_metric task_metric needs train\.task_metric"):
        validate_config({"train": {"best_metric": "task_metric"}})
    with pytest.raises(UserError, match=r"train\.task_metric"):
        validate_config({"train": {"task_metric": "perplexity"}})  # lower-is-better: not offered
    with pytest.raises(UserError, match=r"train\.task_metric_samples"):
        validate_config({"train": {"task_metric": "rouge_l", "task_metric_samples": 0}})


def test_what_cannot_compute_the_metric_is_refused_before_training(chat_tokenizer, tmp_path):
    cfg = _cfg(max_steps=2, task_metric="rouge_l", best_metric="task_metric")
    documents = [{"messages": [], "text": "t40 t41", "label": ""}]
    data = _data(chat_tokenizer, [_conversation(40)])
    data.records["validation"] = documents
    with pytest.raises(UserError, match=r"holds none \(documents only\).*train\.best_metric: eval_loss"):
        train(cfg, llama(), chat_tokenizer, data, RunDir.create(tmp_path, "t"), seed=0)
    with pytest.raises(UserError, match=r"no validation split: set data\.validation_ratio above 0"):
        _task_metric(cfg, data, chat_tokenizer, None, None, None)
    unlabelled = [_conversation(40 + i) for i in range(3)]
    with pytest.raises(UserError, match=r"train\.task_metric accuracy .*map a label column"):
        task_sample("accuracy", unlabelled, chat_tokenizer, EvalConfig(), 8)
    one_label = [_conversation(40 + i, label="t50") for i in range(3)]
    with pytest.raises(UserError, match=r"only 1 \(t50\): list the labels in eval\.choices"):
        task_sample("accuracy", one_label, chat_tokenizer, EvalConfig(), 8)
    by_answer = task_sample("accuracy", one_label, chat_tokenizer, EvalConfig(classify_by="generate"), 8)
    assert by_answer.choices == ["t50"]


def test_the_sample_is_the_first_conversations_and_labelled_ones_for_classification(chat_tokenizer):
    records = [
        {"messages": [], "text": "t40", "label": "t50"},  # a document
        _conversation(1, label="t51"),
        _conversation(2),  # no label
        _conversation(3, label="t50"),
        _conversation(4, label="t52"),
    ]
    text = task_sample("rouge_l", records, chat_tokenizer, EvalConfig(), 2, system_prompt=None)
    assert text.prompts == [prompt_text(records[i]["messages"], chat_tokenizer) for i in (1, 2)]
    assert text.references == [ANSWER, ANSWER] and text.key == "eval_rouge_l"
    labels = task_sample("macro_f1", records, chat_tokenizer, EvalConfig(), 2)
    assert labels.gold == ["t51", "t50"] and labels.choices == ["t50", "t51"]
    given = task_sample("accuracy", records, chat_tokenizer, EvalConfig(choices=["t52", "t51", "t50"]), 8)
    assert given.gold == ["t51", "t50", "t52"] and given.choices == ["t52", "t51", "t50"]


def test_accuracy_by_likelihood_is_the_share_of_most_likely_choices_that_are_gold(chat_tokenizer):
    from seektune.evaluate.classify import choice_predictions

    records = [_conversation(i, label=("t50" if i % 2 else "t51")) for i in range(6)]
    sample = task_sample("accuracy", records, chat_tokenizer, EvalConfig(), 6)
    model = llama()
    predicted = choice_predictions(model, chat_tokenizer, sample.prompts, sample.choices, 4)
    expected = sum(p == g for p, g in zip(predicted, sample.gold, strict=True)) / 6
    value = task_metric_value(model, chat_tokenizer, sample, EvalConfig(batch_size=4))
    assert value == pytest.approx(expected)


def test_the_callback_scores_evaluation_lines_only_and_restores_the_model_mode(monkeypatch):
    monkeypatch.setattr(task_metric, "task_metric_value", lambda *args: 0.75)
    callback = TaskMetricCallback(TaskSample("chrf", ["t30 "], references=[ANSWER]), tokenizer=None)
    model = torch.nn.Linear(2, 2)
    state = SimpleNamespace(global_step=5, log_history=[{"loss": 1.0, "step": 5}])
    training_line = {"loss": 1.0}
    callback.on_log(None, state, TrainerControl(), logs=training_line, model=model)
    assert training_line == {"loss": 1.0} and callback.values == []
    state.log_history.append({"eval_loss": 2.0, "step": 5})
    evaluation = {"eval_loss": 2.0}
    model.train()
    callback.on_log(None, state, TrainerControl(), logs=evaluation, model=model)
    assert evaluation["eval_chrf"] == 0.75 and state.log_history[-1]["eval_chrf"] == 0.75
    assert callback.values == [(5, 0.75)] and model.training
    model.eval()
    callback.compute(model)
    assert not model.training


def test_under_several_processes_rank_0_computes_and_every_rank_gets_its_value(monkeypatch):
    sent = []

    def as_rank(rank: int, rank_0_sends=None):
        """This process is `rank`; a broadcast returns what rank 0 sends (its own value on rank 0)."""
        monkeypatch.setattr(task_metric, "is_main_process", lambda: rank == 0)
        monkeypatch.setattr(
            task_metric, "broadcast_from_main", lambda value: sent.append(value) or (rank_0_sends or value)
        )

    monkeypatch.setattr(task_metric, "world_size", lambda: 2)
    as_rank(0)
    assert task_metric._computed_on_main(lambda: 0.25) == 0.25 and sent == [(0.25, None)]
    as_rank(1, rank_0_sends=(0.5, None))
    assert task_metric._computed_on_main(lambda: pytest.fail("only rank 0 generates")) == 0.5

    sent.clear()
    as_rank(0)
    with pytest.raises(ZeroDivisionError):
        task_metric._computed_on_main(lambda: 1 / 0)
    assert sent == [(None, "ZeroDivisionError: division by zero")]  # the others are told, not left waiting
    as_rank(1, rank_0_sends=sent[0])
    with pytest.raises(RuntimeError, match="the task metric failed on rank 0: ZeroDivisionError"):
        task_metric._computed_on_main(lambda: 0.0)
