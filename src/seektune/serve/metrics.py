"""Prometheus metrics of the server, in a registry of their own (one per app, so apps in tests don't clash).

prometheus_client does the exposition; what is ours is which figures are kept and where they come from:
the app counts requests and their latencies (labelled by `model`, the name the client asked for, and
`version`, the served model that answered: the two differ behind an A/B split), the engine's `on_step`
hook feeds the batch size and the token rate, and the gauges read the engine's stats at scrape time.

    seektune_requests_total{model,version,endpoint,status}
    seektune_time_to_first_token_seconds{model,version}     histogram
    seektune_request_duration_seconds{model,version}        histogram
    seektune_prompt_tokens_total{model,version}
    seektune_output_tokens_total{model,version}
    seektune_output_tokens_per_second                       gauge, over the last `window_s` seconds
    seektune_queue_depth                                    gauge
    seektune_running_sequences                              gauge
    seektune_batch_size                                     histogram, one observation per decode step
    seektune_kv_cache_usage_ratio                           gauge, kv_tokens / kv_capacity
    seektune_feedback_records_total{kind,outcome}           response|feedback; stored|dropped|failed
    seektune_feedback_pending                               gauge, records waiting to be written
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The endpoints counted in seektune_requests_total (anything else: "other", to bound the label's values).
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/v1/admin/adapters": "admin",
    "/v1/admin/adapters/{name}": "admin",
    "/v1/feedback": "feedback",
}


class TokenRate:
    """Tokens per second over a sliding window of recent engine steps."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((self._clock(), tokens))
            self._trim()

    def rate(self) -> float:
        with self._lock:
            self._trim()
            return sum(tokens for _, tokens in self._events) / self.window_s

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class ServeMetrics:
    """The server's metrics; `observe_step` is the engine's `on_step` hook."""

    def __init__(self, stats: Callable[[], Any] | None = None, window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats = stats
        self.rate = TokenRate(window_s)
        labels = ["model", "version"]
        self.requests = Counter(
            "seektune_requests",
            "Requests answered, by public model name, served version, endpoint and HTTP status.",
            ["model", "version", "endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "seektune_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "seektune_request_duration_seconds",
            "Seconds from a generation request's arrival to its last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "seektune_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=self.registry
        )
        self.output_tokens = Counter(
            "seektune_output_tokens", "Generated tokens of finished requests.", labels, registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "seektune_output_tokens_per_second",
            f"Tokens generated per second over the last {window_s:g} seconds, all requests together.",
            registry=self.registry,
        )
        self.tokens_per_second.set_function(self.rate.rate)
        self.queue_depth = Gauge(
            "seektune_queue_depth", "Requests waiting for a place in the batch.", registry=self.registry
        )
        self.queue_depth.set_function(lambda: self._stat("queue_depth"))
        self.running = Gauge(
            "seektune_running_sequences",
            "Sequences (choices) in the running batch.",
            registry=self.registry,
        )
        self.running.set_function(lambda: self._stat("running"))
        self.batch_size = Histogram(
            "seektune_batch_size",
            "Sequences decoded together, one observation per engine step.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.kv_cache_usage = Gauge(
            "seektune_kv_cache_usage_ratio",
            "Tokens held in the KV cache over the engine's token budget (max_batch_tokens).",
            registry=self.registry,
        )
        self.kv_cache_usage.set_function(self._kv_usage)
        self.feedback_records = Counter(
            "seektune_feedback_records",
            "Records for the feedback store, by kind (response, feedback) and outcome (stored; dropped: "
            "the writer's queue was full; failed: the write failed).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.feedback_pending = Gauge(
            "seektune_feedback_pending",
            "Feedback-store records waiting to be written.",
            registry=self.registry,
        )
        self._feedback_pending: Callable[[], int] = lambda: 0
        self.feedback_pending.set_function(lambda: self._feedback_pending())

    def watch_feedback(self, pending: Callable[[], int]) -> None:
        """Read the feedback store's queue length at scrape time."""
        self._feedback_pending = pending

    def observe_feedback(self, kind: str, outcome: str) -> None:
        """The feedback store's on_outcome (called on the request's or the writer's thread)."""
        self.feedback_records.labels(kind, outcome).inc()

    def _stat(self, name: str) -> float:
        if self._stats is None:
            return 0.0
        return float(getattr(self._stats(), name))

    def _kv_usage(self) -> float:
        if self._stats is None:
            return 0.0
        stats = self._stats()
        return stats.kv_tokens / stats.kv_capacity if stats.kv_capacity else 0.0

    def observe_step(self, batch_size: int, new_tokens: int) -> None:
        """The engine's on_step: called on its thread after every step."""
        self.batch_size.observe(batch_size)
        self.rate.add(new_tokens)

    def observe_generation(
        self,
        model: str,
        version: str,
        prompt_tokens: int,
        output_tokens: int,
        first_token_s: float | None,
        duration_s: float,
    ) -> None:
        """One finished generation request."""
        self.prompt_tokens.labels(model, version).inc(prompt_tokens)
        self.output_tokens.labels(model, version).inc(output_tokens)
        if first_token_s is not None:
            self.time_to_first_token.labels(model, version).observe(first_token_s)
        self.request_duration.labels(model, version).observe(duration_s)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def set_request_labels(scope_state: Any, model: str, version: str) -> None:
    """Tell `RequestCountMiddleware` which model and version a request went to."""
    scope_state.metric_model = model
    scope_state.metric_version = version


class RequestCountMiddleware:
    """Counts every /v1 request with its final status (after the error handlers), and 500 for one that
    raised; the endpoint sets the model and version labels on `request.state`."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500
        scope.setdefault("state", {})  # shared with request.state, where the endpoint puts the labels

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = scope.get("route")
            endpoint = ENDPOINTS.get(getattr(route, "path", ""), "other")
            state = scope.get("state") or {}
            status = state.get("metric_status", status)  # 499: the client left before the answer
            self.metrics.requests.labels(
                state.get("metric_model", ""), state.get("metric_version", ""), endpoint, str(status)
            ).inc()
