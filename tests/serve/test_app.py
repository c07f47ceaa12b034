"""The server driven by the official `openai` client on the tiny DeepSeek-V3 base: chat and completions,
plain and streamed, usage, finish reasons, stop strings, n and seed, logprobs, adapters, batched decoding,
cancellation of a client that leaves, graceful shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from seektune.config import SeektuneConfig, ServeConfig
from seektune.errors import UserError
from seektune.serve.server import build_app, check_bind, is_loopback
from support import TINY_RECIPE

STORY = [{"role": "user", "content": "Tell me a story"}]


def _generate(loaded, ids: list[int], max_new: int) -> tuple[str, int]:
    """Greedy `generate` on the unserved copy of the base: its text and its number of new tokens."""
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    new = out[0, len(ids) :].tolist()
    return loaded.tokenizer.decode(new, skip_special_tokens=True), len(new)


def _chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = getattr(choice, "delta", None)
            text = piece.content if piece is not None else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (text or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def test_chat_greedy_equals_generate_and_counts_the_template(live_server, plain_base) -> None:
    client = live_server.client()
    reply = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=40, temperature=0)
    ids = _chat_ids(live_server.tokenizer, STORY)
    text, new_tokens = _generate(plain_base, ids, 40)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if new_tokens == 40 else "stop")
    assert reply.usage.prompt_tokens == len(ids)  # the chat template's tokens, BOS and role tags included
    assert reply.usage.completion_tokens == new_tokens
    assert reply.usage.total_tokens == len(ids) + new_tokens


def test_chat_streamed_equals_plain_with_a_seed(live_server) -> None:
    client = live_server.client()
    args = {"model": "tiny", "messages": STORY, "max_tokens": 24, "temperature": 1.0, "seed": 11}
    plain = client.chat.completions.create(**args)
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts, finish, chunks = _stream_text(stream)
    assert texts[0] == plain.choices[0].message.content
    assert finish[0] == plain.choices[0].finish_reason
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # without include_usage there is no usage chunk, as with OpenAI
    texts, _, chunks = _stream_text(client.chat.completions.create(**args, stream=True))
    assert texts[0] == plain.choices[0].message.content
    assert all(c.usage is None and c.choices for c in chunks)


def test_completions_length_stop_strings_and_streaming(live_server, plain_base) -> None:
    client = live_server.client()
    ids = list(live_server.tokenizer("The cat")["input_ids"])
    text, _ = _generate(plain_base, ids, 20)
    reply = client.completions.create(model="tiny", prompt="The cat", max_tokens=20, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 20)

    stop = text[6:9]  # a piece from the middle of the text
    cut = text[: text.index(stop)]
    stopped = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=20, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == cut
    assert stopped.choices[0].finish_reason == "stop"
    texts, finish, chunks = _stream_text(
        client.completions.create(
            model="tiny", prompt="The cat", max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert texts[0] == cut and finish[0] == "stop"
    assert all(c.object == "text_completion" for c in chunks)

    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == text  # token ids give the same as the string


def test_n_with_a_seed_reproduces_and_several_prompts(live_server) -> None:
    client = live_server.client()
    args = {"model": "tiny", "prompt": "A dog", "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2}
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    counted = client.completions.create(**args, logprobs=0)
    assert [c.text for c in counted.choices] == [c.text for c in first.choices]
    # usage counts the tokens of both choices
    assert counted.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in counted.choices)

    texts, finish, _ = _stream_text(client.completions.create(**args, stream=True))
    assert texts == {c.index: c.text for c in first.choices}
    assert set(finish) == {0, 1}

    several = client.completions.create(
        model="tiny", prompt=["The cat", "A dog"], max_tokens=6, temperature=0, n=2
    )
    alone = client.completions.create(model="tiny", prompt="A dog", max_tokens=6, temperature=0)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    assert {c.index: c.text for c in several.choices}[2] == alone.choices[0].text  # prompt 1, choice 0
    assert several.usage.prompt_tokens == sum(
        len(live_server.tokenizer(p)["input_ids"]) for p in ["The cat", "A dog"]
    )


def test_logprobs_chat_and_completions(live_server) -> None:
    client = live_server.client()
    reply = client.chat.completions.create(
        model="tiny", messages=STORY, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)

    prompt_ids = live_server.tokenizer("The cat")["input_ids"]
    echoed = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("The cat")
    assert len(logprobs.tokens) == len(prompt_ids) + 5
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == echoed.choices[0].text
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])
    only_prompt = client.completions.create(model="tiny", prompt="The cat", max_tokens=0, echo=True)
    assert only_prompt.choices[0].text == "The cat" and only_prompt.usage.completion_tokens == 0


def test_models_and_adapters_by_the_model_field(live_server) -> None:
    client = live_server.client()
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny", "candidate", "tiny-ab"}
    args = {"prompt": "The cat", "max_tokens": 12, "temperature": 0}
    base = client.completions.with_raw_response.create(model="tiny", **args)
    tuned = client.completions.with_raw_response.create(model="candidate", **args)
    assert base.headers["x-seektune-version"] == "tiny"
    assert tuned.headers["x-seektune-version"] == "candidate"
    assert tuned.parse().choices[0].text != base.parse().choices[0].text  # the adapter changes the output


def _batch_histogram(url: str) -> tuple[float, float]:
    """(observations, observations of batch size 1) of seektune_batch_size."""
    text = httpx.get(f"{url}/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "seektune_batch_size"]
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    ones = next(s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    return count, ones


def test_concurrent_requests_are_batched_and_equal_one_by_one(live_server) -> None:
    client = live_server.client()
    prompts = ["The cat", "Once upon a time", "A dog", "The weather today", "In the", "We"]

    def complete(prompt: str) -> str:
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
        return reply.choices[0].text

    one_by_one = [complete(p) for p in prompts]
    count_before, ones_before = _batch_histogram(live_server.url)
    barrier = threading.Barrier(len(prompts))

    def together(prompt: str) -> str:
        barrier.wait()
        return complete(prompt)

    with ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(together, prompts))
    count_after, ones_after = _batch_histogram(live_server.url)
    assert batched == one_by_one
    assert count_after - count_before > ones_after - ones_before  # some steps decoded more than one row


def test_a_client_that_leaves_mid_stream_is_cancelled(live_server, monkeypatch) -> None:
    engine = live_server.engine
    handles = []
    submit = engine.submit

    def recording(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording)
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": 80, "temperature": 0}
    full = httpx.post(
        f"{live_server.base_url}/completions", json=body, headers={"Authorization": "Bearer test-key"}
    ).json()
    assert full["choices"][0]["finish_reason"] == "length"  # uninterrupted, it runs to 80 tokens
    with httpx.stream(
        "POST",
        f"{live_server.base_url}/completions",
        json={**body, "stream": True},
        headers={"Authorization": "Bearer test-key"},
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first token arrived; then the client hangs up
    deadline = time.monotonic() + 10
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.02)
    streamed = handles[-1]
    assert streamed.cancelled
    assert engine.stats.running == 0 and engine.stats.queue_depth == 0
    assert streamed.completion_tokens < 80


def test_ignore_eos_reaches_the_engine(live_server, monkeypatch) -> None:
    """vLLM's `ignore_eos` (sent by load generators, benchmarks/serve_load.py) runs to max_tokens."""
    engine = live_server.engine
    seen = []
    submit = engine.submit

    def recording(prompt, params, adapter=None):
        seen.append(params)
        return submit(prompt, params, adapter)

    monkeypatch.setattr(engine, "submit", recording)
    client = live_server.client()
    args = {"model": "tiny", "prompt": "The cat", "max_tokens": 30, "temperature": 0}
    reply = client.completions.create(**args, extra_body={"ignore_eos": True})
    assert seen[-1].ignore_eos is True
    assert reply.usage.completion_tokens == 30 and reply.choices[0].finish_reason == "length"
    client.completions.create(**args)
    assert seen[-1].ignore_eos is False
    wrong = httpx.post(
        f"{live_server.base_url}/completions",
        json={**args, "ignore_eos": "yes"},
        headers={"Authorization": "Bearer test-key"},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "ignore_eos"


def test_a_client_that_leaves_a_plain_request_is_cancelled(live_server, monkeypatch) -> None:
    engine = live_server.engine
    handles = []
    submit, observe = engine.submit, engine.on_step

    def recording(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    def slow_step(rows: int, tokens: int) -> None:  # 80 tokens take at least 0.8 s
        observe(rows, tokens)
        time.sleep(0.01)

    monkeypatch.setattr(engine, "submit", recording)
    monkeypatch.setattr(engine, "on_step", slow_step)
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": 80, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live_server.base_url}/completions",
            json=body,
            headers={"Authorization": "Bearer test-key"},
            timeout=httpx.Timeout(5, read=0.2),
        )
    deadline = time.monotonic() + 10
    while (engine.stats.running or not handles[-1].cancelled) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handles[-1].cancelled and engine.stats.running == 0
    assert handles[-1].completion_tokens < 80


def test_bind_beyond_loopback_needs_keys() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_bind(ServeConfig(host="127.0.0.1"))
    check_bind(ServeConfig(host="0.0.0.0", api_keys=["k"]))
    with pytest.raises(UserError, match="api_keys"):
        check_bind(ServeConfig(host="0.0.0.0"))


def test_build_app_and_graceful_shutdown(base_cache: Path, serve_app) -> None:
    """build_app loads the named model; on shutdown the engine drains (/ready 503) while a running stream
    still ends with its last token and [DONE]; the engine stops afterwards."""
    cfg = SeektuneConfig(
        model={"cache_dir": str(base_cache), "base": TINY_RECIPE, "device": "cpu", "dtype": "float32"},
        serve={"served_model_name": "shut"},
    )
    app = build_app(cfg, "tiny-deepseek-v3", {})
    state = app.state.server
    observe = state.engine.on_step

    def slow_step(rows: int, tokens: int) -> None:  # a slower engine, so the stream outlives the signal
        observe(rows, tokens)
        time.sleep(0.01)

    state.engine.on_step = slow_step
    events: list[tuple[str, bool]] = []
    started = threading.Event()
    with serve_app(app, shutdown_timeout_s=20) as running:
        url = running.url
        assert httpx.get(f"{url}/ready").status_code == 200
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["shut"]

        def stream() -> None:
            body = {"model": "shut", "prompt": "The cat", "max_tokens": 90, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        events.append((line, state.draining))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
    # leaving the block signalled the server to exit and waited for it
    reader.join(30)
    assert not running.thread.is_alive()
    assert any(draining for _, draining in events[:-2])  # the stream went on after shutdown started
    assert events[-1][0] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2][0]
    assert not state.engine.stats.alive and state.engine.stats.draining
    with TestClient(app) as client:  # draining: not ready
        assert client.get("/ready").status_code == 503
