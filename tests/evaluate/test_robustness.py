"""Prompt noise of each kind (share changed, what it touches, determinism) and the robustness runner's
drops and score on fake scoring callbacks, checked by hand."""

from __future__ import annotations

import random
import re

import pytest

from seektune.config import RobustnessConfig
from seektune.data.encode import last_exchange
from seektune.evaluate.robustness import (
    distractor_sentences,
    measure_robustness,
    perturb,
    perturb_conversation,
    sentence_boundaries,
)

ENGLISH = (
    "The committee met on Tuesday to review the annual budget, and after a long debate it approved most of "
    "the proposals. Several members asked for more detail on travel costs; others wanted to know why the "
    "library fund had shrunk! What happens next? The chair promised a written answer: before the end of "
    "the month, every department will receive its final figures. Questions (if any) go to the secretary. "
    "Nobody expected the meeting to run so late, but the coffee helped a great deal, said one member."
)
CHINESE = (
    "今天上午，委员会开会审查了年度预算。经过长时间的讨论，大多数提案获得了通过！有几位成员要求提供差旅费用的"
    "详细说明；另一些人想知道为什么图书馆经费减少了。接下来会怎样？主席承诺在月底之前给出书面答复：每个部门都"
    "会收到最终数字。如有问题，请联系秘书。没有人想到会议会开得这么晚，但是咖啡帮了大忙。"
)
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[A-Za-z]")
MARK = re.compile(r"[,.!?:;'\"()\-，。！？：；、“”‘’（）《》「」…—]")


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ---------------------------------------------------------------------------------------------------------
# perturb


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_typos_edit_about_rate_of_the_letters_and_nothing_else(rate):
    letters = len(LETTER.findall(ENGLISH))
    edits = round(rate * letters)
    noisy = perturb(ENGLISH, "typo", rate, random.Random(3), [])
    assert edits / 2 <= levenshtein(ENGLISH, noisy) <= 2 * edits  # a swap costs two, the others one
    assert LETTER.sub("", noisy) == LETTER.sub("", ENGLISH)  # spaces, digits and marks untouched


def test_typo_edits_at_least_one_letter_and_keeps_letterless_text():
    assert perturb("Hi", "typo", 0.05, random.Random(0), []) != "Hi"
    assert perturb("123 456 ...", "typo", 0.5, random.Random(0), []) == "123 456 ..."


def test_typo_edits_are_the_four_kinds_and_keep_case():
    # "Q" alone: no next letter to swap with, so a neighbour (W, A, S), a deletion, or an inserted capital.
    outcomes = {perturb("Q", "typo", 1.0, random.Random(seed), []) for seed in range(60)}
    assert "" in outcomes
    assert outcomes & {"W", "A", "S"}
    inserted = {o for o in outcomes if len(o) == 2}
    assert inserted and all(o[0] == "Q" and o[1].isupper() for o in inserted)
    assert outcomes <= {"", "W", "A", "S"} | inserted
    swapped = {perturb("ab", "typo", 0.5, random.Random(seed), []) for seed in range(60)}
    assert "ba" in swapped


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_chinese_noise_touches_about_rate_of_the_han_characters_only(rate):
    text = CHINESE + " Budget 2024 approved."
    edits = round(rate * len(HAN.findall(text)))
    noisy = perturb(text, "chinese", rate, random.Random(5), [])
    assert edits / 2 <= levenshtein(text, noisy) <= 2 * edits
    assert HAN.sub("", noisy) == HAN.sub("", text)  # punctuation, Latin text and digits unchanged


def test_chinese_noise_leaves_text_without_han_characters_unchanged():
    assert perturb(ENGLISH, "chinese", 0.5, random.Random(0), []) == ENGLISH
    assert perturb("好", "chinese", 1.0, random.Random(1), []) != "好"  # a single character: the pool


