"""Model-side metrics on a tiny Llama: perplexity statistics, log-likelihood choices, generation settings,
and `task_metrics` on a hand-built PreparedData."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seektune.config import EvalConfig
from seektune.data.encode import encode_chat, encode_text, prompt_text
from seektune.data.prepare import IGNORE_INDEX, PreparedData
from seektune.data.records import RECORD_FEATURES, make_record
from seektune.evaluate.classify import (
    _continuation_ids,
    _loglikelihoods,
    choice_predictions,
    classification_stats,
)
from seektune.evaluate.generate import generate_answers
from seektune.evaluate.metrics import evaluate_model, perplexity, perplexity_stats, task_metrics
from seektune.evaluate.text_metrics import text_metric_stats
from train.tinymodels import deepseek_v3, llama

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = "USER BOT review great awful movie film the cat sat on a mat dog ran good bad what is it say yes no"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}BOT {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}BOT {% endif %}"
)
ALL_METRICS = [
    "perplexity", "exact_match", "token_f1", "accuracy", "macro_f1",
    "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS.split()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = TEMPLATE
    return tok


def _ids(tokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@pytest.fixture(scope="module")
def model(tokenizer):
    return llama(**_ids(tokenizer)).eval()


@contextmanager
def biased(model, token_id: int, bias: float):
    """The model with `bias` added to one token's logit everywhere."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., token_id] += bias
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def chat(question: str, answer: str, label: str = "") -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return make_record(messages=messages, label=label)


def prepared(records: list[dict], tokenizer) -> PreparedData:
    rows = []
    for record in records:
        if record["messages"]:
            rows.append(encode_chat(record["messages"], tokenizer, max_length=64)[0])
        else:
            rows.append(encode_text(record["text"], tokenizer, max_length=64)[0])
    return PreparedData(
        records={"test": Dataset.from_list(records, features=RECORD_FEATURES)},
        tokenized={"test": Dataset.from_list(rows)},
    )


LABELLED = [
    chat("review great movie", "good", "good"),
    chat("review awful film", "bad", "bad"),
    chat("what is the cat", "the cat sat on a mat", "good"),
    make_record(text="the dog ran on a mat"),  # a document: perplexity only
    chat("review the film", "awful film", "bad"),
]


@torch.no_grad()
def _hand_nll(model, row) -> tuple[float, int]:
    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float()
    logprobs = logits[:-1].log_softmax(-1)
    targets = torch.tensor(row["labels"][1:])
    keep = targets != IGNORE_INDEX
    return float(-logprobs[keep].gather(1, targets[keep].unsqueeze(1)).sum()), int(keep.sum())


# ---------------------------------------------------------------------------------------------------------
# Perplexity


@torch.no_grad()
def test_perplexity_stats_per_example_and_batched_equal_one_forward_each(model, tokenizer):
    rows = list(prepared(LABELLED, tokenizer).tokenized["test"])
    stats = perplexity_stats(model, rows, batch_size=2, pad_id=tokenizer.pad_token_id)
    hand = np.array([_hand_nll(model, row) for row in rows])
    assert stats.stats[:, 1].tolist() == hand[:, 1].tolist()
    assert stats.stats[:, 0] == pytest.approx(hand[:, 0], rel=1e-5)
    assert not stats.higher_is_better
    assert stats.value() == pytest.approx(np.exp(hand[:, 0].sum() / hand[:, 1].sum()), rel=1e-5)
    assert stats.value([1, 3]) == pytest.approx(
        np.exp(hand[[1, 3], 0].sum() / hand[[1, 3], 1].sum()), rel=1e-5
    )
    assert perplexity(model, rows, 3, tokenizer.pad_token_id) == pytest.approx(stats.value(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Classification by log-likelihood

CHOICES = ["good", "bad", "the cat"]  # "the cat" is two tokens


def _prompts(tokenizer, records=LABELLED):
    return [prompt_text(r["messages"], tokenizer) for r in records if r["messages"]]


@torch.no_grad()
def _hand_loglik(model, tokenizer, prompt: str, choice: str) -> float:
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
    logprobs = model(input_ids=torch.tensor([context + answer])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(context) - 1 + k, token]) for k, token in enumerate(answer))


