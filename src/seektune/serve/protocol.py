"""The OpenAI wire format: request models and the builders of responses and stream chunks.

Why our own models: the `openai` package ships response types but no request validation, and the servers
that have one (vLLM, transformers serve) are not importable without their engines. The requests accept
OpenAI's fields and ignore unknown ones (clients send new fields before servers know them), but a known
field of the wrong type is an error: the models are strict, so "max_tokens": "10" or "stream": 1 is a 400
rather than silently coerced.

Shapes of what goes back, as OpenAI sends them:

- `chat.completion`: {id, object, created, model, choices: [{index, message: {role, content}, logprobs,
  finish_reason}], usage: {prompt_tokens, completion_tokens, total_tokens}}
- `chat.completion.chunk` (stream: true): per choice first a chunk with delta {role: assistant, content: ""},
  then chunks with delta {content}, then one with an empty delta and its finish_reason; every chunk has
  "usage": null, and with stream_options.include_usage a last chunk with no choices carries the usage
  (as OpenAI does: without include_usage a stream has no usage). The stream ends with `data: [DONE]`.
- `text_completion` (completions, streamed or not): choices [{index, text, logprobs, finish_reason}];
  logprobs in the legacy shape {tokens, token_logprobs, top_logprobs, text_offset}.

Every non-streamed response carries usage.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from seektune.serve.engine import TokenLogprob


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Request):
    """The fields chat and completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch's seed range, with room for + choice
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension (also sent by load generators): keep generating past the end-of-sequence token.
    ignore_eos: bool | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (the newer name) over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class LoadAdapterRequest(_Request):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str = Field(min_length=1)


class FeedbackRequest(_Request):
    """POST /v1/feedback: a user's verdict on one choice of a response this server gave."""

    response_id: str = Field(min_length=1, max_length=200)
    index: int = Field(0, ge=0)
    rating: int | None = Field(None, ge=-1, le=1)  # -1 bad, 0 neutral, 1 good (thumbs down / up)
    correction: str | None = Field(None, min_length=1)  # the answer the model should have given
    comment: str | None = None
    user: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat logprobs: {content: [{token, logprob, bytes, top_logprobs}], refusal}."""
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": _token_bytes(entry.token),
                "top_logprobs": [
                    {"token": text, "logprob": logprob, "bytes": _token_bytes(text)}
                    for _, text, logprob in entry.top
                ],
            }
            for entry in entries
        ],
        "refusal": None,
    }


class CompletionLogprobs:
    """The legacy completions logprobs, accumulated over a choice's tokens (text_offset counts characters
    from the start of the choice's text, the echoed prompt included)."""

    def __init__(self, offset: int = 0) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._offset = offset

    def add(self, entry: TokenLogprob | None, token: str | None = None) -> None:
        """One token; `entry` None is the prompt's first token (it has no log-probability)."""
        text = entry.token if entry is not None else (token or "")
        self.tokens.append(text)
        self.text_offset.append(self._offset)
        self._offset += len(text)
        if entry is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(entry.logprob)
        top = {text_: logprob for _, text_, logprob in entry.top}
        top.setdefault(entry.token, entry.logprob)
        self.top_logprobs.append(top)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def take(self) -> dict[str, Any]:
        """What was added since the last take (for a stream chunk)."""
        out = self.to_dict()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def chat_response(
    request_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """`choices`: [{index, text, finish_reason, logprobs (chat shape or None)}]."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": choice["index"],
                "message": {"role": "assistant", "content": choice["text"], "refusal": None},
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice["finish_reason"],
            }
            for choice in choices
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(
    request_id: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_response(
    request_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """`choices`: [{index, text, finish_reason, logprobs (legacy shape or None)}]."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": choice["index"],
                "text": choice["text"],
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice["finish_reason"],
            }
            for choice in choices
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": None,
    }


def model_list(names: list[tuple[str, str | None]], created: int) -> dict[str, Any]:
    """GET /v1/models: `names` as (id, parent) pairs; parent is the base an adapter or split sits on."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "seektune", "parent": parent}
            for name, parent in names
        ],
    }
