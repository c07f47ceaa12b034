"""Robustness: the task metrics again on noisy prompts, reported as the drop from the clean input.

Noise goes on the prompt only: the question of each conversation, the user message that
`seektune.data.encode.last_exchange` pairs with the last answer (the system prompt, earlier turns and any
user turns after the last answer, which the rendered prompt leaves out, stay as they are; a conversation
without an answer has its last user message perturbed). Five kinds, each measured on its own at every rate
of `eval.robustness`:

- typo: about `rate` of the Latin letters get one edit each: swap with the next letter, deletion,
  insertion of a random letter, or a QWERTY keyboard neighbour (case kept);
- chinese: about `rate` of the Han characters: deletion, duplication, swap with the next Han character,
  or a Han character from the same text (a small pool of common characters when it has only one);
- punctuation: about `rate` of the marks (ASCII and CJK) dropped, replaced by another mark or switched
  between half and full width (, <-> ，); a text with fewer than one mark per ten words (a Han character
  counts as half a word) also gets about `rate` x words stray marks at word ends;
- casing: about `rate` of the cased letters flipped, and with probability `rate` the whole text lowered or
  raised first;
- distractor: about max(1, round(rate x sentences)) irrelevant sentences (first sentences of OTHER test
  examples' reference answers) inserted at sentence boundaries (. ! ? and 。！？ end a sentence).

The noise is seeded per example (`random.Random(seed + index)`), so a rerun perturbs identically.
The score compares noisy with clean as a ratio; a (kind, rate) where that ratio is undefined (clean metric 0,
or noisy 0 for a lower-is-better metric) is left out of it, and with nothing left the score is None with a
reason, never a made-up number.
Our own code, with the standard library only: nlpaug and TextAttack do character noise, but they are heavy,
pull in models and corpora (WordNet, embeddings) for the word-level attacks, and know neither Chinese
character noise nor full-width punctuation.
"""

from __future__ import annotations

import logging
import math
import random
import re
import string
from collections.abc import Callable
from statistics import fmean
from typing import Any

