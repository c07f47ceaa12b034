"""Reference metrics of generated answers, each kept as per-example sufficient statistics.

Every metric returns an `ExampleStats` (see `stats.py`), so the value over any subset of the examples,
per group, or in a bootstrap resample is a reduce of summed rows, without scoring text again:

- exact_match, token_f1: SQuAD's answer normalisation (NFKC, lower case, no punctuation, ASCII or CJK,
  no English articles, single spaces) and SQuAD's token F1; Han text counts one token per character (or
  jieba word). Exact match compares the character tokens, so spaces between Han characters do not count.
- rouge_1, rouge_2, rouge_l: `rouge-score`'s F-measure with its own tokenisation (lower case, Porter
  stemming) for Latin text and one token per CJK character or jieba word, since rouge-score's tokenizer
  drops every non-ASCII character and would score Chinese answers 0.
- bleu, chrf: sacrebleu's segment statistics (n-gram matches and totals, lengths; character n-gram
  counts), and a vectorised numpy reduce that repeats sacrebleu's corpus formula (BLEU's 'exp' smoothing
  and brevity penalty; chrF's averaged precision and recall, beta 2) over `(..., k)`; sacrebleu computes
  one corpus score at a time from a Python list, which a bootstrap of 1000 resamples cannot afford.
  BLEU tokenises each example with sacrebleu's '13a', or 'zh' when it holds Han characters (jieba words
  and '13a' with `chinese="jieba"`).

The normalisation, the per-example statistics and their reduces are ours: no library keeps these metrics
in a form that can be summed over examples and reduced again.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np

from seektune.evaluate.stats import ExampleStats, mean_stats

REFERENCE_METRICS = ("exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf")
ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}
BLEU_ORDER = 4
CHRF_CHAR_ORDER, CHRF_BETA = 6, 2


# ---------------------------------------------------------------------------------------------------------
# Normalisation and tokenisation of answers

# CJK ideographs, kana and hangul: scored one character per token, as Chinese ROUGE usually is.
CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_RUN = re.compile(f"([{CJK_CLASS}]+)")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _check_chinese(chinese: str) -> None:
    if chinese not in ("char", "jieba"):
        raise ValueError(f"chinese must be 'char' or 'jieba', got {chinese!r}")


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at DEBUG to stderr
    return jieba


def _cjk_tokens(run: str, chinese: str) -> list[str]:
    """Tokens of a run of CJK characters: each character, or jieba's words."""
    if chinese == "jieba":
        return [word for word in _jieba().lcut(run) if word.strip()]
    return list(run)


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str, drop_articles: bool = True) -> str:
    """SQuAD's answer normalisation, extended to Unicode: NFKC, lower case, punctuation (ASCII and CJK)
    removed, English articles a/an/the dropped, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(char for char in text if not _is_punctuation(char))
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str, chinese: str = "char") -> list[str]:
    """Tokens of a normalised answer: its words, with CJK runs split into characters or jieba words."""
    tokens: list[str] = []
    for word in text.split():
        for piece in _CJK_RUN.split(word):
            if _CJK_RUN.fullmatch(piece):
                tokens.extend(_cjk_tokens(piece, chinese))
            elif piece:
                tokens.append(piece)
    return tokens


class _MixedTokenizer:
    """rouge-score's own tokenizer (lower case, Porter stemming) for Latin text; CJK characters one token
    each, or jieba words.

    rouge-score's default tokenizer drops every non-ASCII character, which would score Chinese answers 0.
    """

    def __init__(self, chinese: str = "char") -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        _check_chinese(chinese)
        self._latin = DefaultTokenizer(use_stemmer=True)
        self._chinese = chinese

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for piece in _CJK_RUN.split(text):
            if _CJK_RUN.fullmatch(piece):
                tokens.extend(_cjk_tokens(piece, self._chinese))
            elif piece:
                tokens.extend(self._latin.tokenize(piece))
        return tokens


# ---------------------------------------------------------------------------------------------------------
# Text metrics against references


def text_metric_stats(
    metric: str, predictions: list[str], references: list[str], chinese: str = "char"
) -> ExampleStats:
    """Per-example statistics of a reference metric (exact_match, token_f1, rouge_1, rouge_2, rouge_l,
    bleu, chrf) of `predictions` against `references`; Han text split by character or by jieba word."""
    _check_chinese(chinese)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "exact_match":
        return mean_stats(metric, [_exact_match(p, r) for p, r in zip(predictions, references, strict=True)])
    if metric == "token_f1":
        scores = [_token_f1(p, r, chinese) for p, r in zip(predictions, references, strict=True)]
        return mean_stats(metric, scores)
    if metric in ROUGE_TYPES:
        return rouge_stats([metric], predictions, references, chinese)[metric]
    if metric == "bleu":
        return ExampleStats(metric, _bleu_segment_stats(predictions, references, chinese), bleu_reduce, True)
    if metric == "chrf":
        return ExampleStats(metric, _chrf_segment_stats(predictions, references), chrf_reduce, True)
    raise ValueError(f"unknown reference metric {metric!r}: one of {', '.join(REFERENCE_METRICS)}")


def _exact_match(prediction: str, reference: str) -> float:
    tokens = answer_tokens(normalize_answer(prediction)), answer_tokens(normalize_answer(reference))
    return float(tokens[0] == tokens[1])


def _token_f1(prediction: str, reference: str, chinese: str) -> float:
    """SQuAD token F1 (an empty answer scores 1 against an empty reference, else 0)."""
    predicted = answer_tokens(normalize_answer(prediction), chinese)
    gold = answer_tokens(normalize_answer(reference), chinese)
    if not predicted or not gold:
        return float(predicted == gold)
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_stats(
    metrics: list[str], predictions: list[str], references: list[str], chinese: str = "char"
) -> dict[str, ExampleStats]:
    """ROUGE F-measures (rouge_1, rouge_2, rouge_l) per example, all scored in one pass."""
    from rouge_score import rouge_scorer

    types = [ROUGE_TYPES[m] for m in metrics]
    scorer = rouge_scorer.RougeScorer(types, tokenizer=_MixedTokenizer(chinese))
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {m: mean_stats(m, [s[ROUGE_TYPES[m]].fmeasure for s in scores]) for m in metrics}


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score; stemmed English words, single CJK characters)."""
    return text_metric_stats("rouge_l", predictions, references).value()


