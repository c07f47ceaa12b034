"""Attention on the prompt, on tiny Llama and DeepSeek-V3 (MLA) models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import pre_tokenizers

from seektune.evaluate.explain import attention_on_prompt
from train.tinymodels import deepseek_v3, llama
from train.tinymodels import word_tokenizer as _word_tokenizer

PROMPTS = ["t1 t12 t13 t14 t15", "t1 t20 t21 t22", "t1 t30 t31 t32 t33 t34"]
ANSWERS = [[40, 41, 42], [], [50, 51]]


def word_tokenizer():
    """tinymodels' tokens t0 .. t63, split at white space."""
    tokenizer = _word_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def _by_hand(model, prompt_ids: list[int], answer: list[int]) -> tuple[float, list[float]]:
    """The share from the model's own attentions with explicit loops over answer tokens, heads and layers.

    Answer token j sits at position p + j; its row is the generation step that wrote the next token
    (answer[j + 1], or the end after the last one). The step that wrote answer[0], the last prompt token's
    row, sees nothing but the prompt (share 1 by the causal mask) and is not read.
    """
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids + answer]), output_attentions=True)
    model.set_attn_implementation("sdpa")
    attn = [layer[0].double() for layer in out.attentions]  # (heads, L, L) per layer
    layers, heads = len(attn), attn[0].shape[0]
    p = len(prompt_ids)

    def share(weight) -> float:  # weight(q, k) -> averaged mass
        values = []
        for j in range(len(answer)):  # one value per answer token
            q = p + j  # the row at answer[j]: the step that wrote what follows it
            on_prompt = sum(weight(q, k) for k in range(1, p))  # prompt keys, the first token left out
            seen = sum(weight(q, k) for k in range(1, q + 1))  # every key the query sees but the first
            values.append(on_prompt / seen)
        return sum(values) / len(values)

    overall = share(
        lambda q, k: sum(float(a[h, q, k]) for a in attn for h in range(heads)) / (layers * heads)
    )
    per_layer = [share(lambda q, k, a=a: sum(float(a[h, q, k]) for h in range(heads)) / heads) for a in attn]
    return overall, per_layer


@pytest.mark.parametrize("answer", [[40, 41, 42], [40]], ids=["three_tokens", "one_token"])
@pytest.mark.parametrize("build", [llama, deepseek_v3], ids=["llama", "deepseek_v3"])
def test_share_matches_a_hand_computation_and_attention_is_restored(build, answer):
    model, tokenizer = build().eval(), word_tokenizer()
    assert model.config._attn_implementation == "sdpa"
    result = attention_on_prompt(model, tokenizer, PROMPTS[:1], [answer], max_samples=4)
    assert model.config._attn_implementation == "sdpa"  # switched back after the measurement
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert prompt_ids == [1, 12, 13, 14, 15]
    overall, per_layer = _by_hand(model, prompt_ids, answer)
    assert 0 <= result["attention_on_prompt"] <= 1
    assert result["attention_on_prompt"] == pytest.approx(overall, abs=1e-6)
    assert result["per_layer"] == pytest.approx(per_layer, abs=1e-6)
    assert result["n"] == 1
    assert "first token excluded" in result["method"]
    # Every row read also sees the answer written so far (the last prompt token's row would give exactly 1).
    assert result["attention_on_prompt"] < 1


def test_empty_answers_are_skipped_and_examples_averaged():
    model, tokenizer = llama(), word_tokenizer()
    both = attention_on_prompt(model, tokenizer, PROMPTS, ANSWERS, max_samples=10)
    assert both["n"] == 2
    first = attention_on_prompt(model, tokenizer, PROMPTS[:1], ANSWERS[:1], max_samples=10)
    third = attention_on_prompt(model, tokenizer, PROMPTS[2:], ANSWERS[2:], max_samples=10)
    mean = (first["attention_on_prompt"] + third["attention_on_prompt"]) / 2
    assert both["attention_on_prompt"] == pytest.approx(mean)
    assert len(both["per_layer"]) == 2
    limited = attention_on_prompt(model, tokenizer, PROMPTS, ANSWERS, max_samples=1)
    assert limited["n"] == 1 and limited["attention_on_prompt"] == pytest.approx(first["attention_on_prompt"])
    none = attention_on_prompt(model, tokenizer, PROMPTS[1:2], ANSWERS[1:2], max_samples=10)
    assert none["attention_on_prompt"] is None and "no example has a generated answer" in none["reason"]


def test_training_mode_is_restored():
    model = llama().train()
    attention_on_prompt(model, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    assert model.training is True
    model.eval()
    attention_on_prompt(model, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    assert model.training is False


def test_peft_wrapped_model_is_measured_on_its_base_and_restored():
    peft = pytest.importorskip("peft")
    base = llama()
    plain = attention_on_prompt(base, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    result = attention_on_prompt(wrapped, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    assert wrapped.get_base_model().config._attn_implementation == "sdpa"
    # LoRA B starts at zero: the adapter does not change the attention yet
    assert result["attention_on_prompt"] == pytest.approx(plain["attention_on_prompt"], abs=1e-6)


def test_a_failing_switch_is_reported_not_raised(monkeypatch):
    model = llama()

    def refuse(implementation: str, **kwargs) -> None:
        raise ValueError("eager is not supported here")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    result = attention_on_prompt(model, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    assert result["attention_on_prompt"] is None
    assert result["reason"] == "switching to eager attention failed: eager is not supported here"

    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation, **kwargs: None)  # ignored
    result = attention_on_prompt(model, word_tokenizer(), PROMPTS[:1], ANSWERS[:1], max_samples=1)
    assert result["attention_on_prompt"] is None
    assert "cannot switch from sdpa to eager attention" in result["reason"]
