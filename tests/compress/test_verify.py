"""The check after a compression step: the fixed prompt set, and each figure against a hand-computed
value (identical model, perturbed weights, perplexity, teacher-forced agreement, EOS rate), the failure
line naming the config key, and None limits that never fail."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seektune.compress.verify import PERPLEXITY_ROWS, build_probe_set, check_step, probe_model
from seektune.config import StepCheckConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from train import tinymodels

EOS = 2
NEW_TOKENS = 4
# Each turn's words, then t3 as the generation prompt.
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t3{% endif %}"
OFF = StepCheckConfig(
    max_logit_diff=None, max_perplexity_increase=None, min_greedy_agreement=None, max_eos_rate_drop=None
)


def _tokenizer() -> PreTrainedTokenizerFast:
    """The word tokenizer's vocabulary (t0 .. t63, pad t7, eos t2), split on spaces."""
    tokenizer = Tokenizer(
        models.WordLevel(vocab={f"t{i}": i for i in range(tinymodels.VOCAB)}, unk_token="t0")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=AddedToken("t7", single_word=True, special=True),  # t7 alone, not the start of t70
        eos_token=AddedToken("t2", single_word=True, special=True),
    )
    fast.chat_template = TEMPLATE
    return fast


def _conversation(words: list[int], answer: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(f"t{w}" for w in words)},
            {"role": "assistant", "content": f"t{answer}"},
        ]
    }


def _data(prompts: int = 3, rows: int = 5) -> PreparedData:
    generator = torch.Generator().manual_seed(3)
    records = [{"messages": []}]  # a record with no conversation is skipped
    records += [
        _conversation(torch.randint(8, 64, (5,), generator=generator).tolist(), 20 + i)
        for i in range(prompts)
    ]
    tokenized = {"input_ids": [], "labels": []}
    for i in range(rows):
        ids = torch.randint(8, 64, (4 + i,), generator=generator).tolist()
        tokenized["input_ids"].append(ids)
        tokenized["labels"].append([-100, -100, *ids[2:]])
    return PreparedData(records={"test": records}, tokenized={"test": Dataset.from_dict(tokenized)})


@pytest.fixture(scope="module")
def setup() -> tuple:
    """(model, tokenizer, data, probe set, the model's own probe)."""
    model = tinymodels.llama().eval()
    tokenizer = _tokenizer()
    data = _data()
    probes = build_probe_set(data, tokenizer, n_prompts=3, system_prompt=None)
    return model, tokenizer, data, probes, probe_model(model, tokenizer, probes, NEW_TOKENS)


def _perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return noisy


