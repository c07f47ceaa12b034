"""/metrics: the Prometheus exposition parses and holds every family, and the figures are the right ones."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from seektune.serve.metrics import ServeMetrics, TokenRate

FAMILIES = {
    "seektune_requests": "counter",
    "seektune_time_to_first_token_seconds": "histogram",
    "seektune_request_duration_seconds": "histogram",
    "seektune_prompt_tokens": "counter",
    "seektune_output_tokens": "counter",
    "seektune_output_tokens_per_second": "gauge",
    "seektune_queue_depth": "gauge",
    "seektune_running_sequences": "gauge",
    "seektune_batch_size": "histogram",
    "seektune_kv_cache_usage_ratio": "gauge",
}


def _scrape(url: str) -> dict:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _value(families: dict, sample_name: str, **labels: str) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    return sum(
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_parse_and_count_one_request(live_server) -> None:
    before = _scrape(live_server.url)
    reply = live_server.client().completions.create(
        model="tiny", prompt="The cat", max_tokens=7, temperature=0
    )
    httpx.post(f"{live_server.base_url}/completions", json={"model": "tiny"})  # a 401
    after = _scrape(live_server.url)
    for name, kind in FAMILIES.items():
        assert after[name].type == kind, name
    labels = {"model": "tiny", "version": "tiny"}

    def delta(sample: str, **extra: str) -> float:
        return _value(after, sample, **extra) - _value(before, sample, **extra)

    assert delta("seektune_requests_total", endpoint="completions", status="200", **labels) == 1
    assert delta("seektune_requests_total", endpoint="completions", status="401") == 1
    assert delta("seektune_output_tokens_total", **labels) == reply.usage.completion_tokens == 7
    assert delta("seektune_prompt_tokens_total", **labels) == reply.usage.prompt_tokens
    assert delta("seektune_time_to_first_token_seconds_count", **labels) == 1
    assert delta("seektune_request_duration_seconds_count", **labels) == 1
    assert delta("seektune_request_duration_seconds_sum", **labels) >= delta(
        "seektune_time_to_first_token_seconds_sum", **labels
    )
    assert delta("seektune_batch_size_count") >= 7  # one observation per engine step
    assert _value(after, "seektune_output_tokens_per_second") > 0  # tokens in the last 10 s
    idle = {"seektune_queue_depth": 0, "seektune_running_sequences": 0, "seektune_kv_cache_usage_ratio": 0}
    for name, value in idle.items():
        assert _value(after, name) == value


def test_a_client_that_left_is_counted_as_499(live_server) -> None:
    before = _scrape(live_server.url)
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": 80, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {live_server.api_key}"}
    with httpx.stream("POST", f"{live_server.base_url}/completions", json=body, headers=headers) as response:
        next(response.iter_lines())
    for _ in range(200):
        after = _scrape(live_server.url)
        if _value(after, "seektune_requests_total", status="499") > _value(
            before, "seektune_requests_total", status="499"
        ):
            break
        time.sleep(0.02)
    assert _value(after, "seektune_requests_total", status="499", endpoint="completions") == (
        _value(before, "seektune_requests_total", status="499", endpoint="completions") + 1
    )


def test_gauges_read_the_engine_stats() -> None:
    stats = SimpleNamespace(queue_depth=3, running=5, kv_tokens=250, kv_capacity=1000)
    metrics = ServeMetrics(stats=lambda: stats)
    metrics.observe_step(4, 4)
    metrics.observe_step(1, 1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}

    def one(name: str, sample: str | None = None, **labels: str) -> float:
        (value,) = [
            s.value
            for s in families[name].samples
            if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return value

    assert one("seektune_queue_depth") == 3
    assert one("seektune_running_sequences") == 5
    assert one("seektune_kv_cache_usage_ratio") == 0.25
    assert one("seektune_batch_size", "seektune_batch_size_count") == 2
    assert one("seektune_batch_size", "seektune_batch_size_bucket", le="1.0") == 1
    assert one("seektune_batch_size", "seektune_batch_size_bucket", le="4.0") == 2
    assert one("seektune_batch_size", "seektune_batch_size_sum") == 5
    # each app has its own registry: a second one starts from zero
    assert "seektune_batch_size_count 0.0" in ServeMetrics().exposition()[0].decode()


def test_token_rate_counts_the_recent_window_only() -> None:
    now = [100.0]
    rate = TokenRate(window_s=10, clock=lambda: now[0])
    rate.add(50)
    now[0] = 105
    rate.add(30)
    assert rate.rate() == 8.0  # 80 tokens / 10 s
    now[0] = 112  # the first step left the window
    assert rate.rate() == 3.0
    now[0] = 200
    assert rate.rate() == 0.0