@pytest.mark.parametrize("text", [ENGLISH, CHINESE])
def test_punctuation_noise_changes_about_rate_of_the_marks_only(text):
    marks = len(MARK.findall(text))
    edits = round(0.3 * marks)
    noisy = perturb(text, "punctuation", 0.3, random.Random(2), [])
    assert edits / 2 <= levenshtein(text, noisy) <= edits  # drop, replace, width: one edit each
    assert MARK.sub("", noisy) == MARK.sub("", text)


def test_punctuation_switches_width_both_ways():
    outcomes = {perturb("a, b", "punctuation", 1.0, random.Random(s), []) for s in range(40)}
    assert "a， b" in outcomes and "a b" in outcomes
    back = {perturb("好。", "punctuation", 1.0, random.Random(s), []) for s in range(40)}
    assert "好." in back


def test_punctuation_adds_stray_marks_to_text_with_few_marks():
    text = " ".join(["word"] * 40)  # no marks at all: 0.1 x 40 words = 4 stray marks
    noisy = perturb(text, "punctuation", 0.1, random.Random(0), [])
    assert len(noisy) == len(text) + 4
    assert MARK.sub("", noisy) == text
    assert all(m in ",.!?:;" for m in MARK.findall(noisy))


def test_casing_flips_about_rate_of_the_letters():
    text = ENGLISH.lower()
    letters = len(LETTER.findall(text))
    flips = round(0.1 * letters)
    for seed in range(10):
        noisy = perturb(text, "casing", 0.1, random.Random(seed), [])
        assert noisy.lower() == text
        differing = sum(a != b for a, b in zip(text, noisy, strict=True))
        # Either only the flips, or the whole text raised (probability 0.1 x 0.5) and the flips lowered.
        assert differing in (flips, letters - flips)


def test_distractors_insert_about_rate_of_the_sentences_from_the_pool():
    sentences = [f"Sentence number {i} is here." for i in range(10)]
    text = " ".join(sentences)
    pool = ["The weather was mild.", "Cats sleep a lot", "Rivers run to the sea."]
    noisy = perturb(text, "distractor", 0.2, random.Random(4), pool)
    inserted = [p.rstrip(".") + "." for p in pool if p.rstrip(".") in noisy]
    assert len(inserted) == 2  # max(1, round(0.2 x 10)), drawn without repetition
    assert "Cats sleep a lot." in noisy or "Cats sleep a lot" not in noisy  # a full stop was added
    kept = noisy
    for sentence in inserted:
        kept = kept.replace(sentence, "")
    assert " ".join(kept.split()) == text
    assert len(sentence_boundaries(noisy)) - 1 == 12


def test_distractors_in_chinese_text_add_no_spaces():
    noisy = perturb(CHINESE, "distractor", 0.1, random.Random(0), ["猫喜欢睡觉"])
    assert noisy.count("猫喜欢睡觉。") == 1
    assert noisy.replace("猫喜欢睡觉。", "") == CHINESE
    assert perturb(CHINESE, "distractor", 0.1, random.Random(0), []) == CHINESE


def test_sentence_boundaries_and_first_sentences_are_chinese_aware():
    assert sentence_boundaries("你好。再见！") == [0, 3, 6]
    assert sentence_boundaries("Pi is 3.14 today. Yes") == [0, 18, 21]
    assert distractor_sentences(["今天很好。明天下雨。", "One. Two.", "", "no stop"]) == [
        "今天很好。",
        "One.",
        "",
        "no stop",
    ]


@pytest.mark.parametrize("kind", ["typo", "chinese", "punctuation", "casing", "distractor"])
def test_noise_is_deterministic_per_seed(kind):
    text = ENGLISH + CHINESE
    pool = ["An unrelated remark.", "另一句话。", "A third one."]
    first = perturb(text, kind, 0.1, random.Random(7), pool)
    assert first == perturb(text, kind, 0.1, random.Random(7), pool)
    assert first != text
    others = {perturb(text, kind, 0.1, random.Random(seed), pool) for seed in range(8, 12)}
    assert others - {first}


def test_unknown_kind_and_bad_rate_raise():
    with pytest.raises(ValueError, match="unknown perturbation 'shout'"):
        perturb("x", "shout", 0.1, random.Random(0), [])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        perturb("x", "typo", 0.0, random.Random(0), [])


