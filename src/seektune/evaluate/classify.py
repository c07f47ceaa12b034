"""Label metrics of predicted labels (accuracy, macro_f1), each kept as per-example sufficient statistics.

accuracy is 0/1 per example, macro_f1 a per-class one-hot `(tp, fp, fn)` whose reduce is the mean F1 over
the classes that occur (scikit-learn's macro F1 over the labels present in gold or predicted). Both are an
`ExampleStats` (see `stats.py`), like the reference metrics of `text_metrics.py`, so the value over any
subset of the examples is a reduce of summed rows.

The predicted label is the choice of highest summed log-likelihood after the prompt (as
lm-evaluation-harness scores a continuation: `choice_predictions`), or the choice the generated answer names
(`label_from_text`). The statistics and their reduce are ours: no library keeps macro F1 in a form that can
be summed over examples and reduced again.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from seektune.errors import UserError
from seektune.evaluate.generate import eval_mode
from seektune.evaluate.stats import ExampleStats, mean_stats
from seektune.evaluate.text_metrics import CJK_CLASS, normalize_answer

LABEL_METRICS = ("accuracy", "macro_f1")
_CJK = re.compile(f"([{CJK_CLASS}])")


def classification_stats(
    metric: str, predicted: list[str | None], gold: list[str], labels: list[str]
) -> ExampleStats:
    """accuracy (0/1 per example) or macro_f1 (per-class one-hot (tp, fp, fn)) of predicted labels.

    A None prediction (no label found) is wrong; for macro-F1 it is a false negative of the gold class.
    The classes are `labels` and any other label that occurs in gold or predicted.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold labels")
    if metric == "accuracy":
        return mean_stats(metric, [float(p == g) for p, g in zip(predicted, gold, strict=True)])
    if metric != "macro_f1":
        raise ValueError(f"unknown classification metric {metric!r}: one of {', '.join(LABEL_METRICS)}")
    extra = sorted({label for label in [*gold, *predicted] if label is not None} - set(labels))
    index = {label: i for i, label in enumerate([*dict.fromkeys(labels), *extra])}
    stats = np.zeros((len(gold), len(index), 3))  # (example, class, [tp, fp, fn])
    for row, (p, g) in enumerate(zip(predicted, gold, strict=True)):
        if p == g:
            stats[row, index[g], 0] = 1
            continue
        stats[row, index[g], 2] = 1
        if p is not None:
            stats[row, index[p], 1] = 1
    return ExampleStats(metric, stats.reshape(len(gold), -1), macro_f1_reduce, higher_is_better=True)


def macro_f1_reduce(total: np.ndarray) -> np.ndarray:
    """Mean over classes of 2tp / (2tp + fp + fn) of summed `(tp, fp, fn)` per class, over `(..., 3C)`;
    classes that occur neither in gold nor in predicted (2tp + fp + fn = 0) are left out."""
    total = np.asarray(total, dtype=float)
    classes = total.reshape(*total.shape[:-1], -1, 3)
    denominator = 2 * classes[..., 0] + classes[..., 1] + classes[..., 2]
    present = denominator > 0
    f1 = np.where(present, 2 * classes[..., 0] / np.where(present, denominator, 1.0), 0.0)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def _is_word_char(char: str) -> bool:
    return char.isalnum() and not _CJK.fullmatch(char)


def _first_position(answer: str, form: str) -> int | None:
    """Where `form` first occurs in `answer`: as a whole word, or anywhere when it holds CJK characters."""
    if _CJK.search(form):
        position = answer.find(form)
        return None if position < 0 else position
    position = answer.find(form)
    while position >= 0:
        end = position + len(form)
        before = position > 0 and _is_word_char(answer[position - 1])
        after = end < len(answer) and _is_word_char(answer[end])
        if not before and not after:
            return position
        position = answer.find(form, position + 1)
    return None


def label_from_text(text: str, choices: list[str]) -> str | None:
    """The choice a generated answer states: the answer itself (normalised), else the choice that appears
    first (as a whole word; CJK anywhere), the longest at the same position; None when none appears."""
    answer = normalize_answer(text, drop_articles=False)
    forms = [(choice, normalize_answer(choice, drop_articles=False)) for choice in choices]
    forms = [(choice, form) for choice, form in forms if form]
    for choice, form in forms:
        if answer == form:
            return choice
    found = []
    for order, (choice, form) in enumerate(forms):
        position = _first_position(answer, form)
        if position is not None:
            found.append((position, -len(form), order, choice))
    return min(found)[3] if found else None


def _continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`: trailing spaces of the context move to the continuation, the
    whole text is tokenised once, and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context_ids:  # harness: an empty context is the prefix token (BOS, else EOS)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def _loglikelihoods(
    model: Any, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int
) -> list[float]:
    """Summed log-probability of each continuation after its context (right-padded batches)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        width = max(len(c) + len(x) for c, x in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (context, continuation) in enumerate(batch):
            ids[i, : len(context) + len(continuation)] = torch.tensor([*context, *continuation])
            mask[i, : len(context) + len(continuation)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (context, continuation) in enumerate(batch):
            # positions len(context)-1 .. end-1 predict the continuation's tokens
            rows = logits[i, len(context) - 1 : len(context) + len(continuation) - 1].float().log_softmax(-1)
            targets = torch.tensor(continuation, device=device).unsqueeze(1)
            scores.append(float(rows.gather(1, targets).double().sum()))
    return scores


def choice_predictions(
    model: Any, tokenizer: Any, prompts: list[str], choices: list[str], batch_size: int
) -> list[str]:
    """For every prompt, the choice whose tokens have the highest summed log-likelihood after it (each
    choice scored as the continuation of `prompt + choice`, as lm-evaluation-harness's loglikelihood)."""
    if not choices:
        raise ValueError("choice_predictions needs at least one choice")
    pairs = [_continuation_ids(tokenizer, prompt, choice) for prompt in prompts for choice in choices]
    empty = [choices[i % len(choices)] for i, (_, continuation) in enumerate(pairs) if not continuation]
    if empty:
        raise UserError(
            f"the choice {empty[0]!r} has no tokens after the prompt, so it cannot be scored: set "
            "eval.choices to labels with text, or eval.classify_by: generate"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with eval_mode(model):
        scores = np.asarray(_loglikelihoods(model, pairs, batch_size, pad_id)).reshape(len(prompts), -1)
    return [choices[int(best)] for best in scores.argmax(axis=1)] if len(prompts) else []
