"""Tokenisation for training: the model's chat template, which tokens are learnt, truncation.

Conversations are rendered with the tokenizer's chat template exactly as at inference and tokenised once.
`train_on` chooses the learnt tokens: every assistant answer (default), only the last one, or everything.
Each learnt answer keeps the template's end-of-sentence token inside the loss (EOS is appended when a
template leaves it out), so the tuned model learns to stop by itself. Plain documents (continued
pre-training) are learnt whole and cut into windows of `max_length` tokens.

Locating the answers is ours because transformers' `return_assistant_tokens_mask` needs `{% generation %}`
markers that DeepSeek's own chat templates do not have.
"""

from __future__ import annotations

from typing import Any

from seektune.data.formats import has_answer

IGNORE_INDEX = -100


def encode_chat(
    messages: list[dict[str, str]],
    tokenizer: Any,
    max_length: int,
    system_prompt: str | None = None,
    train_on: str = "assistant",
    truncation: str = "drop",
) -> tuple[dict[str, list[int]] | None, str]:
    """Token ids and labels of one conversation (labels -100 outside learnt tokens), and a reason.

    The reason is "" when kept whole, "truncated" when cut to `max_length` (with `truncation='truncate'`),
    else why the example is dropped (the ids are then None).

    The whole conversation is rendered and tokenised once, as at inference. Each assistant answer is the
    text its turn adds after the generation prompt; it is located in the rendering and its tokens (found
    through the tokenizer's offsets) are learnt. Templates that change earlier turns (R1's drops past
    reasoning) or add text after the generation prompt (R1's `<think>`) are handled: a past answer that the
    template rewrote is context only, and the final answer is always learnt.
    """
    if not has_answer(messages):
        return None, "no_answer"
    # Turns after the last answer (a log that ends with the user) teach nothing and must not get an EOS.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = with_system_prompt(messages[: last + 1], system_prompt)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _answer_spans(messages, tokenizer, text)
    if not spans:
        return None, "template_unsupported"
    if train_on == "last_assistant":
        spans = spans[-1:]
    elif train_on == "all":
        spans = [(0, len(text))]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token
        if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    labels[0] = IGNORE_INDEX  # the first token has no context: it is never a target
    if labels[-1] != tokenizer.eos_token_id:  # a template that leaves EOS out: the model must still stop
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(input_ids) > max_length:
        if truncation == "drop":
            return None, "too_long"
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None, "too_long"  # nothing left to learn
        return {"input_ids": input_ids, "labels": labels}, "truncated"
    return {"input_ids": input_ids, "labels": labels}, ""


def _answer_spans(messages: list[dict[str, str]], tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant answers in `text`; empty when the final answer cannot be found."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        shared = next(
            (i for i, (a, b) in enumerate(zip(prompt, turn, strict=False)) if a != b),
            min(len(prompt), len(turn)),
        )
        answer = turn[shared:]  # what this turn adds after the part it shares with the generation prompt
        start = text.find(answer, cursor) if answer else -1
        if start < 0:
            if index == last:
                return []
            continue  # the template rewrote this past answer: it stays context
        spans.append((start, start + len(answer)))
        cursor = start + len(answer)
    return spans


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation with `system_prompt` put first, unless it already opens with a system message."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def last_exchange(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, str]:
    """(conversation before the last answer, the question it answers, the last answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return messages[:last], question, messages[last]["content"]


def prompt_text(messages: list[dict[str, str]], tokenizer: Any, system_prompt: str | None = None) -> str:
    """The conversation up to its last assistant turn, rendered with the generation prompt."""
    context, _, _ = last_exchange(with_system_prompt(messages, system_prompt))
    return _render(tokenizer, context, add_generation_prompt=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_text(text: str, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """A document as windows of at most `max_length` tokens (BOS first, EOS last); all tokens are learnt.

    The first token of each window has no left context, so it is never a target.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids.append(tokenizer.eos_token_id)
    windows = []
    for start in range(0, len(ids), max_length):
        window = ids[start : start + max_length]
        if len(window) < 2:
            break
        windows.append({"input_ids": window, "labels": [IGNORE_INDEX, *window[1:]]})
    return windows


def tokenize_batch(
    batch: dict[str, list],
    indices: list[int] | None,
    tokenizer: Any,
    max_length: int,
    train_on: str = "assistant",
    truncation: str = "drop",
    min_tokens: int = 0,
    windows: bool = True,
) -> dict[str, list]:
    """Token ids, labels and lengths of a batch of records, with `drop_reason` ("" when kept).

    A document longer than `max_length` gives several rows when `windows` is on (training splits), else
    its first window only, so that held-out rows stay aligned with their records. `record_index` is the
    index of each row's record (from `indices`, as `Dataset.map(with_indices=True)` passes them).
    """
    out: dict[str, list] = {
        "input_ids": [], "labels": [], "length": [], "source": [], "drop_reason": [], "truncated": [],
        "record_index": [],
    }  # fmt: skip
    for index, (messages, text, source) in enumerate(
        zip(batch["messages"], batch["text"], batch["source"], strict=True)
    ):
        if messages:
            encoded, reason = encode_chat(messages, tokenizer, max_length, None, train_on, truncation)
            rows = [encoded] if encoded is not None else []
        else:
            rows = encode_text(text, tokenizer, max_length)
            reason = "truncated" if len(rows) > 1 and not windows else "" if rows else "empty"
            rows = rows if windows else rows[:1]
        truncated = reason == "truncated"
        if rows and all(len(r["input_ids"]) < min_tokens for r in rows):
            rows, reason = [], "too_short"
        if not rows:
            rows = [{"input_ids": [], "labels": []}]
        else:
            reason = ""
        for row in rows:
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
            out["length"].append(len(row["input_ids"]))
            out["source"].append(source)
            out["drop_reason"].append(reason)
            out["truncated"].append(truncated)
            out["record_index"].append(indices[index] if indices is not None else index)
    return out
