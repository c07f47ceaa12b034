"""Odd input that once made the server answer 500 or broke the requests beside it (a review of the server
found each): lone surrogates, a tiny temperature, unloading the last adapter or one a queued request
names, an empty API key, unusable adapter paths, more prompts than the queue holds."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pydantic
import pytest
import torch
from test_errors import _error, _key

from seektune.cli import main
from seektune.config import ServeConfig
from seektune.serve.adapters import AdapterSet
from seektune.serve.app import ServedModels, create_app
from seektune.serve.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        yield client


def test_lone_surrogates_are_a_400_or_served(http) -> None:
    raw = b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'
    headers = {**_key(), "Content-Type": "application/json"}
    _error(http.post("/completions", content=raw, headers=headers), 400, param="prompt")
    raw = (
        b'{"model": "tiny-ab", "user": "\\ud800", "max_tokens": 2,'
        b' "messages": [{"role": "user", "content": "Hi"}]}'
    )
    assert http.post("/chat/completions", content=raw, headers=headers).status_code == 200  # sticky hash


def test_a_tiny_temperature_is_greedy_and_harms_no_neighbour(http, live_server) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    greedy = http.post("/completions", json=body, headers=_key()).json()["choices"][0]["text"]
    results: list[httpx.Response] = []
    neighbour = threading.Thread(
        target=lambda: results.append(http.post("/completions", json=body, headers=_key()))
    )
    neighbour.start()
    tiny = http.post("/completions", json={**body, "temperature": 1e-45, "seed": 3}, headers=_key())
    neighbour.join(60)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["text"] == greedy


def test_adapter_paths_that_are_no_paths_are_a_400(http, live_server) -> None:
    admin = _key(live_server.admin_key)
    for path in ("cand\u0000idate", "x" * 5000):
        response = http.post("/admin/adapters", json={"name": "odd", "path": path}, headers=admin)
        assert "not a usable path" in _error(response, 400)


def test_more_prompts_than_the_queue_holds_is_a_400(http) -> None:
    body = {"model": "tiny", "prompt": [[5]] * 65, "max_tokens": 1}  # the live server's max_queue is 64
    assert "65 prompts" in _error(http.post("/completions", json=body, headers=_key()), 400, param="prompt")


def test_empty_or_unprintable_api_keys_are_refused(tmp_path) -> None:
    for keys in ([""], ["with space"], ["naïve"]):
        with pytest.raises(pydantic.ValidationError, match="API key"):
            ServeConfig(api_keys=keys)
    with pytest.raises(pydantic.ValidationError, match="API key"):
        ServeConfig(admin_keys=[""])
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--api-key", ""]) == 2


@pytest.fixture
def one_adapter_app(base_cache: Path, tmp_path: Path, serve_helpers):
    allowed = tmp_path / "allowed"
    serve_helpers.save_lora(base_cache, allowed / "only", seed=1)
    cfg = ServeConfig(adapter_dir=allowed, limits={"max_tokens": 64, "default_max_tokens": 8})
    loaded = serve_helpers.load(base_cache)
    engine = Engine(loaded.model, loaded.tokenizer, cfg.limits, version="tiny")
    adapters = AdapterSet(engine, "tiny", cfg.adapter_dir)
    adapters.load("only", allowed / "only")
    return create_app(engine, loaded.tokenizer, cfg, ServedModels("tiny", adapters))


def test_unloading_the_last_adapter_leaves_the_base_served(one_adapter_app, serve_app) -> None:
    app = one_adapter_app
    body = {"prompt": "The cat", "max_tokens": 6, "temperature": 0}
    with serve_app(app) as running, httpx.Client(base_url=f"{running.url}/v1", timeout=30) as http:
        base = http.post("/completions", json={**body, "model": "tiny"}).json()["choices"][0]["text"]
        adapted = http.post("/completions", json={**body, "model": "only"}).json()["choices"][0]["text"]
        assert adapted != base
        assert http.delete("/admin/adapters/only").status_code == 200
        again = http.post("/completions", json={**body, "model": "tiny"})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == base
        assert http.post("/admin/adapters", json={"name": "only", "path": "only"}).status_code == 201
        reloaded = http.post("/completions", json={**body, "model": "only"}).json()["choices"][0]["text"]
        assert reloaded == adapted
        assert http.post("/completions", json={**body, "model": "tiny"}).json()["choices"][0]["text"] == base


def test_an_adapter_unloaded_while_its_request_waits_fails_that_request_alone(
    base_cache, tmp_path, serve_helpers
) -> None:
    """The app routed the request before the adapter went: the engine refuses it when it would join, and
    the base request queued beside it runs."""
    first = serve_helpers.save_lora(base_cache, tmp_path / "a", seed=1)
    second = serve_helpers.save_lora(base_cache, tmp_path / "b", seed=2)
    loaded = serve_helpers.load(base_cache)
    engine = Engine(loaded.model, loaded.tokenizer, ServeConfig().limits, version="tiny")  # not started
    adapters = AdapterSet(engine, "tiny", None)
    adapters.load("a", first)
    adapters.load("b", second)
    ids = loaded.tokenizer("The cat")["input_ids"]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[list, list]:
        doomed = engine.submit(ids, params, "a")
        beside = engine.submit(ids, params, None)
        engine.call(lambda: adapters._detach("a")).result()  # what unload does, past its in-use check
        engine.start()
        out = []
        for handle in (doomed, beside):
            out.append([delta async for delta in handle])
        engine.stop()
        return out, [doomed, beside]

    (doomed_deltas, beside_deltas), (doomed, beside) = asyncio.run(run())
    assert doomed.error_status == 404 and "unloaded" in doomed.error
    assert doomed_deltas[-1].finish_reason == "error"
    assert beside.error is None and sum(len(d.token_ids) for d in beside_deltas) == 5
    plain = serve_helpers.load(base_cache).model  # the served copy now carries the LoRA layers
    with torch.inference_mode():
        expected = plain.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert [t for d in beside_deltas for t in d.token_ids] == expected[0, len(ids) :].tolist()
