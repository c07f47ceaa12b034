"""Record shapes recognised in user data, normalised to the fields of the record schema (`records.py`).

A row (one JSON object, CSV row, Parquet or Arrow row) becomes `(messages, text, metadata, label)`:

* conversation shapes, tried in this order, give `messages` (`{role, content}`, roles system/user/assistant):
  OpenAI `messages` (role/content), ShareGPT `conversations` (from/value: human, gpt, system, ...),
  alpaca `instruction`/`input`/`output` (+ `history`, a list of [question, answer] pairs as in
  LLaMA-Factory), `context`/`response`, `prompt`/`completion` (strings, or TRL's conversational lists of
  messages) and `question`/`answer`. A top-level `system` column puts a system turn first (unless the
  conversation already starts with one);
* `text` alone is a document for continued pre-training;
* `metadata` (an object, or an object as JSON text, e.g. from CSV) is kept in `metadata`; so is every other
  top-level scalar column (`domain`, `category`, `id`, ...) that is not a standard field, when it is at
  most `MAX_METADATA_CHARS` long: metadata is what reports, stratified splits, balancing and mixing group
  by, and a long string is content rather than a tag; lists, objects and nulls are left out;
* `label` becomes the label text.

`fields` (data.sources[].fields: standard field -> the user's column) renames columns before the shape is
recognised. An unrecognised shape gives None; a recognised shape whose content cannot be a record (a
`tool` role, a turn that is not text, a conversation without turns) raises `InvalidRecord`; a mapped
column that a row lacks raises `MissingField`. A conversation without an answer is returned as it is:
the tokeniser drops it with reason "no_answer" and counts it.

Datasets libraries read rows but leave their meaning to the caller, so this small mapping is ours.
"""

from __future__ import annotations

import json
from typing import Any

from seektune.config import SOURCE_FIELDS

ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
# Pairs tried in order after messages, conversations and alpaca; each becomes one user + assistant turn.
_PAIR_SHAPES = (("context", "response"), ("prompt", "completion"), ("question", "answer"))
MAX_METADATA_CHARS = 200
_NOT_METADATA = frozenset(SOURCE_FIELDS) | {"history"}
SHAPES_EXPECTED = (
    "messages (OpenAI role/content), conversations (ShareGPT from/value), instruction+output (alpaca), "
    "context+response, prompt+completion, question+answer, or text (a document)"
)

Messages = list[dict[str, str]]


class MissingField(Exception):
    """A column named in data.sources[].fields is not in the row."""

    def __init__(self, field: str, column: str, keys: list[str]) -> None:
        super().__init__(f"column '{column}' (mapped to '{field}') is missing")
        self.field, self.column, self.keys = field, column, keys


class InvalidRecord(Exception):
    """A row of a recognised shape whose content cannot become a record; the message says why."""


def to_record_fields(row: dict[str, Any], fields: dict[str, str]) -> tuple[Messages, str, dict, str] | None:
    """(messages, text, metadata, label) of a row, or None when its shape is not recognised."""
    if fields:
        row = apply_fields(row, fields)
    messages = _conversation(row)
    text = ""
    if messages is None:
        document = row.get("text")
        if not isinstance(document, str):
            if _is_empty_list(row.get("messages")) or _is_empty_list(row.get("conversations")):
                raise InvalidRecord("the conversation has no turns")
            return None
        messages, text = [], document
    return messages, text, _metadata(row), _label(row.get("label"))