from seektune.config import PERTURBATIONS, RobustnessConfig

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[A-Za-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A sentence ends at . ! ? followed by white space, or at 。！？ (Chinese puts no space after them);
# closing quotes and brackets stay with the sentence they close.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+|[。！？]+[”’」』）)]*\s*")

_KEYBOARD = {
    "q": "was", "w": "qeasd", "e": "wrsdf", "r": "etdfg", "t": "ryfgh", "y": "tughj", "u": "yihjk",
    "i": "uojkl", "o": "ipkl", "p": "ol", "a": "qwszx", "s": "qweadzxc", "d": "wersfxcv",
    "f": "ertdgcvb", "g": "rtyfhvbn", "h": "tyugjbnm", "j": "yuihknm", "k": "uiojlm", "l": "iopk",
    "z": "asx", "x": "zsdca", "c": "xdfvs", "v": "cfgbd", "b": "vghnf", "n": "bhjmg", "m": "njkh",
}  # fmt: skip
_COMMON_HAN = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"

_ASCII_MARKS = ",.!?:;'\"()-"
_CJK_MARKS = "，。！？：；、“”‘’（）《》「」…—"
_MARKS = frozenset(_ASCII_MARKS + _CJK_MARKS)
_SENTENCE_MARKS = {"ascii": ",.!?:;", "cjk": "，。！？：；、"}
_WIDTH = {",": "，", ".": "。", "?": "？", "!": "！", ":": "：", ";": "；"}
_WIDTH.update({full: half for half, full in list(_WIDTH.items())})

_SKIP_REASONS = {
    "typo": "no test prompt has Latin letters",
    "chinese": "no test prompt has Han characters",
    "punctuation": "no test prompt has punctuation marks or words",
    "casing": "no test prompt has cased letters",
    "distractor": "no distractor sentences: needs reference answers of other test examples",
}


def _share(count: int, rate: float) -> int:
    """About `rate` of `count` items, at least one when there are any."""
    return max(1, round(rate * count)) if count else 0


# ---------------------------------------------------------------------------------------------------------
# One text


def perturb(text: str, kind: str, rate: float, rng: random.Random, distractors: list[str]) -> str:
    """`text` with noise of `kind` at `rate` (see the module docstring); `distractors` only for distractor."""
    if not 0 < rate <= 1:
        raise ValueError(f"noise rate must lie in (0, 1], got {rate}")
    if kind == "typo":
        return _typos(text, rate, rng)
    if kind == "chinese":
        return _chinese_noise(text, rate, rng)
    if kind == "punctuation":
        return _punctuation_noise(text, rate, rng)
    if kind == "casing":
        return _casing_noise(text, rate, rng)
    if kind == "distractor":
        return _insert_distractors(text, rate, rng, distractors)
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")


def _typos(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if _LATIN.fullmatch(c)]
    for i in sorted(rng.sample(positions, _share(len(positions), rate)), reverse=True):
        _typo_at(chars, i, rng.choice(("swap", "delete", "insert", "neighbour")), rng)
    return "".join(chars)


def _typo_at(chars: list[str], i: int, edit: str, rng: random.Random) -> None:
    """One edit of the letter at `i`, in place; edits right of `i` were made already (no index shift)."""
    letter = chars[i]
    following = chars[i + 1] if i + 1 < len(chars) else ""
    if edit == "swap" and _LATIN.fullmatch(following) and following != letter:
        chars[i], chars[i + 1] = following, letter
    elif edit == "delete":
        del chars[i]
    elif edit == "insert":
        new = rng.choice(string.ascii_lowercase)
        chars.insert(i + 1, new.upper() if letter.isupper() else new)
    else:  # a keyboard neighbour (also when a swap would change nothing)
        new = rng.choice(_KEYBOARD[letter.lower()])
        chars[i] = new.upper() if letter.isupper() else new


def _chinese_noise(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if _HAN.fullmatch(c)]
    distinct = sorted(set(chars[i] for i in positions))
    for i in sorted(rng.sample(positions, _share(len(positions), rate)), reverse=True):
        edit = rng.choice(("delete", "duplicate", "swap", "substitute"))
        later = next((j for j in range(i + 1, len(chars)) if _HAN.fullmatch(chars[j])), None)
        if edit == "delete":
            del chars[i]
        elif edit == "duplicate":
            chars.insert(i, chars[i])
        elif edit == "swap" and later is not None and chars[later] != chars[i]:
            chars[i], chars[later] = chars[later], chars[i]
        else:
            others = [c for c in distinct if c != chars[i]] or [c for c in _COMMON_HAN if c != chars[i]]
            chars[i] = rng.choice(others)
    return "".join(chars)


def _punctuation_noise(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c in _MARKS]
    for i in sorted(rng.sample(positions, _share(len(positions), rate)), reverse=True):
        edit = rng.choice(("drop", "replace", "width"))
        mark = chars[i]
        if edit == "drop":
            del chars[i]
        elif edit == "width" and mark in _WIDTH:
            chars[i] = _WIDTH[mark]
        else:
            pool = _SENTENCE_MARKS["cjk" if mark in _CJK_MARKS else "ascii"]
            chars[i] = rng.choice([m for m in pool if m != mark])
    text = "".join(chars)
    ends = [m.end() for m in _WORD.finditer(text)]
    words = _word_count(text)
    if len(positions) * 10 < words:
        text = _stray_marks(text, ends, min(max(1, round(rate * words)), len(ends)), rng)
    return text


def _word_count(text: str) -> float:
    """Latin words and numbers, plus half the Han characters (a Chinese word is about two characters)."""
    han = len(_HAN.findall(text))
    return len(_WORD.findall(text)) - han + han / 2


def _stray_marks(text: str, ends: list[int], count: int, rng: random.Random) -> str:
    """`count` marks inserted at randomly chosen word ends (CJK marks in text with Han characters)."""
    pool = _SENTENCE_MARKS["cjk" if _HAN.search(text) else "ascii"]
    for end in sorted(rng.sample(ends, count), reverse=True):
        text = text[:end] + rng.choice(pool) + text[end:]
    return text


def _casing_noise(text: str, rate: float, rng: random.Random) -> str:
    if rng.random() < rate:
        whole = text.lower() if rng.random() < 0.5 else text.upper()
        text = whole if len(whole) == len(text) else text  # ß -> SS would shift every position
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.swapcase() != c and len(c.swapcase()) == 1]
    for i in rng.sample(positions, _share(len(positions), rate)):
        chars[i] = chars[i].swapcase()
    return "".join(chars)


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where a sentence starts, plus len(text): Chinese-aware (。！？ as well as . ! ? + space)."""
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.end() < len(text)]
    return sorted(set(starts)) + ([len(text)] if text else [])


def _insert_distractors(text: str, rate: float, rng: random.Random, distractors: list[str]) -> str:
    pool = [d.strip() for d in distractors if d.strip()]
    boundaries = sentence_boundaries(text) or [0]
    if not pool or not text.strip():
        return text
    count = _share(max(len(boundaries) - 1, 1), rate)
    picked = rng.sample(pool, count) if len(pool) >= count else [rng.choice(pool) for _ in range(count)]
    for at, sentence in sorted(zip(rng.sample(boundaries, count), picked, strict=True), reverse=True):
        text = text[:at] + _joined(text[:at], _terminated(sentence), text[at:]) + text[at:]
    return text


def _terminated(sentence: str) -> str:
    if sentence[-1] in ".!?。！？":
        return sentence
    return sentence + ("。" if _HAN.fullmatch(sentence[-1]) else ".")


def _joined(left: str, sentence: str, right: str) -> str:
    """`sentence` with the spaces it needs between `left` and `right` (none next to CJK text)."""

    def needs_space(a: str, b: str) -> bool:
        cjk = _HAN.fullmatch(a) or _HAN.fullmatch(b) or a in _CJK_MARKS or b in _CJK_MARKS
        return not (a.isspace() or b.isspace() or cjk)

    before = " " if left and needs_space(left[-1], sentence[0]) else ""
    after = " " if right and needs_space(sentence[-1], right[0]) else ""
    return before + sentence + after


def distractor_sentences(references: list[str]) -> list[str]:
    """The first sentence of each reference answer ('' for an empty one), aligned with `references`: the
    `distractors` argument of `measure_robustness`."""
    sentences = []
    for reference in references:
        text = reference.strip()
        bounds = sentence_boundaries(text)
        sentences.append(text[: bounds[1]].strip() if len(bounds) > 1 else "")
    return sentences


# ---------------------------------------------------------------------------------------------------------
# Conversations


def _question(messages: Conversation) -> int | None:
    """Index of the question: the last user turn before the last assistant turn, as in `last_exchange`
    (turns after the last answer are not part of the rendered prompt); without an assistant turn, the last
    user turn. None when there is no such turn."""
    answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    end = answers[-1] if answers else len(messages)
    return next((i for i in range(end - 1, -1, -1) if messages[i].get("role") == "user"), None)


def perturb_conversation(
    messages: Conversation, kind: str, rate: float, rng: random.Random, distractors: list[str]
) -> Conversation:
    """A copy of `messages` whose question (see `_question`) carries the noise; every other message
    unchanged."""
    copied = [dict(m) for m in messages]
    index = _question(copied)
    if index is not None:
        copied[index]["content"] = perturb(copied[index]["content"], kind, rate, rng, distractors)
    return copied


def _prompt(messages: Conversation) -> str:
    index = _question(messages)
    return "" if index is None else messages[index]["content"]


def _pool_for(index: int, conversation: Conversation, distractors: list[str], aligned: bool) -> list[str]:
    """Distractors for one example: never its own reference's sentence nor text already in it."""
    own = "\n".join(m.get("content", "") for m in conversation)
    kept = [d.strip() for j, d in enumerate(distractors) if not (aligned and j == index)]
    return [d for d in kept if d and d not in own]


