"""The playground's side of the seektune server: which models it serves, a streamed chat, feedback.

The browser talks only to the dashboard; the dashboard forwards to the server (`ui.server_url`) with the
server's API key, so the key never reaches page scripts. Every failure becomes one sentence for the page:
the server is down, refused the key, does not know the model, or does not record feedback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 300.0


class ServerProblem(Exception):
    """The server could not be reached or answered with an error; `str()` is the page's message."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class ServerClient:
    """Calls to one seektune server."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key

    def _headers(self, api_key: str | None) -> dict[str, str]:
        key = self.api_key or api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        )

    def _down(self, exc: Exception) -> ServerProblem:
        return ServerProblem(
            f"the seektune server at {self.url} does not answer ({type(exc).__name__}): start it with "
            "`seektune serve MODEL` (or set ui.server_url to where it runs) and reload this page",
            503,
        )

    async def models(self, api_key: str | None = None) -> list[str]:
        """The names the server answers to (base, adapters, A/B names)."""
        try:
            async with self._client() as client:
                response = await client.get("/v1/models", headers=self._headers(api_key))
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code != 200:
            raise _problem(response.status_code, response.content, self.url)
        return [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]

    async def chat_stream(self, body: dict[str, Any], api_key: str | None = None) -> AsyncIterator[bytes]:
        """The server's SSE stream of a chat completion, chunk by chunk. An error before the first byte
        raises ServerProblem; one after it is sent as a last SSE event `{"error": {"message": ...}}`."""
        client = self._client()
        try:
            request = client.build_request(
                "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=self._headers(api_key)
            )
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise self._down(exc) from None
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            await client.aclose()
            raise _problem(response.status_code, content, self.url)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                message = f"the server stopped answering mid-stream ({type(exc).__name__})"
                yield f"data: {json.dumps({'error': {'message': message}})}\n\n".encode()
            finally:
                await response.aclose()
                await client.aclose()

        return relay()

    async def feedback(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        try:
            async with self._client() as client:
                response = await client.post("/v1/feedback", json=body, headers=self._headers(api_key))
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code not in (200, 201):
            raise _problem(response.status_code, response.content, self.url)
        return response.json()


def _problem(status: int, content: bytes, url: str) -> ServerProblem:
    """The server's own message (OpenAI error body) as a ServerProblem with a status for the browser."""
    try:
        error = json.loads(content).get("error") or {}
        message, code = error.get("message"), error.get("code")
    except (ValueError, AttributeError):
        message, code = None, None
    if status == 401:
        return ServerProblem(
            f"the server at {url} refused the API key: set ui.server_api_key to one of its serve.api_keys",
            502,
        )
    text = message or f"the server at {url} answered HTTP {status}"
    if code == "feedback_disabled":
        text = "this server does not record feedback: start it with serve.feedback.enabled: true"
    return ServerProblem(text, status if 400 <= status < 500 else 502)