def test_choice_loglikelihoods_equal_a_hand_loop_of_one_forward_per_pair(model, tokenizer):
    prompts = _prompts(tokenizer)
    pairs = [_continuation_ids(tokenizer, p, c) for p in prompts for c in CHOICES]
    assert tokenizer.convert_ids_to_tokens(pairs[2][1]) == ["the", "cat"]  # prompt ends "BOT ": space moves
    batched = _loglikelihoods(model, pairs, batch_size=5, pad_id=tokenizer.pad_token_id)
    hand = [_hand_loglik(model, tokenizer, p, c) for p in prompts for c in CHOICES]
    assert batched == pytest.approx(hand, rel=1e-5)
    expected = [CHOICES[int(np.argmax(hand[i : i + 3]))] for i in range(0, len(hand), 3)]
    assert choice_predictions(model, tokenizer, prompts, CHOICES, batch_size=4) == expected


def test_choice_predictions_pick_the_choice_the_model_prefers(model, tokenizer):
    prompts = _prompts(tokenizer)
    for preferred in ("good", "bad"):
        with biased(model, tokenizer.convert_tokens_to_ids(preferred), 20.0):
            assert choice_predictions(model, tokenizer, prompts, CHOICES, 4) == [preferred] * len(prompts)


# ---------------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def _hand_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return new


def test_greedy_generation_equals_a_hand_argmax_loop(model, tokenizer):
    prompts = _prompts(tokenizer)  # different lengths: left padding in one batch
    cfg = EvalConfig(max_new_tokens=5, batch_size=4)
    generations = generate_answers(model, tokenizer, prompts, cfg)
    for prompt, generation in zip(prompts, generations, strict=True):
        expected = _hand_greedy(model, tokenizer, prompt, 5)
        assert generation.token_ids == expected
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert generation.new_tokens == len(expected) + generation.ended_with_eos <= 5


def test_generation_stops_at_eos_and_at_max_new_tokens(model, tokenizer):
    prompts = _prompts(tokenizer)[:2]
    with biased(model, tokenizer.eos_token_id, -1e4):
        never = generate_answers(model, tokenizer, prompts, EvalConfig(max_new_tokens=3))
    assert [(g.new_tokens, len(g.token_ids), g.ended_with_eos) for g in never] == [(3, 3, False)] * 2
    with biased(model, tokenizer.eos_token_id, 1e4):
        at_once = generate_answers(model, tokenizer, prompts, EvalConfig(max_new_tokens=3))
    assert [(g.text, g.new_tokens, g.token_ids, g.ended_with_eos) for g in at_once] == [("", 1, [], True)] * 2


def test_sampling_honours_temperature_and_top_p(model, tokenizer):
    prompts = _prompts(tokenizer)
    greedy = [g.token_ids for g in generate_answers(model, tokenizer, prompts, EvalConfig(max_new_tokens=6))]
    with biased(model, tokenizer.eos_token_id, -1e4):
        greedy_long = generate_answers(model, tokenizer, prompts, EvalConfig(max_new_tokens=6))
        hot = EvalConfig(max_new_tokens=6, do_sample=True, temperature=5.0, top_p=1.0)
        torch.manual_seed(1)
        first = generate_answers(model, tokenizer, prompts, hot)
        torch.manual_seed(1)
        again = generate_answers(model, tokenizer, prompts, hot)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]  # seeded sampling repeats
    assert [g.token_ids for g in first] != [g.token_ids for g in greedy_long]  # ... and is not greedy
    nucleus = EvalConfig(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1e-6)  # top token only
    torch.manual_seed(2)
    assert [g.token_ids for g in generate_answers(model, tokenizer, prompts, nucleus)] == greedy


