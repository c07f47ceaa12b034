"""The serving engine: continuous batching over the model's own KV cache, one thread, one batch.

Concurrent requests share forward passes. Between two decode steps a waiting sequence joins the running
batch (its prompt is prefilled and its cache concatenated onto the batch's) and a finished or cancelled one
leaves it (its rows are dropped from the cache), so nobody waits for the slowest request of a batch.

Why our own scheduler rather than transformers' continuous batching (`generate_batch`, paged attention):
that one fails on DeepSeek-V2/V3's multi-head latent attention (its paged cache assumes keys and values of
one head size; measured on transformers 5.23: `index_copy_(): Source/destination tensor must have same slice
shapes`), and it cannot give each request its own LoRA adapter. This engine keeps what every causal LM in
transformers already has, a `DynamicCache` and a padding mask, and lays the rows of the batch out
left-padded to a common length (the layout of the first TGI engine):

    cache keys/values, per layer  [rows, heads, T, head_dim]   (MLA's key and value sizes may differ)
    attention_mask                [rows, T]      1 where a row has a token, 0 for its left padding
    lengths                       [rows]         tokens in each row's cache = position of its next token

A decode step feeds each row's last token at position `lengths[row]` with the mask extended by one column,
so every row attends to exactly its own tokens and the outputs equal one-by-one generation (up to float
rounding of the different batch shape). Joining left-pads the shorter of the two caches; leaving selects the
remaining rows and trims the columns that became all padding. Requests are admitted first come, first
served while the batch has room in rows (`max_batch_size`) and in KV tokens (`max_batch_tokens`: each
sequence reserves its prompt plus its max_tokens, so a running sequence is never evicted).

Sampling (temperature, top-p, seed, OpenAI's presence/frequency penalties, log-probabilities), stop strings
and incremental detokenisation are done here per row, since they decide when a row leaves the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from seektune.config import ServeLimitsConfig
from seektune.errors import UserError

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def peft_name(served: str) -> str:
    """The name an adapter served as `served` has inside PEFT, whose adapter names become module names
    and may hold no '.' (registered versions are served as e.g. qa@1.2.0): the served name with every
    other character than letters, digits, '_' and '-' made '_', and a short hash against collisions."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", served):
        return served
    digest = hashlib.sha256(served.encode(errors="surrogatepass")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', served)}_{digest}"


# ---------------------------------------------------------------------------------------------------------
# What callers see


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    """How one request is generated (OpenAI's parameters, validated by the app before submitting)."""

    max_tokens: int
    temperature: float = 1.0  # 0 (below GREEDY_BELOW): greedy
    top_p: float = 1.0
    seed: int | None = None  # choice i samples with its own generator seeded seed + i
    stop: list[str] = field(default_factory=list)  # stop strings; the output ends before them
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    n: int = 1
    echo_logprobs: bool = False  # also the log-probabilities of the prompt tokens

    @property
    def greedy(self) -> bool:
        # A temperature this small is greedy in all but name; dividing by it overflows float32 logits to
        # inf, and sampling from NaNs would fail the whole batch.
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenLogprob:
    """The log-probability of one token (under the model's raw distribution) and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """What one choice produced in one step; `finish_reason` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"


class QueueFull(Exception):
    """The waiting queue is full (or the engine is draining): the app answers 429 / 503."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(ValueError):
    """A request that could never fit in the batch (prompt + max_tokens above the KV budget)."""


@dataclass
class EngineStats:
    """A snapshot for /metrics and /ready."""

    queue_depth: int
    running: int  # sequences (rows) in the batch
    kv_tokens: int  # tokens held in the cache by the running rows
    kv_reserved: int  # tokens the running rows may grow to
    kv_capacity: int  # limits.max_batch_tokens
    steps: int  # decode steps so far
    generated_tokens: int
    alive: bool
    draining: bool


class GenerationHandle:
    """One submitted request: iterate it (in the asyncio loop that submitted it) for its deltas."""

    def __init__(
        self, request_id: str, prompt_tokens: int, version: str, n: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.version = version
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.completion_tokens = 0
        self.first_token_s: float | None = None
        self.error: str | None = None  # why the engine failed the request
        self.error_status = 500  # the HTTP status for `error`: 404 for an adapter unloaded meanwhile
        self.submitted = time.perf_counter()
        self._n = n
        self._loop = loop
        self._queue: asyncio.Queue[ChoiceDelta] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the engine frees the rows at its next step. Safe from any thread."""
        self._cancelled.set()

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        finished: set[int] = set()  # by choice: a failing step may finish a finished choice again
        while len(finished) < self._n:
            delta = await self._queue.get()
            if delta.finish_reason is not None:
                if delta.index in finished:
                    continue
                finished.add(delta.index)
            yield delta


def _deliver(items: list[tuple[GenerationHandle, ChoiceDelta]]) -> None:  # in the handles' asyncio loop
    for handle, delta in items:
        handle._queue.put_nowait(delta)


def _send(items: list[tuple[GenerationHandle, ChoiceDelta]]) -> None:
    """Hand deltas to the asyncio loops of their handles: one wake-up per loop for a whole decode step, not
    one per token (a cross-thread call writes to the loop's self-pipe: with 32 rows that was 32 writes and
    32 wake-ups of the server's loop per step)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, ChoiceDelta]]] = {}
    for handle, delta in items:
        by_loop.setdefault(handle._loop, []).append((handle, delta))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for handle, _ in batch:
                handle.cancel()


# ---------------------------------------------------------------------------------------------------------
# Per-sequence state


class _Detokenizer:
    """Incremental decoding that never emits half a character (byte-level BPE splits CJK characters).

    The text of the new tokens is the decoding of a short window of ids minus the decoding of its head,
    as in TGI and vLLM; a few prompt ids seed the window so a leading space is decoded right.
    """

    MAX_HELD = 8  # tokens held back at most while their bytes form no complete character

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        new_text = decode(self._ids[self._prefix :], skip_special_tokens=True)
        # A model that keeps making bytes that form no character gets them as U+FFFD after a few tokens,
        # rather than an ever longer window decoded at every step.
        complete = not new_text.endswith("\ufffd") or len(self._ids) - self._read > self.MAX_HELD
        if len(new_text) > len(prefix_text) and complete:
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is held back (an incomplete character, as U+FFFD), when the sequence ends at its length."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        new_text = decode(self._ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class _StopMatcher:
    """Stop strings over the streamed text: holds back a tail that could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """The text that may be sent now, and whether a stop string was met."""
        self.text += delta
        if not self._stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        start = max(0, self.sent - self._longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent : end] if end > self.sent else ""
            self.text, self.sent = self.text[:end], end
            return out, True
        hold = 0
        for size in range(1, min(self._longest, len(self.text) - self.sent) + 1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                hold = size
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class _Request:
    def __init__(
        self, handle: GenerationHandle, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> None:
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter

    @property
    def reserve(self) -> int:
        """KV tokens its sequences may grow to."""
        return self.params.n * (len(self.prompt_ids) + self.params.max_tokens)


class _Sequence:
    """One choice of a request: one row of the batch."""

    def __init__(self, request: _Request, index: int, tokenizer: Any, vocab_size: int) -> None:
        self.request = request
        self.index = index
        params = request.params
        self.generated: list[int] = []
        self.detok = _Detokenizer(tokenizer, request.prompt_ids)
        self.stops = _StopMatcher(params.stop)
        self.generator: torch.Generator | None = None
        if not params.greedy and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        penalised = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.counts = torch.zeros(vocab_size) if penalised else None
        self.finished: str | None = None

    @property
    def adapter_name(self) -> str:
        return peft_name(self.request.adapter) if self.request.adapter else BASE_ADAPTER


# ---------------------------------------------------------------------------------------------------------
# The batch: rows left-padded to a common length


@dataclass
class _Batch:
    rows: list[_Sequence]
    cache: Any  # DynamicCache
    mask: torch.Tensor  # [rows, T] long
    lengths: torch.Tensor  # [rows] long
    last: torch.Tensor  # [rows] long: each row's newest token, fed at the next step


def _cache_layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


def _merge(a: _Batch | None, b: _Batch) -> _Batch:
    """`b`'s rows appended to `a`'s, the shorter cache left-padded."""
    if a is None:
        return b
    length = max(a.mask.shape[1], b.mask.shape[1])
    for layer_a, layer_b in zip(_cache_layers(a.cache), _cache_layers(b.cache), strict=True):
        layer_a.keys = torch.cat([_pad_left(layer_a.keys, length, -2), _pad_left(layer_b.keys, length, -2)])
        layer_a.values = torch.cat(
            [_pad_left(layer_a.values, length, -2), _pad_left(layer_b.values, length, -2)]
        )
    return _Batch(
        rows=a.rows + b.rows,
        cache=a.cache,
        mask=torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)]),
        lengths=torch.cat([a.lengths, b.lengths]),
        last=torch.cat([a.last, b.last]),
    )