def test_perturb_conversation_changes_only_the_question_turn():
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "First question about budgets?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question about travel costs?"},
        {"role": "assistant", "content": "Second answer."},
    ]
    original = [dict(m) for m in messages]
    noisy = perturb_conversation(messages, "typo", 0.2, random.Random(0), [])
    assert messages == original  # the input is not modified
    assert noisy[:3] == original[:3] and noisy[4] == original[4]
    assert noisy[3]["role"] == "user" and noisy[3]["content"] != original[3]["content"]
    # A prompt still waiting for its answer (no assistant turn): its last user turn.
    waiting = [messages[0], messages[3]]
    assert perturb_conversation(waiting, "typo", 0.2, random.Random(0), []) == [messages[0], noisy[3]]


def test_perturb_conversation_changes_the_question_of_the_last_answer_not_a_trailing_user_turn():
    # A log that ends with the user after the last answer: the prompt (last_exchange, prompt_text) stops at
    # that answer, so the noise must go on the question it answers, never on the dropped trailing turn.
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "First question about budgets?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question about travel costs?"},
        {"role": "assistant", "content": "Second answer."},
        {"role": "user", "content": "Thanks, and one more thing about the library fund?"},
    ]
    noisy = perturb_conversation(messages, "typo", 0.2, random.Random(0), [])
    context, question, answer = last_exchange(noisy)
    clean_context, clean_question, clean_answer = last_exchange(messages)
    assert question != clean_question and noisy[3]["content"] == question
    assert [m for i, m in enumerate(noisy) if i != 3] == [m for i, m in enumerate(messages) if i != 3]
    assert context[:3] == clean_context[:3] and answer == clean_answer
    # No user turn before the last answer: nothing the prompt shows is perturbed.
    orphan = [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "A reply."}]
    assert perturb_conversation(orphan, "typo", 0.5, random.Random(0), []) == orphan


# ---------------------------------------------------------------------------------------------------------
# measure_robustness


def conversation(prompt: str, system: str = "Be brief.") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def sentences_of(conv: list[dict[str, str]]) -> int:
    return len(sentence_boundaries(conv[-1]["content"])) - 1


def test_runner_drop_and_score_equal_a_hand_computation():
    convs = [conversation(f"First point {i}. Second point {i}.") for i in range(5)]
    pool = [f"Unrelated remark {i}." for i in range(5)]
    calls: list[int] = []

    def score(batch):
        calls.append(len(batch))
        inverse = sum(1 / sentences_of(c) for c in batch) / len(batch)
        return {"inverse": inverse, "sentences": sum(map(sentences_of, batch)) / len(batch)}

    cfg = RobustnessConfig(noise_rates=[1.0, 0.5], perturbations=["chinese", "distractor"], max_samples=3)
    result = measure_robustness(score, convs, None, cfg, 0, "inverse", True, pool)
    # Clean: two sentences each -> 1/2. Rate 0.5: one distractor -> 1/3; rate 1: two -> 1/4.
    assert calls == [3, 3, 3]  # clean measured here on the same first 3, then one call per rate
    assert result["n"] == 3 and result["rates"] == [0.5, 1.0]
    assert result["clean"]["inverse"] == pytest.approx(0.5)
    assert result["curves"]["distractor"]["0.5"]["inverse"] == pytest.approx(1 / 3)
    assert result["drop"]["distractor"] == pytest.approx({"0.5": 1 / 6, "1.0": 1 / 4}, abs=1e-6)
    assert result["relative_drop"]["distractor"] == pytest.approx({"0.5": 1 / 3, "1.0": 1 / 2}, abs=1e-6)
    assert result["changed_share"]["distractor"] == {"0.5": 1.0, "1.0": 1.0}
    assert result["score"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-6)
    assert result["skipped"] == {"chinese": "no test prompt has Han characters"}
    assert "chinese" not in result["curves"]
    assert [e["kind"] for e in result["examples"]] == ["distractor"]
    example = result["examples"][0]  # the middle rate of [0.5, 1.0]
    assert example["rate"] == 1.0 and example["clean"] == "First point 0. Second point 0."
    assert sentences_of(conversation(example["noisy"])) == 4

    # Lower is better: mean sentences 2 -> 3 and 4: drops +1 and +2, score mean(2/3, 2/4).
    lower = measure_robustness(score, convs, score(convs[:3]), cfg, 0, "sentences", False, pool)
    assert lower["drop"]["distractor"] == pytest.approx({"0.5": 1.0, "1.0": 2.0})
    assert lower["relative_drop"]["distractor"] == pytest.approx({"0.5": 0.5, "1.0": 1.0})
    assert lower["score"] == pytest.approx(7 / 12, abs=1e-6)


