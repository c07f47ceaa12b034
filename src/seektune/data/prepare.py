"""The data stage: read the sources, split, tokenise with the chat template, and report what was kept.

Only assistant turns are learnt: every other token has the label -100. Each assistant turn keeps the
template's end-of-sentence token inside the loss (EOS is appended when a template leaves it out), so the
tuned model learns to stop by itself.

Locating the answers is ours because transformers' `return_assistant_tokens_mask` needs `{% generation %}`
markers that DeepSeek's own chat templates do not have.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.config import DataConfig
from seektune.data.formats import has_answer
from seektune.data.load import load_source
from seektune.errors import UserError
from seektune.logs import log_event, progress
from seektune.rundir import atomic_write_json, atomic_write_jsonl, fingerprint_records

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100


@dataclass
class PreparedData:
    """Chat records and their tokenised form, by split, with the report of what was kept and dropped."""

    records: dict[str, list[dict[str, Any]]]
    tokenized: dict[str, list[dict[str, list[int]]]]
    report: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int, out_dir: Path | None = None) -> PreparedData:
    """Load, split, tokenise; write `<split>.jsonl` and `report.json` into `out_dir` when given."""
    records, sources = _load_and_split(cfg, seed)
    dropped: dict[str, int] = {}
    tokenized: dict[str, list[dict[str, list[int]]]] = {}
    with progress("tokenising", total=sum(len(rows) for rows in records.values())) as bar:
        for split in SPLITS:
            kept_records, kept_tokens = [], []
            for record in records[split]:
                encoded, reason = encode_chat(
                    record["messages"], tokenizer, cfg.max_length, cfg.system_prompt
                )
                bar.advance()
                if encoded is None:
                    dropped[reason] = dropped.get(reason, 0) + 1
                    continue
                kept_records.append(record)
                kept_tokens.append(encoded)
            records[split], tokenized[split] = kept_records, kept_tokens
    if not tokenized["train"]:
        reasons = (
            ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items()) or "no records"
        )
        raise UserError(
            f"the training split is empty after preparation ({reasons}): add data, raise data.max_length "
            "for 'too long', or give records with assistant answers"
        )
    report = {
        "sources": sources,
        "splits": {split: len(tokenized[split]) for split in SPLITS},
        "dropped": dropped,
        "train_tokens": sum(len(t["input_ids"]) for t in tokenized["train"]),
        "fingerprint": fingerprint_records({"split": s, **r} for s in SPLITS for r in records[s]),
    }
    log_event(logger, "data prepared", **report["splits"], dropped=dropped, fingerprint=report["fingerprint"])
    prepared = PreparedData(records=records, tokenized=tokenized, report=report)
    if out_dir is not None:
        save_prepared(prepared, out_dir)
    return prepared


def _load_and_split(cfg: DataConfig, seed: int) -> tuple[dict[str, list[dict]], list[dict]]:
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    sources = []
    rng = random.Random(seed)
    for source in cfg.sources:
        by_split = load_source(source)
        if "all" in by_split:
            by_split = _split(by_split["all"], cfg.validation_ratio, cfg.test_ratio, rng)
        count = sum(len(v) for v in by_split.values())
        if count == 0:
            raise UserError(f"data source {source.path} is empty: give a file with at least one record")
        sources.append({"path": source.path, "examples": count})
        for split in SPLITS:
            records[split].extend(by_split.get(split, []))
    for split in SPLITS:
        rng.shuffle(records[split])
    for split, limit in (
        ("train", cfg.max_train_samples),
        ("validation", cfg.max_eval_samples),
        ("test", cfg.max_eval_samples),
    ):
        if limit is not None:
            records[split] = records[split][:limit]
    return records, sources


def _split(
    rows: list[dict], validation_ratio: float, test_ratio: float, rng: random.Random
) -> dict[str, list]:
    rows = list(rows)
    rng.shuffle(rows)
    # A split with a ratio above zero keeps at least one record, as long as two remain for training.
    n_test = max(round(len(rows) * test_ratio), 1 if test_ratio > 0 and len(rows) >= 3 else 0)
    n_val = max(
        round(len(rows) * validation_ratio), 1 if validation_ratio > 0 and len(rows) - n_test >= 3 else 0
    )
    return {
        "test": rows[:n_test],
        "validation": rows[n_test : n_test + n_val],
        "train": rows[n_test + n_val :],
    }


def encode_chat(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int, system_prompt: str | None = None
) -> tuple[dict[str, list[int]] | None, str]:
    """Token ids and labels of one conversation (labels -100 outside assistant answers), or (None, reason).

    The whole conversation is rendered and tokenised once, as at inference. Each assistant answer is the
    text its turn adds after the generation prompt; it is located in the rendering and its tokens (found
    through the tokenizer's offsets) are learnt. Templates that change earlier turns (R1's drops past
    reasoning) or add text after the generation prompt (R1's `<think>`) are handled: a past answer that the
    template rewrote is context only, and the final answer is always learnt.
    """
    if not has_answer(messages):
        return None, "no_answer"
    messages = with_system_prompt(messages, system_prompt)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _answer_spans(messages, tokenizer, text)
    if not spans:
        return None, "template_unsupported"
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token
        if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    if labels[-1] != tokenizer.eos_token_id:  # a template that leaves EOS out: the model must still stop
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(input_ids) > max_length:
        return None, "too_long"
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


def save_prepared(prepared: PreparedData, out_dir: Path) -> None:
    """Write the records of each split and the data report into `out_dir`."""
    for split, rows in prepared.records.items():
        atomic_write_jsonl(out_dir / f"{split}.jsonl", rows)
    atomic_write_json(out_dir / "report.json", prepared.report)
