"""The OpenAI-compatible HTTP app: FastAPI routes around the continuous-batching engine.

FastAPI serves; the engine (`seektune.serve.engine`) generates. What is here is the part between them that
no library does for us: turning an OpenAI request into token ids and `SamplingParams` (the chat template,
the four prompt shapes of /v1/completions), refusing what is over the server's limits before it reaches
the engine, routing the `model` name (base, adapter, A/B split), and turning the engine's per-choice
deltas back into OpenAI responses and server-sent events. A client that goes away has its generation
cancelled: a stream's generator is cancelled by Starlette on disconnect, a non-streamed request watches
for the disconnect while it waits.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (the process
lives), GET /ready (the engine runs and the server is not draining), GET /metrics (Prometheus), and for
admin keys POST /v1/admin/adapters {name, path} and DELETE /v1/admin/adapters/{name}. With
serve.feedback.enabled, every finished choice is recorded in the feedback store (`seektune.serve.feedback`:
queued, never waited for) and POST /v1/feedback {response_id, index, rating, correction, comment, user}
attaches a user's verdict to it. /health, /ready and /metrics need no key. A response's `model` is the
name the client asked for; the header
`x-seektune-version` names the served model that answered (they differ behind an A/B split).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from seektune.config import ServeConfig
from seektune.errors import UserError
from seektune.serve import protocol
from seektune.serve.adapters import AdapterError, AdapterSet
from seektune.serve.auth import admin_key_check, api_key_check
from seektune.serve.engine import ChoiceDelta, GenerationHandle, QueueFull, RequestTooLarge, SamplingParams
from seektune.serve.errors import (
    APIError,
    BodyLimitMiddleware,
    CatchAllMiddleware,
    error_body,
    install_error_handlers,
    parse_body,
)
from seektune.serve.feedback import FeedbackRecord, FeedbackStore, ResponseRecord, StoreFull, new_feedback_id
from seektune.serve.metrics import RequestCountMiddleware, ServeMetrics, set_request_labels
from seektune.serve.routing import Route, Router

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-seektune-version"
_CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned (counted, never sent)


@dataclass
class ServedModels:
    """What the app serves: the base under `base_name` and the adapters on it (None: a fresh, empty
    `AdapterSet` on the engine, which the admin endpoint can fill when serve.adapter_dir is set)."""

    base_name: str
    adapters: AdapterSet | None = None


@dataclass
class ServerState:
    """Shared by the routes: set `draining` when shutdown starts (/ready turns 503)."""

    engine: Any
    tokenizer: Any
    cfg: ServeConfig
    router: Router
    adapters: AdapterSet
    metrics: ServeMetrics
    max_positions: int | None
    vocab_size: int
    feedback: FeedbackStore | None = None
    created: int = field(default_factory=protocol.now)
    draining: bool = False


def create_app(
    engine: Any,
    tokenizer: Any,
    cfg: ServeConfig,
    served: ServedModels,
    *,
    seed: int = 0,
    manage_engine: bool = True,
) -> FastAPI:
    """The app on a built engine. With `manage_engine` the app's lifespan starts the engine and, at
    shutdown, stops it (after uvicorn let the running requests finish)."""
    adapters = served.adapters
    if adapters is None:
        adapters = AdapterSet(engine, served.base_name, cfg.adapter_dir)
    router = Router(served.base_name, lambda: adapters.names, cfg.ab, seed=seed)
    metrics = ServeMetrics(stats=lambda: engine.stats)
    engine.on_step = metrics.observe_step
    model_config = getattr(engine.model, "config", None)
    max_positions = getattr(engine, "max_positions", None) or getattr(
        model_config, "max_position_embeddings", None
    )
    state = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        cfg=cfg,
        router=router,
        adapters=adapters,
        metrics=metrics,
        max_positions=max_positions,
        vocab_size=int(getattr(engine, "vocab_size", None) or len(tokenizer)),
        feedback=_open_feedback(cfg, metrics),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        yield
        state.draining = True
        if manage_engine:
            await asyncio.to_thread(engine.stop, cfg.shutdown_timeout_s)
        if state.feedback is not None:  # after the engine: the last requests' records are queued by now
            await asyncio.to_thread(state.feedback.close)

    app = FastAPI(title="seektune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    # Each one added wraps the ones before: the catch-all 500 outermost, then request counting, then the
    # body limit (before anything parses the body).
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.limits.max_body_bytes)
    app.add_middleware(RequestCountMiddleware, metrics=metrics)
    app.add_middleware(CatchAllMiddleware)
    _add_routes(app, state)
    return app


def _open_feedback(cfg: ServeConfig, metrics: ServeMetrics) -> FeedbackStore | None:
    """The feedback store when serve.feedback.enabled (a UserError when its file cannot be used)."""
    if not cfg.feedback.enabled:
        return None
    from seektune.serve.feedback import default_feedback_store

    path = cfg.feedback.store or default_feedback_store()
    store = FeedbackStore(
        path, cfg.feedback.privacy, cfg.feedback.max_pending, on_outcome=metrics.observe_feedback
    )
    metrics.watch_feedback(lambda: store.pending)
    logger.info("recording answers and feedback in %s", store.path)
    return store


def _add_routes(app: FastAPI, state: ServerState) -> None:
    api = Depends(api_key_check(state.cfg.api_keys, state.cfg.admin_keys))
    admin = Depends(admin_key_check(state.cfg.api_keys, state.cfg.admin_keys))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        stats = state.engine.stats
        if state.draining or stats.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not stats.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[api])
    async def models() -> dict[str, Any]:
        router = state.router
        names: list[tuple[str, str | None]] = [(router.base_name, None)]
        names += [(name, router.base_name) for name in router.adapters()]
        names += [(name, None) for name in router.split_names]
        return protocol.model_list(names, state.created)

    @app.post("/v1/chat/completions", dependencies=[api])
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), protocol.ChatCompletionRequest)
        return await _chat(request, state, body)

    @app.post("/v1/completions", dependencies=[api])
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), protocol.CompletionRequest)
        return await _completions(request, state, body)

    @app.post("/v1/feedback", dependencies=[api])
    async def feedback(request: Request) -> JSONResponse:
        store = state.feedback
        if store is None:
            raise APIError(
                404,
                "this server does not record feedback: start it with serve.feedback.enabled: true",
                code="feedback_disabled",
            )
        body = parse_body(await request.body(), protocol.FeedbackRequest)
        if body.rating is None and body.correction is None and body.comment is None:
            raise APIError(400, "send a rating (-1, 0 or 1), a correction or a comment", param="rating")
        if body.correction is not None and not body.correction.strip():
            raise APIError(
                400, "correction is blank: send the answer the model should have given", param="correction"
            )
        choices = await asyncio.to_thread(store.choices_of, body.response_id)
        if choices is None:
            raise APIError(
                404,
                f"no response {body.response_id!r} was recorded by this server: send the 'id' of a chat or "
                "completion response it gave while recording",
                param="response_id",
                code="response_not_found",
            )
        if body.index >= choices:
            raise APIError(
                400,
                f"response {body.response_id!r} has {choices} choice(s); index {body.index} is not one",
                param="index",
            )
        record = FeedbackRecord(
            new_feedback_id(),
            body.response_id,
            body.index,
            body.rating,
            body.correction,
            body.comment,
            body.user,
        )
        try:
            store.record_feedback(record)
        except StoreFull as exc:
            raise APIError(
                503,
                f"the feedback store is busy ({exc}): send it again",
                code="feedback_busy",
                headers={"Retry-After": "1"},
            ) from None
        return JSONResponse(
            {
                "id": record.id,
                "object": "feedback",
                "response_id": record.response_id,
                "index": record.choice,
                "created": int(record.created),
            },
            status_code=201,
        )

    @app.post("/v1/admin/adapters", dependencies=[admin])
    async def load_adapter(request: Request) -> JSONResponse:
        body = parse_body(await request.body(), protocol.LoadAdapterRequest)
        if body.name in state.router.served_names():
            raise APIError(409, f"a model named {body.name!r} is already served", param="name")
        try:
            await asyncio.to_thread(state.adapters.load, body.name, body.path, True)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), param="path" if exc.status in (403, 404) else None) from None
        except UserError as exc:
            raise APIError(400, str(exc), param="path") from None
        return JSONResponse({"id": body.name, "object": "model", "loaded": True}, status_code=201)

    @app.delete("/v1/admin/adapters/{name}", dependencies=[admin])
    async def unload_adapter(name: str) -> dict[str, Any]:
        splits = state.router.uses(name)
        if splits and name in state.adapters.names:
            raise APIError(
                409, f"adapter {name!r} is a version of the A/B split(s) {splits}: it stays loaded"
            )
        try:
            await asyncio.to_thread(state.adapters.unload, name)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc)) from None
        return {"id": name, "object": "model", "deleted": True}


# ---------------------------------------------------------------------------------------------------------
# From a request to the engine


@dataclass
class _Job:
    """One request, ready to submit: one prompt per engine submission (completions may send several)."""

    route: Route
    prompts: list[list[int]]
    params: SamplingParams
    arrived: float
    echo_texts: list[str] | None = None  # completions echo: the prompt texts
    user: str | None = None
    recorded_prompts: list[Any] = field(default_factory=list)  # for the feedback store: messages or texts


def _check_params(state: ServerState, body: Any, prompts: list[list[int]], echo: bool) -> SamplingParams:
    """SamplingParams within the server's limits, or a 400 that says which limit."""
    limits = state.cfg.limits
    n = body.n if body.n is not None else 1
    if n > limits.max_n:
        raise APIError(400, f"n is {n}, above this server's limit of {limits.max_n}", param="n")
    stop = body.stop_list()
    if len(stop) > 4:
        raise APIError(400, f"stop has {len(stop)} strings; at most 4 are allowed", param="stop")
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {longest} tokens, above this server's limit of {limits.max_prompt_tokens}: "
            "send a shorter prompt",
            param="messages" if hasattr(body, "messages") else "prompt",
            code="context_length_exceeded",
        )
    room = state.max_positions - longest if state.max_positions else None
    if room is not None and room <= 0:
        raise APIError(
            400,
            f"the prompt has {longest} tokens; the model's context is {state.max_positions} tokens",
            code="context_length_exceeded",
        )
    asked = body.requested_max_tokens()
    newer = getattr(body, "max_completion_tokens", None) is not None
    param = "max_completion_tokens" if newer else "max_tokens"
    if asked is None:
        max_tokens = limits.default_max_tokens if room is None else min(limits.default_max_tokens, room)
    else:
        if asked < 0:
            raise APIError(400, f"{param} must be >= 0, got {asked}", param=param)
        if asked == 0 and not echo:
            raise APIError(400, f"{param} must be at least 1 (0 only with echo)", param=param)
        if asked > limits.max_tokens:
            raise APIError(
                400, f"{param} is {asked}, above this server's limit of {limits.max_tokens}", param=param
            )
        if room is not None and asked > room:
            raise APIError(
                400,
                f"the prompt ({longest} tokens) plus {param} ({asked}) is over the model's context of "
                f"{state.max_positions} tokens: lower {param} or shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = asked
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        stop=stop,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        n=n,
        ignore_eos=bool(body.ignore_eos),
    )