def test_runner_keeps_the_system_prompt_and_reports_the_changed_share():
    # Typos always break the one-word prompt "keyword" (its neighbouring letters all differ); a prompt
    # without letters is never changed, so the two examples whose keyword is in the system prompt keep it.
    convs = [conversation("keyword"), conversation("keyword")]
    convs += [conversation("12345", system="keyword"), conversation("67890", system="keyword")]

    def score(batch):
        return {"kw": sum(any("keyword" in m["content"] for m in c) for c in batch) / len(batch)}

    cfg = RobustnessConfig(noise_rates=[0.1], perturbations=["typo"], max_samples=None)
    result = measure_robustness(score, convs, {"kw": 1.0}, cfg, 42, "kw", True, [])
    assert result["n"] == 4
    assert result["curves"]["typo"]["0.1"]["kw"] == 0.5
    assert result["changed_share"]["typo"]["0.1"] == 0.5
    assert result["drop"]["typo"]["0.1"] == 0.5
    assert result["relative_drop"]["typo"]["0.1"] == 0.5
    assert result["score"] == 0.5
    assert result["examples"] == [
        {"kind": "typo", "rate": 0.1, "clean": "keyword", "noisy": result["examples"][0]["noisy"]}
    ]
    again = measure_robustness(score, convs, {"kw": 1.0}, cfg, 42, "kw", True, [])
    assert again == result  # seeded


def test_runner_never_inserts_an_examples_own_reference():
    convs = [conversation(f"Question {i} here. Please answer.") for i in range(3)]
    own = ["Alpha is first.", "Beta is second.", "Gamma is third."]
    seen: list[list[str]] = []

    def score(batch):
        seen.append([c[-1]["content"] for c in batch])
        return {"m": 1.0}

    cfg = RobustnessConfig(noise_rates=[1.0], perturbations=["distractor"], max_samples=None)
    result = measure_robustness(score, convs, {"m": 1.0}, cfg, 0, "m", True, own)
    noisy = seen[-1]
    for i, prompt in enumerate(noisy):
        assert own[i] not in prompt
        assert any(o in prompt for j, o in enumerate(own) if j != i)
    assert result["score"] == 1.0 and result["drop"]["distractor"]["1.0"] == 0.0


def test_runner_skips_every_kind_without_a_user_prompt_and_scores_none():
    docs = [[{"role": "assistant", "content": "Just a document."}]] * 2
    cfg = RobustnessConfig(noise_rates=[0.1], perturbations=["typo", "distractor"])
    result = measure_robustness(lambda b: {"m": 0.3}, docs, None, cfg, 0, "m", True, ["Other."])
    assert result["skipped"] == {
        "typo": "no test example has a user prompt",
        "distractor": "no test example has a user prompt",
    }
    assert result["score"] is None and result["curves"] == {} and result["examples"] == []


