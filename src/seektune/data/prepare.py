"""The data stage: read the sources, split, tokenise with the chat template, and report what was kept.

Only assistant turns are learnt: every other token has the label -100. Each assistant turn keeps the
template's end-of-sentence token inside the loss (EOS is appended when a template leaves it out), so the
tuned model learns to stop by itself.

Tokenising turn by turn is ours because transformers' `return_assistant_tokens_mask` needs `{% generation %}`
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
from seektune.logs import log_event
from seektune.rundir import atomic_write_json, atomic_write_text, fingerprint_records

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100


@dataclass
class PreparedData:
    """Chat records and their tokenised form, by split, with the report of what was kept and dropped."""

    records: dict[str, list[dict[str, Any]]]
    tokenized: dict[str, list[dict[str, list[int]]]]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.report["fingerprint"]


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int, out_dir: Path | None = None) -> PreparedData:
    """Load, split, tokenise; write `records-<split>.jsonl` and `report.json` into `out_dir` when given."""
    records, sources = _load_and_split(cfg, seed)
    dropped: dict[str, int] = {}
    tokenized: dict[str, list[dict[str, list[int]]]] = {}
    for split in SPLITS:
        kept_records, kept_tokens = [], []
        for record in records[split]:
            encoded, reason = encode_chat(record["messages"], tokenizer, cfg.max_length, cfg.system_prompt)
            if encoded is None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            kept_records.append(record)
            kept_tokens.append(encoded)
        records[split], tokenized[split] = kept_records, kept_tokens
    if not tokenized["train"]:
        raise UserError(
            "the training split is empty after preparation: add data, raise data.max_length, "
            "or check that the records have assistant answers"
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
    n_test = round(len(rows) * test_ratio)
    n_val = round(len(rows) * validation_ratio)
    return {
        "test": rows[:n_test],
        "validation": rows[n_test : n_test + n_val],
        "train": rows[n_test + n_val :],
    }


def encode_chat(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int, system_prompt: str | None = None
) -> tuple[dict[str, list[int]] | None, str]:
    """Token ids and labels of one conversation (labels -100 outside assistant turns), or (None, reason)."""
    if not has_answer(messages):
        return None, "no_answer"
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            return None, "template_not_incremental"
        prompt_ids = _ids(tokenizer, prompt[len(rendered) :])
        answer_ids = _ids(tokenizer, full[len(prompt) :])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        rendered = full
    if labels[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(input_ids) > max_length:
        return None, "too_long"
    return {"input_ids": input_ids, "labels": labels}, ""


def prompt_text(messages: list[dict[str, str]], tokenizer: Any, system_prompt: str | None = None) -> str:
    """The conversation up to its last assistant turn, rendered with the generation prompt."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], add_generation_prompt=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def save_prepared(prepared: PreparedData, out_dir: Path) -> None:
    """Write the records of each split and the data report into `out_dir`."""
    import json

    for split, rows in prepared.records.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(out_dir / f"{split}.jsonl", lines)
    atomic_write_json(out_dir / "report.json", prepared.report)
