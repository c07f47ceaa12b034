"""Reference metric values checked against hand computation and the reference library (sacrebleu)."""

import numpy as np
import pytest
import sacrebleu

from seektune.evaluate.text_metrics import (
    _jieba_words,
    bleu_reduce,
    normalize_answer,
    rouge_l,
    text_metric_stats,
)


def test_rouge_l_english_uses_stemming():
    # LCS of "the cats sat" / "the cat sat down" after stemming: the, cat, sat -> P=3/3, R=3/4.
    assert rouge_l(["the cats sat"], ["the cat sat down"]) == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_rouge_l_scores_chinese_by_character():
    # 今天天气很好 vs 今天天气不错: LCS 今天天气 = 4 of 6 characters each side.
    assert rouge_l(["今天天气很好"], ["今天天气不错"]) == pytest.approx(4 / 6)
    assert rouge_l(["完全不同"], ["毫无关系"]) == 0.0


def test_rouge_l_mixed_text_and_mean():
    assert rouge_l(["用 json 解析", "x"], ["用 json 解析", "y"]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------
# Exact match and token F1


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalize_answer("An apple a day.") == "apple day"
    assert normalize_answer("你好，世界！「真的」") == "你好世界真的"  # CJK punctuation
    assert normalize_answer("ＡＢＣ１２３") == "abc123"  # full-width forms (NFKC)
    assert normalize_answer("A or B", drop_articles=False) == "a or b"


def test_exact_match_after_normalisation():
    stats = text_metric_stats(
        "exact_match",
        ["The cat sat.", "猫，坐着。", "a dog", "今天 天气"],
        ["cat  sat", "猫坐着", "the cat", "今天天气"],
    )
    assert stats.per_example().tolist() == [1.0, 1.0, 0.0, 1.0]  # spaces between Han characters don't count
    assert stats.value() == pytest.approx(0.75)
    assert stats.value([2]) == 0.0
    assert stats.higher_is_better


def test_token_f1_by_hand():
    # pred tokens cat sat on mat; gold cat on mat today: 3 shared -> P = R = 3/4.
    stats = text_metric_stats("token_f1", ["the cat sat on the mat"], ["a cat on a mat today"])
    assert stats.value() == pytest.approx(0.75)
    # Repeated tokens count once per match: pred cat cat, gold cat -> P 1/2, R 1 -> F 2/3.
    assert text_metric_stats("token_f1", ["cat cat"], ["cat"]).value() == pytest.approx(2 / 3)


def test_token_f1_of_empty_answers():
    stats = text_metric_stats("token_f1", ["", "", "the"], ["", "cat", "a"])  # "the" and "a" normalise to ""
    assert stats.per_example().tolist() == [1.0, 0.0, 1.0]


def test_token_f1_chinese_by_character_and_by_jieba_word():
    # Characters: 4 of 6 shared each side -> 4/6.
    assert text_metric_stats("token_f1", ["今天天气很好"], ["今天天气不错"]).value() == pytest.approx(4 / 6)
    # jieba: 今天天气 / 很 / 好 against 今天天气 / 不错: 1 shared -> P 1/3, R 1/2 -> F 0.4.
    jieba = text_metric_stats("token_f1", ["今天天气很好"], ["今天天气不错"], chinese="jieba")
    assert jieba.value() == pytest.approx(0.4)
    # Mixed: 用 json 解 析 against 用 json 读 取 -> 2 of 4 each side.
    assert text_metric_stats("token_f1", ["用json解析"], ["用 JSON 读取"]).value() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_1_and_2_by_hand():
    pred, ref = ["the cat sat on the mat"], ["the cat lay on the mat"]
    # Unigrams: the x2, cat, on, mat shared of 6 each side; bigrams: the cat, on the, the mat of 5.
    assert text_metric_stats("rouge_1", pred, ref).value() == pytest.approx(5 / 6)
    assert text_metric_stats("rouge_2", pred, ref).value() == pytest.approx(3 / 5)
    assert text_metric_stats("rouge_l", pred, ref).value() == pytest.approx(5 / 6)  # LCS the cat on the mat


def test_rouge_chinese_jieba_words_and_subsets():
    # jieba: 今天天气 / 很 / 好 against 今天天气 / 不错 -> P 1/3, R 1/2 -> F 0.4.
    jieba = text_metric_stats("rouge_1", ["今天天气很好"], ["今天天气不错"], chinese="jieba")
    assert jieba.value() == pytest.approx(0.4)
    stats = text_metric_stats("rouge_1", ["今天天气很好", "a b", "x"], ["今天天气不错", "a b", "y"])
    assert stats.per_example() == pytest.approx([4 / 6, 1.0, 0.0])
    assert stats.value([0, 1]) == pytest.approx((4 / 6 + 1) / 2)


# ---------------------------------------------------------------------------------------------------------
# BLEU and chrF: the reduce over summed statistics equals sacrebleu's corpus score

EN_PRED = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi", "it rains.", ""]
EN_REF = ["the cat is on the mat", "the quick brown fox jumped over", "hello there", "it rains today.", "no"]
ZH_PRED = ["今天天气很好", "我爱北京天安门", "他去了学校。", "完全不同"]
ZH_REF = ["今天天气不错", "我爱天安门", "他去学校了。", "毫无关系的东西"]
SUBSET = [0, 2, 3]


def _sacrebleu(pred, ref, subset=None, tokenize="13a"):
    if subset is not None:
        pred, ref = [pred[i] for i in subset], [ref[i] for i in subset]
    return sacrebleu.corpus_bleu(pred, [ref], tokenize=tokenize).score / 100


@pytest.mark.parametrize(
    ("pred", "ref", "tokenize"),
    [(EN_PRED, EN_REF, "13a"), (ZH_PRED, ZH_REF, "zh"), (EN_PRED[:4] + ZH_PRED, EN_REF[:4] + ZH_REF, "zh")],
    ids=["english", "chinese", "mixed"],
)
def test_bleu_equals_sacrebleu_corpus_bleu(pred, ref, tokenize):
    stats = text_metric_stats("bleu", pred, ref)
    assert stats.value() > 0
    assert stats.value() == pytest.approx(_sacrebleu(pred, ref, tokenize=tokenize), abs=1e-9)
    assert stats.value(SUBSET) == pytest.approx(_sacrebleu(pred, ref, SUBSET, tokenize), abs=1e-9)


def test_bleu_with_jieba_words_equals_sacrebleu_on_segmented_text():
    stats = text_metric_stats("bleu", ZH_PRED, ZH_REF, chinese="jieba")
    segmented = [_jieba_words(t) for t in ZH_PRED], [_jieba_words(t) for t in ZH_REF]
    assert segmented[0][1] == "我 爱 北京 天安门"
    assert stats.value() == pytest.approx(_sacrebleu(*segmented), abs=1e-9)
    assert stats.value(SUBSET) == pytest.approx(_sacrebleu(*segmented, SUBSET), abs=1e-9)
    assert stats.value() != pytest.approx(text_metric_stats("bleu", ZH_PRED, ZH_REF).value())


def test_bleu_edge_cases_match_sacrebleu():
    # No match at all, a hypothesis shorter than 4 tokens (no 4-grams), exact match, empty hypothesis.
    for pred, ref in [(["x y z w"], ["a b c d"]), (["the cat"], ["the cat sat"]), (["a b c d"], ["a b c d"])]:
        assert text_metric_stats("bleu", pred, ref).value() == pytest.approx(_sacrebleu(pred, ref), abs=1e-12)
    assert text_metric_stats("bleu", [""], ["a b"]).value() == 0.0


def test_bleu_reduce_is_vectorised_over_resamples():
    stats = text_metric_stats("bleu", EN_PRED, EN_REF)
    resamples = np.stack([stats.stats[[0, 0, 1]].sum(0), stats.stats[SUBSET].sum(0)])
    values = bleu_reduce(resamples)
    assert values.shape == (2,)
    assert values[1] == pytest.approx(stats.value(SUBSET))
    assert values[0] == pytest.approx(_sacrebleu(EN_PRED, EN_REF, [0, 0, 1]), abs=1e-9)


@pytest.mark.parametrize(("pred", "ref"), [(EN_PRED, EN_REF), (ZH_PRED, ZH_REF)], ids=["english", "chinese"])
def test_chrf_equals_sacrebleu_corpus_chrf(pred, ref):
    stats = text_metric_stats("chrf", pred, ref)
    expected = sacrebleu.corpus_chrf(pred, [ref]).score / 100
    assert stats.value() == pytest.approx(expected, abs=1e-9)
    subset = sacrebleu.corpus_chrf([pred[i] for i in SUBSET], [[ref[i] for i in SUBSET]]).score / 100
    assert stats.value(SUBSET) == pytest.approx(subset, abs=1e-9)
    assert stats.per_example().shape == (len(pred),)


def test_unknown_metric_and_length_mismatch_are_errors():
    with pytest.raises(ValueError, match="unknown reference metric 'meteor'"):
        text_metric_stats("meteor", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_metric_stats("bleu", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="chinese"):
        text_metric_stats("rouge_l", ["a"], ["a"], chinese="pkuseg")
