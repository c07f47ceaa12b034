"""Bad input over raw HTTP: each case answers its 4xx with OpenAI's error body and no traceback, and a
request running beside the bad ones finishes as if they had not been sent."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from seektune.config import ServeConfig
from seektune.serve.app import ServedModels, create_app
from seektune.serve.engine import Engine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "The cat", "max_tokens": 4}


def _key(key: str = "test-key") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    """The OpenAI error body of `response` (asserting its shape); returns its message."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]["message"]


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        yield client


def test_invalid_json_and_non_objects(http) -> None:
    for raw in (b"{bad", b'{"model": "tiny",', b"\xff\xfe", b"", b'{"temperature": NaN}'):
        response = http.post("/chat/completions", content=raw, headers=_key())
        assert "not valid JSON" in _error(response, 400, code="invalid_json")
    assert "JSON object" in _error(http.post("/completions", json=[1, 2], headers=_key()), 400)


@pytest.mark.parametrize(
    ("endpoint", "change", "param"),
    [
        ("/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/chat/completions", {"max_tokens": "10"}, "max_tokens"),
        ("/chat/completions", {"max_tokens": 3.5}, "max_tokens"),
        ("/chat/completions", {"stream": 1}, "stream"),
        ("/chat/completions", {"messages": "Hi"}, "messages"),
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/chat/completions", {"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ("/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/chat/completions", {"model": 7}, "model"),
        ("/chat/completions", {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/completions", {"prompt": 5}, "prompt"),
        ("/completions", {"prompt": [99999]}, "prompt"),  # outside the vocabulary
        ("/completions", {"logprobs": 9}, "logprobs"),
        ("/completions", {"top_p": 0}, "top_p"),
        ("/completions", {"presence_penalty": -3}, "presence_penalty"),
        ("/completions", {"n": 0}, "n"),
        ("/completions", {"seed": 2**70}, "seed"),
    ],
)
def test_fields_of_the_wrong_type_or_range_name_the_field(http, endpoint, change, param) -> None:
    body = {**(CHAT if endpoint == "/chat/completions" else COMPLETION), **change}
    _error(http.post(endpoint, json=body, headers=_key()), 400, param=param)


def test_missing_required_fields(http) -> None:
    assert "'messages'" in _error(http.post("/chat/completions", json={"model": "tiny"}, headers=_key()), 400)
    assert "'model'" in _error(http.post("/completions", json={"prompt": "x"}, headers=_key()), 400)


def test_unknown_model_lists_the_served_ones(http) -> None:
    message = _error(
        http.post("/chat/completions", json={**CHAT, "model": "gpt-9"}, headers=_key()),
        404,
        code="model_not_found",
        param="model",
    )
    assert "gpt-9" in message and "tiny" in message and "candidate" in message and "tiny-ab" in message


def test_limits_on_prompt_max_tokens_and_n(http) -> None:
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}
    assert "limit of 200" in _error(
        http.post("/chat/completions", json=long_chat, headers=_key()), 400, code="context_length_exceeded"
    )
    _error(
        http.post("/completions", json={**COMPLETION, "prompt": list(range(10, 300))}, headers=_key()),
        400,
        code="context_length_exceeded",
    )
    assert "limit of 256" in _error(
        http.post("/completions", json={**COMPLETION, "max_tokens": 300}, headers=_key()),
        400,
        param="max_tokens",
    )
    _error(
        http.post("/completions", json={**COMPLETION, "max_tokens": -1}, headers=_key()),
        400,
        param="max_tokens",
    )
    _error(http.post("/chat/completions", json={**CHAT, "max_tokens": 0}, headers=_key()), 400)
    _error(
        http.post("/chat/completions", json={**CHAT, "max_completion_tokens": 999}, headers=_key()),
        400,
        param="max_completion_tokens",
    )
    assert "limit of 4" in _error(http.post("/completions", json={**COMPLETION, "n": 5}, headers=_key()), 400)


def test_keys(http, live_server) -> None:
    _error(http.post("/chat/completions", json=CHAT), 401, code="invalid_api_key")
    _error(http.post("/chat/completions", json=CHAT, headers=_key("wrong")), 401, code="invalid_api_key")
    _error(http.get("/models", headers={"Authorization": "Basic dGVzdC1rZXk="}), 401)
    assert http.get("/models", headers=_key()).status_code == 200
    assert http.get("/models", headers=_key(live_server.admin_key)).status_code == 200  # admin keys too
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapes carry no key
        assert httpx.get(f"{live_server.url}{path}").status_code == 200


def test_body_over_the_limit_with_and_without_content_length(http) -> None:
    big = {**COMPLETION, "prompt": "x" * 30_000}
    message = _error(http.post("/completions", json=big, headers=_key()), 413, code="request_too_large")
    assert "20000" in message

    def chunks():
        data = httpx.Request("POST", "/", json=big).content
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    response = http.post(
        "/completions", content=chunks(), headers={**_key(), "Content-Type": "application/json"}
    )
    _error(response, 413, code="request_too_large")


def test_unknown_route_and_method(http) -> None:
    _error(http.get("/nothing-here", headers=_key()), 404)
    _error(http.get("/chat/completions", headers=_key()), 405)


def test_an_unexpected_error_is_a_500_without_the_trace(http, live_server, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals /srv/model.py")

    monkeypatch.setattr(live_server.state.router, "resolve", broken)
    response = http.post("/chat/completions", json=CHAT, headers=_key())
    message = _error(response, 500, code="internal_error")
    assert "secret" not in response.text and "RuntimeError" not in message


def test_admin_adapters(http, live_server) -> None:
    admin = _key(live_server.admin_key)
    _error(http.post("/admin/adapters", json={"name": "x", "path": "candidate"}, headers=_key()), 401)
    outside = str(live_server.outside_adapter)
    _error(http.post("/admin/adapters", json={"name": "x", "path": outside}, headers=admin), 403)
    _error(http.post("/admin/adapters", json={"name": "x", "path": "../outside"}, headers=admin), 403)
    link = live_server.adapter_dir / "escape"
    if not link.exists():
        link.symlink_to(live_server.outside_adapter)
    _error(http.post("/admin/adapters", json={"name": "x", "path": "escape"}, headers=admin), 403)
    _error(http.post("/admin/adapters", json={"name": "x", "path": "missing"}, headers=admin), 404)
    _error(
        http.post("/admin/adapters", json={"name": "a b", "path": "candidate"}, headers=admin),
        400,
        param="name",
    )
    _error(http.post("/admin/adapters", json={"name": "tiny-ab", "path": "candidate"}, headers=admin), 409)
    _error(http.delete("/admin/adapters/candidate", headers=admin), 409)  # a version of tiny-ab
    _error(http.delete("/admin/adapters/nope", headers=admin), 404)

    loaded = http.post("/admin/adapters", json={"name": "again", "path": "candidate"}, headers=admin)
    assert loaded.status_code == 201, loaded.text
    body = {"prompt": "The cat", "max_tokens": 6, "temperature": 0}
    via_new = http.post("/completions", json={**body, "model": "again"}, headers=_key()).json()
    via_old = http.post("/completions", json={**body, "model": "candidate"}, headers=_key()).json()
    assert via_new["choices"][0]["text"] == via_old["choices"][0]["text"]  # the same adapter folder
    assert http.delete("/admin/adapters/again", headers=admin).status_code == 200
    _error(http.post("/completions", json={**body, "model": "again"}, headers=_key()), 404)


def test_loading_adapters_at_run_time_is_off_without_adapter_dir(plain_base) -> None:
    cfg = ServeConfig()
    engine = Engine(plain_base.model, plain_base.tokenizer, cfg.limits, version="tiny")
    with TestClient(
        create_app(engine, plain_base.tokenizer, cfg, ServedModels("tiny"), manage_engine=False)
    ) as c:
        response = c.post("/v1/admin/adapters", json={"name": "x", "path": "/tmp"})
        assert "at run time is off" in _error(response, 403)


def test_a_full_queue_answers_429_with_retry_after(plain_base) -> None:
    cfg = ServeConfig(limits={"max_queue": 1})
    engine = Engine(plain_base.model, plain_base.tokenizer, cfg.limits, version="tiny")  # never started
    app = create_app(engine, plain_base.tokenizer, cfg, ServedModels("tiny"), manage_engine=False)

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            waiting = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
            while engine.stats.queue_depth < 1:  # the first request holds the only place
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/completions", json=COMPLETION)
            waiting.cancel()
            return refused

    refused = asyncio.run(main())
    assert "queue is full" in _error(refused, 429, code="queue_full")
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_request_beside_malformed_ones_completes(http, live_server) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}
    expected = http.post("/completions", json=body, headers=_key()).json()["choices"][0]["text"]
    streamed: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{live_server.base_url}/completions", json={**body, "stream": True}, headers=_key()
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    bad = [
        http.post("/completions", content=b"{oops", headers=_key()),
        http.post("/completions", json={**body, "max_tokens": -5}, headers=_key()),
        http.post("/completions", json={**body, "prompt": [10**9]}, headers=_key()),
        http.post("/completions", json={**body, "model": "nope"}, headers=_key()),
        http.post("/completions", json={**body, "prompt": "x" * 30_000}, headers=_key()),
        http.post("/completions", json=body),
    ]
    reader.join(60)
    assert [r.status_code for r in bad] == [400, 400, 400, 404, 413, 401]
    assert "".join(streamed) == expected