def _with_eos_bias(model: torch.nn.Module, bias: float) -> torch.nn.Module:
    """`model` whose output layer adds `bias` to the EOS logit (+: always EOS, -: never)."""
    biased = copy.deepcopy(model)
    head = torch.nn.Linear(biased.lm_head.in_features, biased.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(biased.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = bias
    biased.lm_head = head
    return biased


def test_the_probe_set_is_the_first_test_conversations_and_rows(setup):
    _, tokenizer, data, probes, _ = setup
    first = data.records["test"][1]["messages"][0]["content"]
    assert probes.prompt_ids[0] == [int(w[1:]) for w in first.split()] + [3]
    assert len(probes.prompt_ids) == 3
    assert [r["input_ids"] for r in probes.rows] == data.tokenized["test"]["input_ids"]
    assert len(build_probe_set(data, tokenizer, 2, None).prompt_ids) == 2
    many = _data(prompts=1, rows=PERPLEXITY_ROWS + 3)
    assert len(build_probe_set(many, tokenizer, 8, None).rows) == PERPLEXITY_ROWS


def test_a_test_split_without_conversations_is_refused(setup):
    _, tokenizer, data, _, _ = setup
    empty = PreparedData(records={"test": [{"messages": []}]}, tokenized=data.tokenized)
    with pytest.raises(UserError, match=r"no conversation.*data\.test_ratio"):
        build_probe_set(empty, tokenizer, 3, None)


def test_an_identical_model_passes_with_no_difference(setup):
    model, tokenizer, _, probes, before = setup
    strict = StepCheckConfig(
        max_logit_diff=1e-6, max_perplexity_increase=0.0, min_greedy_agreement=1.0, max_eos_rate_drop=0.0
    )
    result, after = check_step("merge", before, copy.deepcopy(model), tokenizer, probes, strict, NEW_TOKENS)
    figures = result.figures
    assert result.passed and result.failures == [] and result.step == "merge"
    assert figures["max_logit_diff"] == 0
    assert figures["greedy_agreement"] == 1 and figures["exact_match"] == 1
    assert figures["perplexity_change"] == 0 and figures["eos_rate_drop"] == 0
    assert after.answers == before.answers and all(len(a) > 0 for a in before.answers)
    assert result.to_dict()["figures"] == figures


def _perplexity_by_hand(model: torch.nn.Module, rows: list[dict]) -> float:
    nll = count = 0.0
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor([row["input_ids"]])).logits[0]
            for position, label in enumerate(row["labels"][1:]):
                if label != -100:
                    nll -= torch.log_softmax(logits[position], -1)[label].item()
                    count += 1
    return math.exp(nll / count)


def _agreement_by_hand(model: torch.nn.Module, probes, answers: list[list[int]]) -> float:
    agree = total = 0
    with torch.no_grad():
        for ids, answer in zip(probes.prompt_ids, answers, strict=True):
            logits = model(torch.tensor([ids + answer])).logits[0]
            for offset, token in enumerate(answer):
                agree += int(logits[len(ids) - 1 + offset].argmax()) == token
                total += 1
    return agree / total


def test_a_perturbed_model_fails_max_logit_diff_with_the_config_key(setup):
    model, tokenizer, _, probes, before = setup
    noisy = _perturbed(model, 0.05).eval()
    check = StepCheckConfig(max_logit_diff=1e-3, max_perplexity_increase=None, min_greedy_agreement=None)
    result, after = check_step("prune", before, noisy, tokenizer, probes, check, NEW_TOKENS)
    figures = result.figures
    with torch.no_grad():
        expected = max(
            (model(torch.tensor([ids])).logits[0] - noisy(torch.tensor([ids])).logits[0]).abs().max().item()
            for ids in probes.prompt_ids
        )
    assert figures["max_logit_diff"] == pytest.approx(expected, rel=1e-5) and expected > 1e-3
    assert not result.passed
    assert len(result.failures) == 1 and "compress.prune.check.max_logit_diff" in result.failures[0]
    # perplexity and teacher-forced agreement against values computed by hand
    ppl_before, ppl_after = _perplexity_by_hand(model, probes.rows), _perplexity_by_hand(noisy, probes.rows)
    assert before.perplexity == pytest.approx(ppl_before, rel=1e-5)
    assert after.perplexity == pytest.approx(ppl_after, rel=1e-5)
    assert figures["perplexity_change"] == pytest.approx(ppl_after / ppl_before - 1, rel=1e-4, abs=1e-7)
    assert figures["greedy_agreement"] == pytest.approx(_agreement_by_hand(noisy, probes, before.answers))


def test_each_limit_names_its_key_and_none_limits_never_fail(setup):
    model, tokenizer, _, probes, before = setup
    noisy = _perturbed(model, 0.5).eval()  # far off: logits, perplexity and greedy tokens all move
    strict = StepCheckConfig(
        max_logit_diff=1e-3, max_perplexity_increase=0.0, min_greedy_agreement=1.0, max_eos_rate_drop=None
    )
    result, _ = check_step("qat", before, noisy, tokenizer, probes, strict, NEW_TOKENS)
    figures = result.figures
    assert figures["greedy_agreement"] < 1 and figures["perplexity_change"] > 0
    keys = ["max_logit_diff", "max_perplexity_increase", "min_greedy_agreement"]
    assert [f.rsplit(": ", 1)[-1].rstrip(")") for f in result.failures] == [
        f"compress.qat.check.{k}" for k in keys
    ]
    relaxed, _ = check_step("qat", before, noisy, tokenizer, probes, OFF, NEW_TOKENS)
    assert relaxed.passed and relaxed.failures == []
    assert relaxed.figures["max_logit_diff"] == pytest.approx(figures["max_logit_diff"])  # still shown


def test_a_fall_of_the_eos_rate_is_caught(setup):
    model, tokenizer, _, probes, _ = setup
    always = _with_eos_bias(model, 30.0).eval()  # logits of the tiny model are below 1 in size
    never = _with_eos_bias(model, -30.0).eval()
    eos_first = probe_model(always, tokenizer, probes, NEW_TOKENS)
    assert eos_first.ended_with_eos == [True] * 3 and eos_first.answers == [[]] * 3
    check = OFF.model_copy(update={"max_eos_rate_drop": 0.25})
    result, no_eos = check_step("quantize", eos_first, never, tokenizer, probes, check, NEW_TOKENS)
    assert no_eos.ended_with_eos == [False] * 3 and all(len(a) == NEW_TOKENS for a in no_eos.answers)
    assert result.figures["eos_rate_before"] == 1 and result.figures["eos_rate_after"] == 0
    assert result.figures["eos_rate_drop"] == 1
    assert result.figures["greedy_agreement"] is None  # no answer tokens to agree with
    assert not result.passed and len(result.failures) == 1
    assert "compress.quantize.check.max_eos_rate_drop" in result.failures[0]
    back, _ = check_step("quantize", no_eos, always, tokenizer, probes, check, NEW_TOKENS)
    assert back.figures["eos_rate_drop"] == -1 and back.passed  # more answers ending is no failure


def test_a_16_bit_model_is_held_to_its_dtype_precision_not_float32s(setup):
    model, tokenizer, _, probes, _ = setup
    check = StepCheckConfig(max_logit_diff=1e-3, max_perplexity_increase=1e-3, min_greedy_agreement=None)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = copy.deepcopy(model).to(dtype)
        before = probe_model(base, tokenizer, probes, NEW_TOKENS)
        rounded = _perturbed(model, 1e-4).to(dtype).eval()  # below bf16's rounding of these weights
        results[dtype], _ = check_step("merge", before, rounded, tokenizer, probes, check, NEW_TOKENS)
    fp32, bf16 = results[torch.float32].figures, results[torch.bfloat16].figures
    assert not results[torch.float32].passed and fp32["max_logit_diff_limit"] == 1e-3
    assert fp32["max_logit_diff"] > 1e-3 and bf16["max_logit_diff"] > 1e-3
    assert bf16["max_logit_diff_limit"] == pytest.approx(1.6e-2 * bf16["max_abs_logit"])
    assert bf16["max_perplexity_increase_limit"] == 1.6e-2
    assert results[torch.bfloat16].passed, results[torch.bfloat16].failures
