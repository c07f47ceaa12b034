"""Label metric values checked against hand computation and scikit-learn, and labels read from answers."""

import pytest
from sklearn.metrics import f1_score

from seektune.evaluate.classify import classification_stats, label_from_text

# ---------------------------------------------------------------------------------------------------------
# Classification

GOLD = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neg"]
PRED = ["pos", "pos", None, "pos", "neg", "neg", "neu", "other"]


def _sklearn_macro_f1(pred, gold):
    pred = [p if p is not None else "<none>" for p in pred]
    present = sorted({*gold, *pred} - {"<none>"})
    return f1_score(gold, pred, average="macro", labels=present)


def test_accuracy_counts_missing_predictions_as_wrong():
    stats = classification_stats("accuracy", PRED, GOLD, ["pos", "neg", "neu"])
    assert stats.value() == pytest.approx(4 / 8)
    assert stats.value([2]) == 0.0


def test_macro_f1_equals_sklearn_on_all_and_on_subsets():
    stats = classification_stats("macro_f1", PRED, GOLD, ["pos", "neg", "neu"])
    assert stats.value() == pytest.approx(_sklearn_macro_f1(PRED, GOLD))
    for subset in ([0, 1, 3, 5], [2, 6], [0, 4, 7], [1]):  # some classes absent from a subset
        expected = _sklearn_macro_f1([PRED[i] for i in subset], [GOLD[i] for i in subset])
        assert stats.value(subset) == pytest.approx(expected)


def test_macro_f1_by_hand():
    # pos: tp 1, fp 1 (the neg predicted pos), fn 0 -> 2/3; neg: tp 0, fn 1 -> 0. Mean 1/3.
    stats = classification_stats("macro_f1", ["pos", "pos"], ["pos", "neg"], ["pos", "neg", "unused"])
    assert stats.value() == pytest.approx(1 / 3)  # a class absent from gold and predicted is left out


# ---------------------------------------------------------------------------------------------------------
# Labels read from generated answers


def test_label_from_text():
    choices = ["positive", "negative"]
    assert label_from_text("Positive.", choices) == "positive"
    assert label_from_text("It is negative, not positive", choices) == "negative"  # earliest wins
    assert label_from_text("a nonnegative number", choices) is None  # whole words only
    assert label_from_text("no idea", choices) is None
    assert label_from_text("New York is big", ["new", "new york"]) == "new york"  # longest at a position
    assert label_from_text("这条评论是正面的。", ["正面", "负面"]) == "正面"  # CJK: anywhere
    assert label_from_text("答案是positive。", choices) == "positive"
    assert label_from_text("The answer is B.", ["A", "B"]) == "B"  # articles stay for labels