@lru_cache(maxsize=4)
def _bleu(tokenize: str, force: bool) -> Any:
    from sacrebleu.metrics.bleu import BLEU

    return BLEU(tokenize=tokenize, force=force)


def _jieba_words(text: str) -> str:
    """Text with its Han parts segmented by jieba (words separated by single spaces)."""
    if not _HAN.search(text):
        return text
    return " ".join(word for word in _jieba().lcut(text) if word.strip())


def _bleu_segment_stats(predictions: list[str], references: list[str], chinese: str) -> np.ndarray:
    """(n, 2 + 2 * 4): sacrebleu's BLEU statistics per example: hypothesis and reference length, matching
    n-grams of order 1..4, hypothesis n-grams of order 1..4.

    Each example is tokenised on its own: '13a', or 'zh' when it holds Han characters (jieba mode: Han text
    segmented into words first, then '13a').
    """
    stats = np.zeros((len(predictions), 2 + 2 * BLEU_ORDER))
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(zip(predictions, references, strict=True)):
        tokenize = "zh" if chinese == "char" and any(_HAN.search(text) for text in pair) else "13a"
        groups.setdefault(tokenize, []).append(i)
    for tokenize, indices in groups.items():
        hyps, refs = [predictions[i] for i in indices], [references[i] for i in indices]
        if chinese == "jieba":
            hyps, refs = [_jieba_words(h) for h in hyps], [_jieba_words(r) for r in refs]
        segments = _bleu(tokenize, chinese == "jieba")._extract_corpus_statistics(hyps, [refs])
        stats[indices] = np.asarray(segments, dtype=float)
    return stats


def bleu_reduce(total: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus BLEU (4-grams, 'exp' smoothing, brevity penalty) / 100 of summed statistics.

    Over `(..., 10)`: `[hyp_len, ref_len, correct_1..4, total_1..4]`. Like `BLEU.compute_bleu`: 0 without
    any matching n-gram or when some order has no hypothesis n-gram; the k-th order without a match (in
    order of n) counts as 1 / (2^k * total).
    """
    total = np.asarray(total, dtype=float)
    sys_len, ref_len = total[..., 0], total[..., 1]
    correct, counts = total[..., 2 : 2 + BLEU_ORDER], total[..., 2 + BLEU_ORDER : 2 + 2 * BLEU_ORDER]
    zero = correct == 0
    safe_counts = np.where(counts > 0, counts, 1.0)
    smoothing = 2.0 ** np.cumsum(zero, axis=-1)
    precisions = np.where(zero, 100.0 / (smoothing * safe_counts), 100.0 * correct / safe_counts)
    safe_sys = np.where(sys_len > 0, sys_len, 1.0)
    brevity = np.where(sys_len < ref_len, np.exp(1.0 - ref_len / safe_sys), 1.0)
    score = brevity * np.exp(np.log(precisions).sum(axis=-1) / BLEU_ORDER)
    defined = (counts > 0).all(axis=-1) & ~zero.all(axis=-1) & (sys_len > 0)
    return np.where(defined, score, 0.0) / 100.0


def _chrf_segment_stats(predictions: list[str], references: list[str]) -> np.ndarray:
    """(n, 3 * 6): sacrebleu's chrF statistics per example, `(hyp, ref, match)` per character order."""
    from sacrebleu.metrics.chrf import CHRF

    chrf = CHRF(char_order=CHRF_CHAR_ORDER, word_order=0, beta=CHRF_BETA)
    segments = chrf._extract_corpus_statistics(predictions, [references]) if predictions else []
    return np.asarray(segments, dtype=float).reshape(len(predictions), 3 * CHRF_CHAR_ORDER)


def chrf_reduce(total: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus chrF (character 6-grams, beta 2) / 100 of summed statistics, over `(..., 18)`.

    Like `CHRF._compute_f_score`: precision and recall averaged over the orders that both hypothesis and
    reference have, then F-beta of the averages.
    """
    total = np.asarray(total, dtype=float)
    orders = total.reshape(*total.shape[:-1], -1, 3)
    hyp, ref, match = orders[..., 0], orders[..., 1], orders[..., 2]
    effective = (hyp > 0) & (ref > 0)
    n_effective = effective.sum(axis=-1)
    precision = np.where(effective, match / np.where(hyp > 0, hyp, 1.0), 0.0).sum(axis=-1)
    recall = np.where(effective, match / np.where(ref > 0, ref, 1.0), 0.0).sum(axis=-1)
    precision = precision / np.maximum(n_effective, 1)
    recall = recall / np.maximum(n_effective, 1)
    factor = CHRF_BETA**2
    denominator = factor * precision + recall
    score = (1 + factor) * precision * recall / np.where(denominator > 0, denominator, 1.0)
    return np.where(precision + recall > 0, score, 0.0)