def _keep(batch: _Batch, keep: list[int]) -> _Batch | None:
    """Only the rows at `keep`, with the columns that are padding in every kept row trimmed."""
    if not keep:
        return None
    if len(keep) == len(batch.rows):
        return batch
    index = torch.tensor(keep)
    mask = batch.mask.index_select(0, index)
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _cache_layers(batch.cache):
        layer.keys = layer.keys.index_select(0, index)[..., start:, :]
        layer.values = layer.values.index_select(0, index)[..., start:, :]
    return _Batch(
        rows=[batch.rows[i] for i in keep],
        cache=batch.cache,
        mask=mask[:, start:],
        lengths=batch.lengths.index_select(0, index),
        last=batch.last.index_select(0, index),
    )


# ---------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Continuous-batching generation on one model in one background thread."""

    def __init__(self, model: Any, tokenizer: Any, limits: ServeLimitsConfig, version: str = "base") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = limits
        self.version = version
        self.on_step: Callable[[int, int], None] | None = None  # (batch rows, new tokens) after each step
        config = model.config
        self.vocab_size = int(getattr(config, "vocab_size", len(tokenizer)))
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        forward_params = inspect.signature(_inner_model(model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._check_cache_layout()
        self._waiting: deque[_Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._batch: _Batch | None = None
        self._joining: list[_Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._steps = 0
        self._generated = 0
        self._token_text: dict[int, str] = {}
        self._ids = itertools.count()
        self._outbox: list[tuple[GenerationHandle, ChoiceDelta]] = []  # sent once per step (_flush)
        self._loop_done = threading.Event()  # set when `run` returns
        self._runs_on_caller = False

    # ----- public, any thread

    def start(self) -> None:
        """Run the engine in a background thread (unless `run` has it on a thread of the caller's)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="seektune-engine", daemon=True)
            self._thread.start()

    def claim_current_thread(self) -> None:
        """Mark the calling thread as the engine's (so `start` starts none), ahead of `run` on it."""
        self._thread = threading.current_thread()
        self._runs_on_caller = True

    def run(self) -> None:
        """Run the engine on the calling thread until `stop`. `seektune serve` runs it on the main thread
        (uvicorn on another): OpenMP's worker threads belong to the thread that starts a parallel region,
        and with the main thread's workers (from loading the model) and a second team for an engine
        thread there are more busy-waiting threads than cores, so libgomp throttles their spinning and
        every decode step took twice as long on 2 cores (docs/benchmarks.md)."""
        self.claim_current_thread()
        try:
            self._loop()
        finally:
            self._loop_done.set()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> GenerationHandle:
        """Queue a request; call from a running asyncio loop, whose queue receives the deltas."""
        need = params.n * (len(prompt_ids) + params.max_tokens)
        if need > self.limits.max_batch_tokens or params.n > self.limits.max_batch_size:
            raise RequestTooLarge(
                f"this request needs {need} tokens of KV cache ({params.n} x (prompt {len(prompt_ids)} + "
                f"max_tokens {params.max_tokens})), above the server's budget of "
                f"{self.limits.max_batch_tokens}: send a shorter prompt, a smaller max_tokens or n"
            )
        if not prompt_ids:
            raise RequestTooLarge("the prompt is empty: send at least one token")
        loop = asyncio.get_running_loop()
        handle = GenerationHandle(
            f"{next(self._ids):x}-{uuid.uuid4().hex[:12]}",
            len(prompt_ids),
            adapter or self.version,
            params.n,
            loop,
        )
        with self._wake:
            if self._draining or self._stopping:
                raise QueueFull("the server is shutting down", retry_after_s=5.0)
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({self.limits.max_queue} waiting): retry later",
                    retry_after_s=self._retry_after(),
                )
            self._waiting.append(_Request(handle, list(prompt_ids), params, adapter))
            self._wake.notify()
        return handle

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps (adapter loading); its result in the future."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        if self._thread is None:  # not started (tests): run now
            self._run_commands()
        return future

    def adapters_in_use(self) -> set[str]:
        with self._wake:
            rows = list(self._batch.rows) if self._batch else []
            waiting = list(self._waiting)
        return {r.request.adapter for r in rows if r.request.adapter} | {
            r.adapter for r in waiting if r.adapter
        }

    @property
    def stats(self) -> EngineStats:
        batch = self._batch
        rows = batch.rows if batch else []
        return EngineStats(
            queue_depth=len(self._waiting),
            running=len(rows),
            kv_tokens=int(batch.lengths.sum()) if batch else 0,
            kv_reserved=sum(len(r.request.prompt_ids) + r.request.params.max_tokens for r in rows),
            kv_capacity=self.limits.max_batch_tokens,
            steps=self._steps,
            generated_tokens=self._generated,
            alive=self._thread is not None and self._thread.is_alive(),
            draining=self._draining or self._stopping,
        )

    def drain(self) -> None:
        """Take no new requests; the queued and running ones go on."""
        with self._wake:
            self._draining = True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued and running (up to `timeout_s`), abort the rest, end the thread."""
        self.drain()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self._waiting or self._batch is not None):
            if self._thread is None or not self._thread.is_alive():
                break
            time.sleep(0.02)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._runs_on_caller:
            self._loop_done.wait(timeout=10)  # `run`'s thread (the main one) goes on after the loop
        elif self._thread is not None:
            self._thread.join(timeout=10)
        for request in list(self._waiting):
            self._abort_request(request, "abort")
        self._waiting.clear()
        if self._batch is not None:
            for row in self._batch.rows:
                self._finish(row, "abort")
            self._batch = None
        self._flush()

    # ----- engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._waiting or self._commands or self._batch):
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        return
                self._run_commands()
                try:
                    self._step()
                except Exception as exc:  # a bug or out of memory: fail the running rows, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(type(exc).__name__)
                finally:
                    self._flush()

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _step(self) -> None:
        self._drop_cancelled()
        joining = self._admit()
        if joining:
            self._joining = joining  # failed by _fail_all if the prefill raises
            prefilled = self._prefill(joining)
            with self._wake:
                self._batch = _merge(self._batch, prefilled)
            self._joining = []
            self._drop_finished()
        if self._batch is not None:
            self._decode()
            self._drop_finished()

    def _admit(self) -> list[_Request]:
        """Waiting requests that fit beside the running rows, first come first served."""
        batch = self._batch
        rows = len(batch.rows) if batch else 0
        reserved = self.stats.kv_reserved
        admitted: list[_Request] = []
        with self._wake:
            while self._waiting:
                request = self._waiting[0]
                if request.handle.cancelled:
                    self._waiting.popleft()
                    self._abort_request(request, "abort")
                    continue
                if request.adapter is not None and not self._adapter_loaded(request.adapter):
                    self._waiting.popleft()  # unloaded after the app routed it: this request fails alone
                    request.handle.error = (
                        f"the adapter {request.adapter!r} was unloaded before this request ran: "
                        "see GET /v1/models"
                    )
                    request.handle.error_status = 404
                    self._abort_request(request, "error")
                    continue
                if rows + request.params.n > self.limits.max_batch_size:
                    break
                if reserved + request.reserve > self.limits.max_batch_tokens:
                    break
                self._waiting.popleft()
                admitted.append(request)
                rows += request.params.n
                reserved += request.reserve
        return admitted

    def _adapter_loaded(self, name: str) -> bool:
        return _is_peft(self.model) and peft_name(name) in getattr(self.model, "peft_config", {})

    def _prefill(self, requests: list[_Request]) -> _Batch:
        """One forward over the new prompts (left-padded to the longest), then each request's first tokens;
        a request with n choices is prefilled once and its cache copied into n rows."""
        length = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(requests), length), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), length), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, length - len(request.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(r.params.echo_logprobs for r in requests)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            ids,
            mask,
            positions,
            cache,
            [peft_name(r.adapter) if r.adapter else BASE_ADAPTER for r in requests],
            all_logits=echo,
        )
        for i, request in enumerate(requests):
            if request.params.echo_logprobs:
                request.handle.prompt_logprobs = self._prompt_logprobs(
                    logits[i, length - len(request.prompt_ids) :], request
                )
        repeat = torch.tensor([r.params.n for r in requests])
        for layer in _cache_layers(cache):
            layer.keys = layer.keys.repeat_interleave(repeat, dim=0)
            layer.values = layer.values.repeat_interleave(repeat, dim=0)
        rows = [
            _Sequence(request, index, self.tokenizer, self.vocab_size)
            for request in requests
            for index in range(request.params.n)
        ]
        last_logits = logits[:, -1].repeat_interleave(repeat, dim=0)
        batch = _Batch(
            rows=rows,
            cache=cache,
            mask=mask.repeat_interleave(repeat, dim=0),
            lengths=mask.sum(-1).repeat_interleave(repeat, dim=0),
            last=torch.zeros(len(rows), dtype=torch.long),
        )
        batch.last = self._sample_and_emit(batch, last_logits, prefill=True)
        return batch

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], dim=1)
        logits = self._forward(
            batch.last[:, None],
            mask,
            batch.lengths[:, None],
            batch.cache,
            [row.adapter_name for row in batch.rows],
        )
        batch.mask = mask
        batch.lengths = batch.lengths + 1
        batch.last = self._sample_and_emit(batch, logits[:, -1], prefill=False)
        self._steps += 1

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        adapters: list[str],
        all_logits: bool = False,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
            self._cache_kwarg: cache,
            "use_cache": True,
        }
        if not all_logits:
            kwargs["logits_to_keep"] = 1
        if _is_peft(self.model):
            kwargs["adapter_names"] = adapters
        return self.model(**kwargs).logits.float().cpu()

    # ----- sampling

    def _sample_and_emit(self, batch: _Batch, logits: torch.Tensor, prefill: bool) -> torch.Tensor:
        """The next token of every row (logits [rows, vocab]); emits each row's delta."""
        rows = batch.rows
        want_logprobs = any(r.request.params.logprobs is not None for r in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if all(r.request.params.greedy and r.counts is None for r in rows):
            tokens = logits.argmax(-1)
        else:
            tokens = torch.stack([self._sample_row(row, logits[i]) for i, row in enumerate(rows)])
        now = time.perf_counter()
        for i, row in enumerate(rows):
            token = int(tokens[i])
            handle = row.request.handle
            if handle.first_token_s is None:
                handle.first_token_s = now - handle.submitted
            top = row.request.params.logprobs
            entry = None if logprobs is None or top is None else self._logprob_entry(logprobs[i], token, top)
            self._advance(row, token, entry, int(batch.lengths[i]) + 1)
        self._generated += sum(1 for row in rows if row.request.params.max_tokens > 0)
        if self.on_step is not None:
            self.on_step(len(rows), len(rows))
        return tokens

    def _sample_row(self, row: _Sequence, logits: torch.Tensor) -> torch.Tensor:
        params = row.request.params
        if row.counts is not None:
            logits = (
                logits - params.presence_penalty * (row.counts > 0) - params.frequency_penalty * row.counts
            )
        if params.greedy:
            return logits.argmax()
        logits = logits / params.temperature
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first over p
            sorted_logits[drop] = -math.inf
            logits = torch.full_like(logits, -math.inf).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=row.generator)[0]

    def _advance(self, row: _Sequence, token: int, entry: TokenLogprob | None, length: int) -> None:
        """Append `token` to `row`: text, stop checks, the delta to its handle."""
        params = row.request.params
        if params.max_tokens == 0:  # echo only: the prompt's log-probabilities, nothing generated
            self._emit(row.request.handle, ChoiceDelta(row.index, "", [], [], finish_reason="length"))
            row.finished = "length"
            return
        row.generated.append(token)
        row.request.handle.completion_tokens += 1
        if row.counts is not None:
            row.counts[token] += 1
        finish = None
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            finish = "stop"
            text = ""
        else:
            text, stopped = row.stops.feed(row.detok.add(token))
            if stopped:
                finish = "stop"
        if finish is None and (
            len(row.generated) >= params.max_tokens
            or (self.max_positions is not None and length >= self.max_positions)
        ):
            finish = "length"
        if finish == "length":
            tail, stopped = row.stops.feed(row.detok.flush())
            text += tail
            finish = "stop" if stopped else finish
        if finish == "length":
            text += row.stops.flush()
        self._emit(
            row.request.handle,
            ChoiceDelta(row.index, text, [token], [entry] if entry else [], finish_reason=finish),
        )
        row.finished = finish

    def _token_str(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
        alternatives: list[tuple[int, str, float]] = []
        if top:
            values, ids = logprobs.topk(top)
            alternatives = [
                (int(t), self._token_str(int(t)), float(v)) for v, t in zip(values, ids, strict=True)
            ]
        return TokenLogprob(token, self._token_str(token), float(logprobs[token]), alternatives)

    def _prompt_logprobs(self, logits: torch.Tensor, request: _Request) -> list[TokenLogprob | None]:
        """logits [prompt, vocab]: the log-probability of each prompt token given the ones before."""
        logprobs = torch.log_softmax(logits, dim=-1)
        ids = request.prompt_ids
        top = request.params.logprobs
        return [None] + [self._logprob_entry(logprobs[i - 1], ids[i], top) for i in range(1, len(ids))]

    # ----- rows leaving

    def _drop_finished(self) -> None:
        batch = self._batch
        if batch is None:
            return
        keep = [
            i for i, row in enumerate(batch.rows) if row.finished is None and not row.request.handle.cancelled
        ]
        for row in batch.rows:
            if row.finished is None and row.request.handle.cancelled:
                self._finish(row, "abort")
        with self._wake:
            self._batch = _keep(batch, keep)

    def _drop_cancelled(self) -> None:
        if self._batch is not None and any(r.request.handle.cancelled for r in self._batch.rows):
            self._drop_finished()

    def _finish(self, row: _Sequence, reason: str) -> None:
        row.finished = reason
        self._emit(row.request.handle, ChoiceDelta(row.index, "", [], [], finish_reason=reason))

    def _abort_request(self, request: _Request, reason: str) -> None:
        for index in range(request.params.n):
            self._emit(request.handle, ChoiceDelta(index, "", [], [], finish_reason=reason))

    def _emit(self, handle: GenerationHandle, delta: ChoiceDelta) -> None:
        self._outbox.append((handle, delta))

    def _flush(self) -> None:
        items, self._outbox = self._outbox, []
        if items:
            _send(items)

    def _fail_all(self, message: str) -> None:
        batch, self._batch = self._batch, None
        joining, self._joining = self._joining, []
        for request in joining:
            request.handle.error = message
            self._abort_request(request, "error")
        for row in batch.rows if batch else []:
            if row.finished is None:
                row.request.handle.error = message
                self._finish(row, "error")

    def _retry_after(self) -> float:
        """Seconds until the queue has probably moved (never below 1)."""
        return 1.0

    def _check_cache_layout(self) -> None:
        """The rows of the batch are padded and concatenated along the cache's sequence axis, which only a
        plain (non-sliding, non-static) dynamic cache has."""
        cache = DynamicCache(config=self.model.config)
        kinds = {type(layer).__name__ for layer in _cache_layers(cache)}
        if kinds - {"DynamicLayer"}:
            raise UserError(
                f"this model's KV cache has {sorted(kinds - {'DynamicLayer'})} layers (sliding-window or "
                "linear attention), which the seektune engine cannot batch: serve it with --engine vllm"
            )


def _inner_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if _is_peft(model) else model


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None) if generation is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