# ---------------------------------------------------------------------------------------------------------
# The runner


def measure_robustness(
    score: Callable[[list[Conversation]], dict[str, float]],
    conversations: list[Conversation],
    clean: dict[str, float] | None,
    cfg: RobustnessConfig,
    seed: int,
    metric: str,
    higher_is_better: bool,
    distractors: list[str],
) -> dict[str, Any]:
    """The metrics of `score` on every (kind, rate) of `cfg`, over the first `cfg.max_samples` conversations.

    score: conversations -> {metric: value}, always called with the first N conversations in order (clean
        or perturbed), so that it can pair them with their references by position.
    clean: the same metrics on the clean first N conversations; None: measured here with score().
    distractors: sentences to insert (see `distractor_sentences`); when there is one per conversation,
        entry i is conversation i's own and never inserted into it.
    Returns {"metric", "n", "rates", "clean", "curves": {kind: {rate: metrics}}, "drop": {kind: {rate:
    clean - noisy}} (noisy - clean when lower is better; positive = worse; None when a value is missing),
    "relative_drop" (drop / clean, None when clean is 0), "skipped": {kind: reason} for a kind that changed
    no prompt, "changed_share" (share of prompts whose question changed), "score" (mean of min(1, noisy /
    clean) over kinds and rates, clean / noisy when lower is better; a (kind, rate) whose denominator is 0 or
    missing is left out), "examples" (one clean/noisy prompt per kind)}, plus "reason" (why) when "score"
    is None although some kind was measured (when every kind was skipped, "skipped" says why); rates are
    keys as strings (JSON).
    """
    n = len(conversations) if cfg.max_samples is None else min(cfg.max_samples, len(conversations))
    subset = conversations[:n]
    clean = score(subset) if clean is None else clean
    if metric not in clean:
        raise ValueError(f"clean metrics lack the primary metric {metric!r}: {sorted(clean)}")
    aligned = len(distractors) == len(conversations)
    pools = [_pool_for(i, conv, distractors, aligned) for i, conv in enumerate(subset)]
    result: dict[str, Any] = {
        "metric": metric, "n": n, "rates": list(cfg.noise_rates), "clean": dict(clean), "curves": {},
        "drop": {}, "relative_drop": {}, "skipped": {}, "changed_share": {}, "score": None, "examples": [],
    }  # fmt: skip
    terms: list[tuple[float | None, str]] = []
    for kind in cfg.perturbations:
        terms += _measure_kind(result, score, subset, kind, seed, pools, higher_is_better)
    ratios = [ratio for ratio, _ in terms if ratio is not None]
    if ratios:
        result["score"] = round(fmean(ratios), 6)
    elif terms:  # measured, but no ratio is defined (with none measured, "skipped" says why)
        result["reason"] = "; ".join(dict.fromkeys(why for _, why in terms))
        logger.info("robustness: no score (%s)", result["reason"])
    if ratios and len(ratios) < len(terms):
        left_out = len(terms) - len(ratios)
        logger.warning("robustness: %d of %d noisy points left out of the score", left_out, len(terms))
    return result