# ---------------------------------------------------------------------------------------------------------
# task_metrics


def test_task_metrics_gives_every_metric_from_its_statistics(model, tokenizer):
    data = prepared(LABELLED, tokenizer)
    cfg = EvalConfig(metrics=ALL_METRICS, max_new_tokens=4, batch_size=2)
    model.train()
    result = task_metrics(model, tokenizer, data, cfg, label="base")
    assert model.training  # the mode it had is restored
    model.eval()
    assert result.missing == {}
    assert set(result.scores) == {*ALL_METRICS, "n", "eos_rate", "mean_new_tokens"}
    assert result.scores["n"] == 5
    conversations = [0, 1, 2, 4]
    assert [r["messages"][0]["content"] for r in result.records] == [
        LABELLED[i]["messages"][0]["content"] for i in conversations
    ]
    assert len(result.generations) == 4
    assert result.test_index["perplexity"] == [0, 1, 2, 3, 4]
    assert [r["text"] for r in result.test_records] == [r["text"] for r in LABELLED]  # documents too
    assert result.test_index["bleu"] == result.test_index["accuracy"] == conversations
    rows = list(data.tokenized["test"])
    assert result.scores["perplexity"] == pytest.approx(
        perplexity(model, rows, 2, tokenizer.pad_token_id), abs=1e-4
    )
    predictions = [g.text for g in result.generations]
    references = ["good", "bad", "the cat sat on a mat", "awful film"]
    for metric in ("exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf"):
        expected = text_metric_stats(metric, predictions, references)
        np.testing.assert_allclose(result.stats[metric].stats, expected.stats)
        assert result.scores[metric] == pytest.approx(expected.value(), abs=1e-4)
    gold = ["good", "bad", "good", "bad"]
    predicted = choice_predictions(model, tokenizer, _prompts(tokenizer), ["bad", "good"], 2)
    assert result.predicted_labels == predicted
    for metric in ("accuracy", "macro_f1"):
        expected = classification_stats(metric, predicted, gold, ["bad", "good"]).value()
        assert result.scores[metric] == pytest.approx(expected, abs=1e-4)
    assert result.scores["eos_rate"] == pytest.approx(np.mean([g.ended_with_eos for g in result.generations]))


def test_unlabelled_data_names_why_label_metrics_are_missing(model, tokenizer):
    data = prepared([chat("review great movie", "good"), chat("what is it", "a cat")], tokenizer)
    cfg = EvalConfig(metrics=["rouge_l", "accuracy", "macro_f1"], max_new_tokens=2)
    result = task_metrics(model, tokenizer, data, cfg)
    assert set(result.missing) == {"accuracy", "macro_f1"}
    assert result.missing["accuracy"].startswith("no test example has a label")
    assert "data.sources[].fields.label" in result.missing["accuracy"]
    assert "accuracy" not in result.scores and "rouge_l" in result.scores


def test_documents_only_keep_perplexity_and_name_missing_references(model, tokenizer):
    data = prepared([make_record(text="the cat sat on a mat"), make_record(text="a dog ran")], tokenizer)
    result = task_metrics(model, tokenizer, data, EvalConfig(metrics=["perplexity", "rouge_l", "bleu"]))
    assert set(result.scores) == {"n", "perplexity"}
    assert result.missing["bleu"].startswith(
        "needs reference answers, but the test split holds documents only"
    )
    assert result.generations == [] and result.records == []


def test_loglik_with_one_choice_is_missing_and_generate_reads_labels(model, tokenizer):
    data = prepared(
        [chat("review great movie", "good", "good"), chat("what is it", "good", "good")], tokenizer
    )
    result = task_metrics(model, tokenizer, data, EvalConfig(metrics=["accuracy"]))
    assert "at least 2 choices" in result.missing["accuracy"] and "eval.choices" in result.missing["accuracy"]
    assert result.generations == []  # loglik needs no answers
    cfg = EvalConfig(metrics=["accuracy"], classify_by="generate", max_new_tokens=3)
    with biased(model, tokenizer.convert_tokens_to_ids("good"), 30.0):
        generated = task_metrics(model, tokenizer, data, cfg)
    assert generated.scores["accuracy"] == 1.0 and generated.predicted_labels == ["good", "good"]