def _chat_prompt(tokenizer: Any, messages: list[protocol.ChatMessage]) -> list[int]:
    """Token ids of the chat template applied to `messages`, with the generation prompt."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        encoded = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja's TemplateError ("roles must alternate", raise_exception in templates)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise APIError(
            400, f"the model's chat template refused the messages: {first}", param="messages"
        ) from None
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):  # transformers 5: a BatchEncoding
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _completion_prompts(state: ServerState, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of OpenAI's four prompt shapes: str, [str], [int], [[int]]."""
    tokenizer = state.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    most = state.cfg.limits.max_queue  # more could never all be queued: a 429 for ever
    if len(prompt) > most:
        raise APIError(
            400,
            f"the request has {len(prompt)} prompts, above this server's limit of {most} per request: "
            "send them in several requests",
            param="prompt",
        )
    ids: list[list[int]] = []
    texts: list[str] = []
    for item in prompt:
        if isinstance(item, str):
            try:
                tokens = list(tokenizer(item, add_special_tokens=True)["input_ids"])
            except Exception:  # e.g. a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
                raise APIError(
                    400, "the prompt is not valid Unicode text (a lone surrogate?)", param="prompt"
                ) from None
            text = item
        else:
            bad = [t for t in item if not 0 <= t < state.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                    param="prompt",
                )
            tokens = list(item)
            text = tokenizer.decode(tokens)
        if not tokens and tokenizer.bos_token_id is not None:
            tokens = [int(tokenizer.bos_token_id)]
        if not tokens:
            raise APIError(400, "a prompt is empty: send at least one token", param="prompt")
        ids.append(tokens)
        texts.append(text)
    return ids, texts


