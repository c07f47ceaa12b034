"""Record shapes recognised in user data, normalised to one chat form: a list of `{role, content}` messages.

Shapes: OpenAI `messages`, ShareGPT `conversations` (`from`/`value`), alpaca (`instruction`/`input`/`output`),
`prompt`/`completion` and `question`/`answer`. Datasets libraries load rows but leave their meaning to the
caller, so this small mapping is ours.
"""

from __future__ import annotations

from typing import Any

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}
ROLES = ("system", "user", "assistant")


def to_messages(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """The record as chat messages, or None when its shape is not recognised."""
    if isinstance(record.get("messages"), list):
        return _clean([(m.get("role"), m.get("content")) for m in record["messages"] if isinstance(m, dict)])
    if isinstance(record.get("conversations"), list):
        turns = [
            (
                _SHAREGPT_ROLES.get(str(m.get("from", m.get("role", ""))).lower()),
                m.get("value", m.get("content")),
            )
            for m in record["conversations"]
            if isinstance(m, dict)
        ]
        return _clean(turns)
    if "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return _clean([("user", prompt), ("assistant", record["output"])])
    for question, answer in (("prompt", "completion"), ("question", "answer")):
        if question in record and answer in record:
            return _clean([("user", record[question]), ("assistant", record[answer])])
    return None


def _clean(turns: list[tuple[Any, Any]]) -> list[dict[str, str]] | None:
    messages = []
    for role, content in turns:
        if role not in ROLES or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages or None


def has_answer(messages: list[dict[str, str]]) -> bool:
    """True when the conversation has a non-empty assistant turn to learn from."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)