def test_warnings_for_empty_answers_and_labels_outside_the_choices(model, tokenizer):
    data = prepared(LABELLED, tokenizer)
    cfg = EvalConfig(metrics=["rouge_l", "accuracy"], choices=["good", "great"], max_new_tokens=3)
    with biased(model, tokenizer.eos_token_id, 1e4):
        result = task_metrics(model, tokenizer, data, cfg, label="base")
    assert result.warnings[0] == "4 of 4 answers are empty"
    assert result.warnings[1].startswith("2 of 4 test labels are not in eval.choices (bad)")
    assert result.scores["rouge_l"] == 0.0  # empty answers are still scored
    assert set(result.predicted_labels) <= {"good", "great"}


def test_max_samples_and_evaluate_model_wrapper(model, tokenizer):
    data = prepared(LABELLED, tokenizer)
    cfg = EvalConfig(metrics=["perplexity"], max_new_tokens=2, max_samples=4)
    assert task_metrics(model, tokenizer, data, cfg, max_samples=2).scores["n"] == 2
    lean = task_metrics(model, tokenizer, data, cfg)
    assert lean.scores["n"] == 4 and lean.generations == []  # no metric needs answers
    scores, generations = evaluate_model(model, tokenizer, data, cfg)
    assert len(generations) == 3  # conversations among the first 4 rows: answers always generated
    assert {"perplexity", "eos_rate", "mean_new_tokens"} <= set(scores)
    assert scores["perplexity"] == lean.scores["perplexity"]


def test_an_empty_test_split_misses_every_metric(model, tokenizer):
    data = PreparedData(
        records={"test": Dataset.from_dict({c: [] for c in RECORD_FEATURES}, features=RECORD_FEATURES)},
        tokenized={"test": Dataset.from_dict({"input_ids": [], "labels": []})},
    )
    result = task_metrics(model, tokenizer, data, EvalConfig(metrics=["perplexity", "bleu"]))
    assert result.scores == {"n": 0}
    assert set(result.missing) == {"perplexity", "bleu"}
    assert evaluate_model(model, tokenizer, data, EvalConfig())[0] == {"n": 0}


# ---------------------------------------------------------------------------------------------------------
# DeepSeek-V3 (MLA attention, MoE block): batching and padding change nothing


@pytest.fixture(scope="module")
def deepseek(tokenizer):
    return deepseek_v3(**_ids(tokenizer)).eval()


def test_deepseek_v3_batched_statistics_equal_one_forward_each(deepseek, tokenizer):
    rows = list(prepared(LABELLED, tokenizer).tokenized["test"])
    stats = perplexity_stats(deepseek, rows, batch_size=5, pad_id=tokenizer.pad_token_id)
    hand = np.array([_hand_nll(deepseek, row) for row in rows])
    assert stats.stats == pytest.approx(hand, rel=1e-5)
    prompts = _prompts(tokenizer)
    pairs = [_continuation_ids(tokenizer, p, c) for p in prompts for c in CHOICES]
    hand_loglik = [_hand_loglik(deepseek, tokenizer, p, c) for p in prompts for c in CHOICES]
    assert _loglikelihoods(deepseek, pairs, 6, tokenizer.pad_token_id) == pytest.approx(hand_loglik, rel=1e-5)
    generations = generate_answers(deepseek, tokenizer, prompts, EvalConfig(max_new_tokens=4, batch_size=4))
    assert [g.token_ids for g in generations] == [_hand_greedy(deepseek, tokenizer, p, 4) for p in prompts]