def apply_fields(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """The row with the user's columns renamed to standard fields (data.sources[].fields)."""
    missing = next(((f, c) for f, c in fields.items() if c not in row), None)
    if missing is not None:
        raise MissingField(*missing, keys=sorted(row))
    renamed = {key: value for key, value in row.items() if key not in fields.values()}
    renamed.update({field: row[column] for field, column in fields.items()})
    return renamed


def to_messages(row: dict[str, Any]) -> Messages | None:
    """The row as chat messages, or None when it is not a conversation of a recognised shape."""
    try:
        fields = to_record_fields(row, {})
    except InvalidRecord:
        return None
    return fields[0] if fields is not None and fields[0] else None


def has_answer(messages: Messages) -> bool:
    """True when the conversation has a non-empty assistant turn to learn from."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def _conversation(row: dict[str, Any]) -> Messages | None:
    turns = _turns_of(row)
    if turns is None:
        return None
    system = row.get("system")
    if system is not None and (not turns or turns[0]["role"] != "system"):
        system = _content(system, "the system column")
        if system.strip():
            turns.insert(0, {"role": "system", "content": system})
    return turns


def _turns_of(row: dict[str, Any]) -> Messages | None:
    for key in ("messages", "conversations"):
        listed = _as_list(row.get(key), key)
        if listed:
            return _chat_turns(listed, key)
    if row.get("instruction") is not None and row.get("output") is not None:
        return _alpaca_turns(row)
    for question, answer in _PAIR_SHAPES:
        if row.get(question) is not None and row.get(answer) is not None:
            return _pair_turns(row[question], row[answer], question, answer)
    return None


def _pair_turns(question: Any, answer: Any, question_key: str, answer_key: str) -> Messages:
    if not isinstance(question, list) and not isinstance(answer, list):
        return [_turn("user", question, question_key), _turn("assistant", answer, answer_key)]
    if not (isinstance(question, list) and isinstance(answer, list)):
        raise InvalidRecord(
            f"'{question_key}' and '{answer_key}' must both be text or both lists of messages"
        )
    return _chat_turns(question, question_key) + _chat_turns(answer, answer_key)


def _chat_turns(turns: list, key: str) -> Messages:
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"turn {number} of '{key}' is not an object with role and content")
        role = turn.get("role", turn.get("from"))
        mapped = _ROLE_ALIASES.get(str(role).lower())
        if mapped is None:
            raise InvalidRecord(
                f"turn {number} of '{key}' has role {role!r}: seektune trains on system, user and "
                "assistant turns (ShareGPT: system, human, gpt)"
            )
        content = turn.get("content", turn.get("value"))
        messages.append(_turn(mapped, content, f"turn {number} of '{key}'"))
    return messages


def _alpaca_turns(row: dict[str, Any]) -> Messages:
    messages = []
    history = _as_list(row.get("history"), "history") or []
    for number, pair in enumerate(history, start=1):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidRecord(f"history entry {number} is not a [question, answer] pair")
        messages += [_turn("user", pair[0], "history"), _turn("assistant", pair[1], "history")]
    prompt = _content(row["instruction"], "instruction")
    extra = _content(row.get("input"), "input")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}" if prompt.strip() else extra
    messages += [{"role": "user", "content": prompt}, _turn("assistant", row["output"], "output")]
    return messages


def _turn(role: str, content: Any, where: str) -> dict[str, str]:
    return {"role": role, "content": _content(content, where)}


def _content(value: Any, where: str) -> str:
    """Turn content as text: strings as they are, numbers written out, OpenAI text parts joined."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise InvalidRecord(f"{where} is {type(value).__name__}, not text")


def _as_list(value: Any, key: str) -> list | None:
    """A list column, also when it arrives as JSON text (CSV cells); None when it is not a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRecord(f"'{key}' looks like a JSON list but is not valid JSON ({exc.msg})") from None
        return parsed if isinstance(parsed, list) else None
    return None


def _is_empty_list(value: Any) -> bool:
    return isinstance(value, list) and not value


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: value for key, value in row.items() if key not in _NOT_METADATA and _is_tag(value)}
    attached = row.get("metadata")
    if isinstance(attached, str) and attached.lstrip().startswith("{"):
        try:
            attached = json.loads(attached)
        except json.JSONDecodeError as exc:
            raise InvalidRecord(f"'metadata' looks like JSON but is not valid JSON ({exc.msg})") from None
    if isinstance(attached, dict):
        metadata.update(attached)
    elif attached not in (None, ""):
        metadata["metadata"] = attached
    return metadata


def _is_tag(value: Any) -> bool:
    if isinstance(value, str):
        return 0 < len(value) <= MAX_METADATA_CHARS
    if isinstance(value, float):
        return value == value  # NaN (a null from pandas) is no tag
    return isinstance(value, int | bool)


def _label(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)