def test_runner_counts_only_a_changed_question_not_a_trailing_user_turn():
    # The questions of the first two have letters, the third's has none; every trailing user turn (after
    # the last answer, left out of the prompt) has letters. Typos change two questions of three.
    def answered(question: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "An answer."},
            {"role": "user", "content": "thanks a lot"},
        ]

    convs = [answered("keyword"), answered("keyword"), answered("12345")]
    seen: list[list[tuple[str, str]]] = []

    def score(batch):
        seen.append([(last_exchange(c)[1], c[-1]["content"]) for c in batch])
        return {"kw": sum(last_exchange(c)[1] == "keyword" for c in batch) / len(batch)}

    cfg = RobustnessConfig(noise_rates=[0.1], perturbations=["typo"], max_samples=None)
    result = measure_robustness(score, convs, None, cfg, 0, "kw", True, [])
    assert result["changed_share"]["typo"]["0.1"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["curves"]["typo"]["0.1"]["kw"] == 0.0
    assert result["score"] == 0.0
    questions, trailing = zip(*seen[-1], strict=True)
    assert questions[2] == "12345" and all(q != "keyword" for q in questions[:2])
    assert trailing == ("thanks a lot",) * 3  # the turn the prompt drops is left as it is
    assert result["examples"][0]["clean"] == "keyword"

    # Only letterless questions: typos change no prompt, however many letters the trailing turns have.
    letterless = [answered("12345"), answered("67890")]
    skipped = measure_robustness(score, letterless, None, cfg, 0, "kw", True, [])
    assert skipped["skipped"] == {"typo": "no test prompt has Latin letters"}
    assert skipped["score"] is None and skipped["curves"] == {}


def test_runner_leaves_an_undefined_ratio_out_of_the_score():
    # Clean exact match 0 (an untuned base): noisy / clean is undefined, so there is no score, not 1.0.
    convs = [conversation("Some text here.")]
    cfg = RobustnessConfig(noise_rates=[0.2, 0.5], perturbations=["casing"])
    result = measure_robustness(lambda b: {"m": 0.0}, convs, None, cfg, 0, "m", True, [])
    assert result["score"] is None
    assert result["reason"] == "clean m is 0 on these prompts: the drop under noise is undefined"
    assert result["drop"]["casing"] == {"0.2": 0.0, "0.5": 0.0}  # the curve is still reported
    assert result["relative_drop"]["casing"] == {"0.2": None, "0.5": None}
    assert result["changed_share"]["casing"] == {"0.2": 1.0, "0.5": 1.0}

    # Lower is better (clean / noisy): a noisy value of 0 or None leaves that rate out; the rest is scored.
    noisy = iter([0.0, 4.0])  # one call per rate, in rate order (clean is given)
    scored = measure_robustness(lambda b: {"ppl": next(noisy)}, convs, {"ppl": 2.0}, cfg, 0, "ppl", False, [])
    assert scored["curves"]["casing"] == {"0.2": {"ppl": 0.0}, "0.5": {"ppl": 4.0}}
    assert scored["score"] == pytest.approx(0.5) and "reason" not in scored  # 2 / 4 alone
    missing = measure_robustness(lambda b: {"ppl": None}, convs, {"ppl": 2.0}, cfg, 0, "ppl", False, [])
    assert missing["score"] is None
    assert missing["reason"] == "noisy ppl is missing: the drop under noise is undefined"
    assert missing["drop"]["casing"] == {"0.2": None, "0.5": None}
    zero = measure_robustness(lambda b: {"ppl": 0.0}, convs, {"ppl": 2.0}, cfg, 0, "ppl", False, [])
    assert zero["score"] is None
    assert zero["reason"] == "noisy ppl is 0 on these prompts: clean / noisy is undefined"


def test_runner_names_a_missing_metric_and_leaves_an_all_skipped_reason_to_skipped():
    convs = [conversation("Some text here.")]
    cfg = RobustnessConfig(noise_rates=[0.2], perturbations=["chinese"])
    result = measure_robustness(lambda b: {"m": 0.5}, convs, None, cfg, 0, "m", True, [])
    assert result["score"] is None and "reason" not in result
    assert result["skipped"] == {"chinese": "no test prompt has Han characters"}
    with pytest.raises(ValueError, match="rouge_l"):
        measure_robustness(lambda b: {"m": 0.0}, convs, None, cfg, 0, "rouge_l", True, [])
