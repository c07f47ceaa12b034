"""Metric values checked against hand computation."""

import pytest

from seektune.evaluate.metrics import rouge_l


def test_rouge_l_english_uses_stemming():
    # LCS of "the cats sat" / "the cat sat down" after stemming: the, cat, sat -> P=3/3, R=3/4.
    assert rouge_l(["the cats sat"], ["the cat sat down"]) == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_rouge_l_scores_chinese_by_character():
    # 今天天气很好 vs 今天天气不错: LCS 今天天气 = 4 of 6 characters each side.
    assert rouge_l(["今天天气很好"], ["今天天气不错"]) == pytest.approx(4 / 6)
    assert rouge_l(["完全不同"], ["毫无关系"]) == 0.0


def test_rouge_l_mixed_text_and_mean():
    assert rouge_l(["用 json 解析", "x"], ["用 json 解析", "y"]) == pytest.approx(0.5)