async def _chat(request: Request, state: ServerState, body: protocol.ChatCompletionRequest) -> Response:
    arrived = time.perf_counter()
    route = _route(request, state, body.model, body.user)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = await asyncio.to_thread(_chat_prompt, state.tokenizer, body.messages)
    params = _check_params(state, body, [prompt], echo=False)
    if body.logprobs:
        params.logprobs = body.top_logprobs or 0
    job = _Job(route, [prompt], params, arrived, user=body.user)
    if state.feedback is not None:
        job.recorded_prompts = [{"role": m.role, "content": m.text()} for m in body.messages]
    handles = _submit(state, job)
    request_id = protocol.new_id("chatcmpl")
    headers = {VERSION_HEADER: route.version}
    if body.stream:
        stream = _chat_stream(request, state, job, handles, request_id, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    choices, completion_tokens = await _collect(request, state, job, handles)
    _record(state, request_id, "chat", job, [(c.text, c.finish_reason) for c in choices])
    payload = protocol.chat_response(
        request_id,
        route.public,
        protocol.now(),
        [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": protocol.chat_logprobs(c.logprobs) if params.logprobs is not None else None,
            }
            for c in choices
        ],
        sum(len(p) for p in job.prompts),
        completion_tokens,
    )
    return JSONResponse(payload, headers=headers)


