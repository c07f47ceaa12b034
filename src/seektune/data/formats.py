"""Record shapes recognised in user data, normalised to the fields of the record schema (`records.py`).

A row (one JSON object, CSV row, Parquet or Arrow row) becomes `(messages, text, metadata, label,
rejected)`:

* a preference pair (`chosen` and `rejected`, as TRL and LLaMA-Factory write them): `prompt` (text or a list
  of messages) plus the chosen answer become `messages`, the rejected answer `rejected`. The answers are
  text or lists of messages (TRL's conversational form: the assistant turns after the prompt); without a
  `prompt`, both are whole conversations and their shared first turns are the prompt. A row with `chosen`
  but no `rejected` (or the reverse), an empty answer, or the same answer twice raises `InvalidRecord`;
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
* `label` becomes the label text (a null or NaN label is no label: "").

Values that JSON cannot hold (a Parquet struct with a date, decimal or bytes) become text, dates in ISO
format, so that metadata and labels always serialise. A list of structs that `datasets` decodes column-wise
(the classic `Sequence({...})` feature: `{'from': [...], 'value': [...]}`) is read as the list of objects
it stands for (messages, conversations, history, conversational prompt/completion).

`fields` (data.sources[].fields: standard field -> the user's column) renames columns before the shape is
recognised. An unrecognised shape gives None; a recognised shape whose content cannot be a record (a
`tool` role, a turn that is not text, a conversation without turns) raises `InvalidRecord`; a mapped
column that a row lacks raises `MissingField`. A conversation without an answer is returned as it is:
the tokeniser drops it with reason "no_answer" and counts it.

Datasets libraries read rows but leave their meaning to the caller, so this small mapping is ours.
"""

from __future__ import annotations

import datetime
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
    "prompt+chosen+rejected (a preference pair), context+response, prompt+completion, question+answer, "
    "or text (a document)"
)

Messages = list[dict[str, str]]


class MissingField(Exception):
    """A column named in data.sources[].fields is not in the row."""

    def __init__(self, field: str, column: str, keys: list[str]) -> None:
        super().__init__(f"column '{column}' (mapped to '{field}') is missing")
        self.field, self.column, self.keys = field, column, keys


class InvalidRecord(Exception):
    """A row of a recognised shape whose content cannot become a record; the message says why."""


def to_record_fields(
    row: dict[str, Any], fields: dict[str, str]
) -> tuple[Messages, str, dict, str, str] | None:
    """(messages, text, metadata, label, rejected) of a row, or None when its shape is not recognised."""
    if fields:
        row = apply_fields(row, fields)
    if row.get("chosen") is not None or row.get("rejected") is not None:
        messages, rejected = _preference_pair(row)
        return messages, "", _metadata(row), _label(row.get("label")), rejected
    messages = _conversation(row)
    text = ""
    if messages is None:
        document = row.get("text")
        if not isinstance(document, str):
            if _is_empty_list(row.get("messages")) or _is_empty_list(row.get("conversations")):
                raise InvalidRecord("the conversation has no turns")
            return None
        messages, text = [], document
    return messages, text, _metadata(row), _label(row.get("label")), ""


def _preference_pair(row: dict[str, Any]) -> tuple[Messages, str]:
    """(prompt + chosen answer as messages, the rejected answer) of a preference row."""
    missing = [key for key in ("chosen", "rejected") if row.get(key) is None]
    if missing:
        raise InvalidRecord(
            f"a preference pair needs both 'chosen' and 'rejected'; this row has no '{missing[0]}'"
        )
    chosen, rejected = _answer_turns(row["chosen"], "chosen"), _answer_turns(row["rejected"], "rejected")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: two whole conversations that share their first turns
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        turns, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not turns:
            raise InvalidRecord("a preference pair without 'prompt' needs chosen and rejected conversations "
                                "that start with the same prompt turns")  # fmt: skip
    else:
        listed = _as_list(_rows_if_columnar(prompt), "prompt")
        turns = _chat_turns(listed, "prompt") if listed is not None else [_turn("user", prompt, "prompt")]
    system = row.get("system")
    if system is not None and (not turns or turns[0]["role"] != "system"):
        system = _content(system, "the system column")
        if system.strip():
            turns.insert(0, {"role": "system", "content": system})
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if len(answer) != 1 or answer[0]["role"] != "assistant" or not answer[0]["content"].strip():
            raise InvalidRecord(f"'{key}' must be one non-empty assistant answer")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise InvalidRecord(
            "'chosen' and 'rejected' are the same answer: a preference pair needs two different ones"
        )
    return [*turns, chosen[0]], rejected[0]["content"]


def _answer_turns(value: Any, key: str) -> Messages:
    """An answer column as messages: text is one assistant turn, a list is a conversation."""
    listed = _as_list(_rows_if_columnar(value), key)
    if listed is None:
        return [_turn("assistant", value, key)]
    return _chat_turns(listed, key)


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
    question, answer = _rows_if_columnar(question), _rows_if_columnar(answer)
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
    """A list column, also as JSON text (CSV cells) or column-wise structs; None when it is not a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return _columns_to_rows(value)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRecord(f"'{key}' looks like a JSON list but is not valid JSON ({exc.msg})") from None
        return parsed if isinstance(parsed, list) else None
    return None


def _columns_to_rows(columns: dict[str, Any]) -> list[dict[str, Any]] | None:
    """`{'from': [a, b], 'value': [x, y]}` as `[{'from': a, 'value': x}, ...]`; None when not of that form."""
    values = list(columns.values())
    if not values or not all(isinstance(v, list) and len(v) == len(values[0]) for v in values):
        return None
    keys = list(columns)
    return [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)]


def _rows_if_columnar(value: Any) -> Any:
    if isinstance(value, dict):
        rows = _columns_to_rows(value)
        return value if rows is None else rows
    return value


def _is_empty_list(value: Any) -> bool:
    if isinstance(value, dict):
        return _columns_to_rows(value) == []
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
        metadata.update(_json_safe(attached))
    elif attached not in (None, ""):
        metadata["metadata"] = _json_safe(attached)
    return metadata


def _is_tag(value: Any) -> bool:
    if isinstance(value, str):
        return 0 < len(value) <= MAX_METADATA_CHARS
    if isinstance(value, float):
        return value == value  # NaN (a null from pandas) is no tag
    return isinstance(value, int | bool)


def _label(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and value != value):  # NaN: a null from pandas/pyarrow
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(_json_safe(value), ensure_ascii=False, sort_keys=True)
    return _as_text(value)


def _json_safe(value: Any) -> Any:
    """The value with everything JSON cannot hold as text (NaN as null), so `json.dumps` always works."""
    if isinstance(value, str | bool | int | None):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return _as_text(value)


def _as_text(value: Any) -> str:
    """A scalar as text: dates and times in ISO format, bytes as UTF-8 (undecodable bytes escaped)."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)