def _measure_kind(
    result: dict[str, Any],
    score: Callable[[list[Conversation]], dict[str, float]],
    subset: list[Conversation],
    kind: str,
    seed: int,
    pools: list[list[str]],
    higher: bool,
) -> list[tuple[float | None, str]]:
    """Fill `result` for one kind at every rate; returns the score's terms (none when skipped), each a
    ratio or None with the reason it is undefined."""
    rates = result["rates"]
    clean_prompts = [_prompt(conv) for conv in subset]
    noisy = {rate: _perturb_all(subset, kind, rate, seed, pools) for rate in rates}
    changed = {
        rate: [_prompt(conv) != prompt for conv, prompt in zip(convs, clean_prompts, strict=True)]
        for rate, convs in noisy.items()
    }
    if not any(any(flags) for flags in changed.values()):
        result["skipped"][kind] = _SKIP_REASONS[kind] if any(clean_prompts) else _NO_PROMPT
        logger.info("robustness: %s skipped (%s)", kind, result["skipped"][kind])
        return []
    terms = []
    for rate, convs in noisy.items():
        terms.append(_record_rate(result, kind, rate, score(convs), higher))
        result["changed_share"].setdefault(kind, {})[str(rate)] = round(fmean(changed[rate]), 6)
    result["examples"].append(_example(kind, rates, subset, noisy, changed))
    return terms