async def _completions(request: Request, state: ServerState, body: protocol.CompletionRequest) -> Response:
    arrived = time.perf_counter()
    route = _route(request, state, body.model, body.user)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of other than n is not supported by this server", param="best_of")
    prompts, texts = await asyncio.to_thread(_completion_prompts, state, body.prompt)
    echo = bool(body.echo)
    params = _check_params(state, body, prompts, echo=echo)
    params.logprobs = body.logprobs
    params.echo_logprobs = echo and body.logprobs is not None
    job = _Job(route, prompts, params, arrived, echo_texts=texts if echo else None, user=body.user)
    job.recorded_prompts = texts
    handles = _submit(state, job)
    request_id = protocol.new_id("cmpl")
    headers = {VERSION_HEADER: route.version}
    if body.stream:
        stream = _completion_stream(request, state, job, handles, request_id, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    choices, completion_tokens = await _collect(request, state, job, handles)
    _record(state, request_id, "completion", job, [(c.text, c.finish_reason) for c in choices])
    out = []
    for c in choices:
        text, logprobs = c.text, None
        prompt_index = c.index // params.n
        if params.logprobs is not None:
            legacy = protocol.CompletionLogprobs()
            if echo:
                _add_prompt_logprobs(state, legacy, job.prompts[prompt_index], handles[prompt_index])
            for entry in c.logprobs:
                legacy.add(entry)
            logprobs = legacy.to_dict()
        if echo:
            text = texts[prompt_index] + text
        out.append({"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs})
    payload = protocol.completion_response(
        request_id, route.public, protocol.now(), out, sum(len(p) for p in prompts), completion_tokens
    )
    return JSONResponse(payload, headers=headers)


def _record(
    state: ServerState, request_id: str, endpoint: str, job: _Job, outputs: list[tuple[str, str | None]]
) -> None:
    """Queue a finished request for the feedback store, when it records (never waits)."""
    if state.feedback is None:
        return
    state.feedback.record_response(
        ResponseRecord(
            request_id,
            endpoint,
            job.route.public,
            job.route.version,
            job.user,
            job.recorded_prompts,
            outputs,
            n=job.params.n,
        )
    )


def _route(request: Request, state: ServerState, model: str, user: str | None) -> Route:
    # Labelled only once resolved: a client's unknown names must not grow the metrics without bound.
    route = state.router.resolve(model, user)
    set_request_labels(request.state, route.public, route.version)
    return route


def _submit(state: ServerState, job: _Job) -> list[GenerationHandle]:
    """One engine submission per prompt; all or none (the ones submitted are cancelled on a refusal)."""
    handles: list[GenerationHandle] = []
    try:
        for prompt in job.prompts:
            handles.append(state.engine.submit(prompt, job.params, job.route.adapter))
    except QueueFull as exc:
        for handle in handles:
            handle.cancel()
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        draining = state.draining or state.engine.stats.draining
        raise APIError(
            503 if draining else 429,
            str(exc),
            code="server_shutting_down" if draining else "queue_full",
            headers={"Retry-After": retry},
        ) from None
    except RequestTooLarge as exc:
        for handle in handles:
            handle.cancel()
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    return handles


# ---------------------------------------------------------------------------------------------------------
# From the engine back to the client


class _Merged:
    """The deltas of several handles as they come, tagged with the handle's position."""

    def __init__(self, handles: list[GenerationHandle]) -> None:
        self._queue: asyncio.Queue[tuple[int, ChoiceDelta | None]] = asyncio.Queue()
        self._remaining = len(handles)
        self._tasks = [asyncio.create_task(self._pump(i, h)) for i, h in enumerate(handles)]

    async def _pump(self, position: int, handle: GenerationHandle) -> None:
        try:
            async for delta in handle:
                self._queue.put_nowait((position, delta))
        finally:
            self._queue.put_nowait((position, None))

    async def next(self) -> tuple[int, ChoiceDelta] | None:
        while self._remaining:
            position, delta = await self._queue.get()
            if delta is None:
                self._remaining -= 1
                continue
            return position, delta
        return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


@dataclass
class _Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)


class _Progress:
    """Timing and token counts of one request, for metrics and usage."""

    def __init__(self, state: ServerState, job: _Job, handles: list[GenerationHandle]) -> None:
        self.state = state
        self.job = job
        self.handles = handles
        self.first_token_s: float | None = None
        self.finished = False
        self.error: str | None = None

    def saw(self, delta: ChoiceDelta) -> None:
        if self.first_token_s is None and delta.token_ids:
            self.first_token_s = time.perf_counter() - self.job.arrived

    @property
    def completion_tokens(self) -> int:
        return sum(h.completion_tokens for h in self.handles)

    def close(self) -> None:
        """Cancel what still runs (a client that left) and record the request's metrics."""
        for handle in self.handles:
            handle.cancel()
        self.state.metrics.observe_generation(
            self.job.route.public,
            self.job.route.version,
            sum(len(p) for p in self.job.prompts),
            self.completion_tokens,
            self.first_token_s,
            time.perf_counter() - self.job.arrived,
        )


async def _watch_disconnect(request: Request, handles: list[GenerationHandle]) -> None:
    """Cancel the handles when the client disconnects (the body has been read: only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for handle in handles:
                handle.cancel()
            return


async def _collect(
    request: Request, state: ServerState, job: _Job, handles: list[GenerationHandle]
) -> tuple[list[_Choice], int]:
    """Every choice's text (non-streamed), choices indexed prompt * n + choice."""
    n = job.params.n
    choices = [_Choice(index=i) for i in range(len(handles) * n)]
    progress = _Progress(state, job, handles)
    merged = _Merged(handles)
    watcher = asyncio.create_task(_watch_disconnect(request, handles))
    try:
        while (item := await merged.next()) is not None:
            position, delta = item
            progress.saw(delta)
            choice = choices[position * n + delta.index]
            choice.text += delta.text
            choice.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason
    finally:
        watcher.cancel()
        merged.close()
        progress.close()
    failed = [h for h in handles if h.error]
    if failed:
        raise _generation_error(failed[0])
    if any(c.finish_reason == "abort" for c in choices):
        if watcher.done() and not watcher.cancelled():  # the client left: nobody reads the answer
            request.state.metric_status = _CLIENT_CLOSED
        raise APIError(503, "the generation was aborted (server shutting down)", code="aborted")
    return choices, progress.completion_tokens


def _generation_error(handle: GenerationHandle) -> APIError:
    """What the engine failed a request for, as the client's error (an unloaded adapter is a 404)."""
    if handle.error_status == 404:
        return APIError(404, str(handle.error), param="model", code="model_not_found")
    return APIError(500, f"generation failed: {handle.error}", code="generation_failed")


def _error_event(handle: GenerationHandle) -> str:
    """The stream's error event (sent, then [DONE]) for a request the engine failed."""
    error = _generation_error(handle)
    return protocol.sse(error_body(error.message, error.type, error.param, error.code))


class _StreamedOutputs:
    """A stream's choices as they come, for the feedback store (kept only when it records)."""

    def __init__(self, state: ServerState, choices: int) -> None:
        self.state = state
        self.on = state.feedback is not None
        self.texts = [""] * choices if self.on else []
        self.finish: list[str | None] = [None] * choices if self.on else []

    def add(self, index: int, delta: ChoiceDelta) -> None:
        if self.on:
            self.texts[index] += delta.text
            if delta.finish_reason is not None:
                self.finish[index] = delta.finish_reason

    def record(self, request_id: str, endpoint: str, job: _Job) -> None:
        """Record the whole stream (not when the server aborted a choice at shutdown)."""
        if self.on and "abort" not in self.finish:
            _record(self.state, request_id, endpoint, job, list(zip(self.texts, self.finish, strict=True)))


async def _chat_stream(
    request: Request,
    state: ServerState,
    job: _Job,
    handles: list[GenerationHandle],
    request_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """chat.completion.chunk events: per choice the role, then the content, then the finish reason."""
    model, created, n = job.route.public, protocol.now(), job.params.n
    progress = _Progress(state, job, handles)
    merged = _Merged(handles)
    with_logprobs = job.params.logprobs is not None
    completed = False
    outputs = _StreamedOutputs(state, len(handles) * n)
    try:
        for index in range(len(handles) * n):
            yield protocol.sse(
                protocol.chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""})
            )
        while (item := await merged.next()) is not None:
            position, delta = item
            progress.saw(delta)
            index = position * n + delta.index
            if delta.finish_reason == "error":
                yield _error_event(handles[position])
                break
            outputs.add(index, delta)
            if delta.text or delta.logprobs:
                logprobs = protocol.chat_logprobs(delta.logprobs) if with_logprobs else None
                yield protocol.sse(
                    protocol.chat_chunk(
                        request_id, model, created, index, {"content": delta.text}, logprobs=logprobs
                    )
                )
            if delta.finish_reason is not None:
                yield protocol.sse(
                    protocol.chat_chunk(request_id, model, created, index, {}, delta.finish_reason)
                )
        else:
            outputs.record(request_id, "chat", job)
            if include_usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        request_id,
                        model,
                        created,
                        "chat.completion.chunk",
                        sum(len(p) for p in job.prompts),
                        progress.completion_tokens,
                    )
                )
        yield protocol.SSE_DONE
        completed = True
    finally:
        if not completed:  # cancelled by Starlette on disconnect, or closed unread
            request.state.metric_status = _CLIENT_CLOSED
        merged.close()
        progress.close()


