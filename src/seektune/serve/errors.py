"""OpenAI-style error bodies, the exception handlers that produce them, and the request-body size limit.

OpenAI clients (the official SDKs, LangChain, ...) read a failed request's `{"error": {"message", "type",
"param", "code"}}` body and raise typed exceptions from it, so every error this server answers has that
shape: validation errors name the field, unknown routes are a 404, and anything unexpected is a 500 whose
body says nothing of the server's internals (the traceback goes to the log).

The request-body limit is ours (`BodyLimitMiddleware`) although Starlette 1.x has one (FastAPI's
`max_body_size`): when a Content-Length is over the limit, Starlette's replaces whatever response the app
starts with a plain-text "Content Too Large", which no OpenAI client can parse. Ours answers an OpenAI body
before the app runs, and also counts chunked bodies that carry no Content-Length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status this server answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client as an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # OpenAI's field name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.type, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


# ---------------------------------------------------------------------------------------------------------
# Validation errors: one message that names the field

# pydantic puts the member of a union it tried into the location ("prompt", "list[int]", 1): not a field.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part in _UNION_TAGS or not str(part).isidentifier():
            continue
        else:
            parts.append(str(part))
    return ".".join(parts)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first invalid field (as a dotted path: messages.0.content)."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    path = _field_path(loc)
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {message}", code="invalid_json")
    if first.get("type") == "missing":
        return APIError(400, f"'{path}' is a required field", param=path or None, code="missing_field")
    if not path:
        return APIError(400, f"invalid request body: {message}")
    got = first.get("input")
    plain = isinstance(got, (str, int, float, bool, type(None)))
    shown = json.dumps(got)[:80] if plain else type(got).__name__
    return APIError(400, f"invalid value for '{path}': {message} (got {shown})", param=path)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json would accept NaN and Infinity


def parse_body(raw: bytes, model: type[Any]) -> Any:
    """The request body validated into `model`: a 400 for invalid JSON, a non-object or a bad field."""
    if not raw.strip():
        raise APIError(400, "the request body is not valid JSON: it is empty", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


# ---------------------------------------------------------------------------------------------------------
# Handlers


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(list(exc.errors())))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


def internal_error() -> APIError:
    return APIError(500, "internal server error (the server logged the details)", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI error bodies for every error FastAPI and this app raise."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)


# ---------------------------------------------------------------------------------------------------------
# Middleware


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, chunked or not, before anything parses it.

    A Content-Length over the limit is refused without reading; otherwise the body is read up to the limit
    and replayed to the app, after which `receive` is the server's again (so the app still sees the
    client's disconnect).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(scope, receive, send, APIError(400, "invalid Content-Length header"))
                    return
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send, self._too_large())
                    return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its whole body
                buffered.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
            buffered.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than the server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        response = error_response(error)
        response.headers["connection"] = "close"  # the rest of the body is left unread on the socket
        await response(scope, receive, send)


class CatchAllMiddleware:
    """The last line: an exception that escaped every handler is logged with its traceback and answered
    with a 500 body that holds none of it (a stream already started is closed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(internal_error())(scope, receive, send)