_NO_PROMPT = "no test example has a user prompt"


def _perturb_all(
    subset: list[Conversation], kind: str, rate: float, seed: int, pools: list[list[str]]
) -> list[Conversation]:
    """Every conversation perturbed with its own generator, seeded `seed + index`."""
    return [
        perturb_conversation(conv, kind, rate, random.Random(seed + i), pools[i])
        for i, conv in enumerate(subset)
    ]


def _record_rate(
    result: dict[str, Any], kind: str, rate: float, noisy: dict[str, float], higher: bool
) -> tuple[float | None, str]:
    """Store one point of the curve; returns its term of the score (see `_kept_share`)."""
    key, metric = str(rate), result["metric"]
    clean_value, noisy_value = result["clean"][metric], noisy[metric]
    drop = None
    if _is_value(clean_value) and _is_value(noisy_value):
        drop = clean_value - noisy_value if higher else noisy_value - clean_value
    result["curves"].setdefault(kind, {})[key] = dict(noisy)
    result["drop"].setdefault(kind, {})[key] = None if drop is None else round(drop, 6)
    relative = round(drop / clean_value, 6) if drop is not None and clean_value else None
    result["relative_drop"].setdefault(kind, {})[key] = relative
    logger.info("robustness: %s at %s: %s %s (clean %s)", kind, key, metric, noisy_value, clean_value)
    return _kept_share(clean_value, noisy_value, higher, metric)


def _is_value(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _kept_share(
    clean: float | None, noisy: float | None, higher: bool, metric: str
) -> tuple[float | None, str]:
    """(min(1, noisy / clean), "") when higher is better, min(1, clean / noisy) when lower is; (None, why)
    when the denominator is 0 or a value is missing: the share kept under noise is then undefined."""
    numerator, denominator = (noisy, clean) if higher else (clean, noisy)
    missing = [name for name, value in (("clean", clean), ("noisy", noisy)) if not _is_value(value)]
    if missing:
        return None, f"{' and '.join(missing)} {metric} is missing: the drop under noise is undefined"
    if denominator <= 0 and higher:
        return None, f"clean {metric} is 0 on these prompts: the drop under noise is undefined"
    if denominator <= 0:
        return None, f"noisy {metric} is 0 on these prompts: clean / noisy is undefined"
    return max(0.0, min(1.0, numerator / denominator)), ""


_EXAMPLE_CHARS = 600


def _example(
    kind: str,
    rates: list[float],
    subset: list[Conversation],
    noisy: dict[float, list[Conversation]],
    changed: dict[float, list[bool]],
) -> dict[str, Any]:
    """One clean/noisy prompt pair for the report: the middle rate, the first prompt it changed."""
    rate = rates[len(rates) // 2]
    if not any(changed[rate]):
        rate = next(r for r in rates if any(changed[r]))
    index = changed[rate].index(True)

    def cut(text: str) -> str:
        return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "…"

    return {
        "kind": kind,
        "rate": rate,
        "clean": cut(_prompt(subset[index])),
        "noisy": cut(_prompt(noisy[rate][index])),
    }