async def _completion_stream(
    request: Request,
    state: ServerState,
    job: _Job,
    handles: list[GenerationHandle],
    request_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """text_completion events; with echo, a choice's first event carries its prompt."""
    model, created, n = job.route.public, protocol.now(), job.params.n
    progress = _Progress(state, job, handles)
    merged = _Merged(handles)
    with_logprobs = job.params.logprobs is not None
    completed = False
    started: set[int] = set()
    legacy: dict[int, protocol.CompletionLogprobs] = {}
    outputs = _StreamedOutputs(state, len(handles) * n)
    try:
        while (item := await merged.next()) is not None:
            position, delta = item
            progress.saw(delta)
            index = position * n + delta.index
            if delta.finish_reason == "error":
                yield _error_event(handles[position])
                break
            outputs.add(index, delta)
            text = delta.text
            logs = legacy.setdefault(index, protocol.CompletionLogprobs())
            if index not in started:
                started.add(index)
                if job.echo_texts is not None:
                    text = job.echo_texts[position] + text
                    if with_logprobs:
                        _add_prompt_logprobs(state, logs, job.prompts[position], handles[position])
            for entry in delta.logprobs:
                logs.add(entry)
            if text or delta.logprobs or delta.finish_reason is not None:
                yield protocol.sse(
                    protocol.completion_chunk(
                        request_id,
                        model,
                        created,
                        index,
                        text,
                        delta.finish_reason,
                        logs.take() if with_logprobs else None,
                    )
                )
        else:
            outputs.record(request_id, "completion", job)
            if include_usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        request_id,
                        model,
                        created,
                        "text_completion",
                        sum(len(p) for p in job.prompts),
                        progress.completion_tokens,
                    )
                )
        yield protocol.SSE_DONE
        completed = True
    finally:
        if not completed:  # cancelled by Starlette on disconnect, or closed unread
            request.state.metric_status = _CLIENT_CLOSED
        merged.close()
        progress.close()


def _add_prompt_logprobs(
    state: ServerState, logs: protocol.CompletionLogprobs, prompt: list[int], handle: GenerationHandle
) -> None:
    """The echoed prompt's tokens and log-probabilities (the first token has none)."""
    entries = handle.prompt_logprobs or [None] * len(prompt)
    for token_id, entry in zip(prompt, entries, strict=False):
        logs.add(entry, token=state.tokenizer.decode([token_id]) if entry is None else None)
