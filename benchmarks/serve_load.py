"""Serving throughput and latency: seektune serve against one-by-one `generate` and `transformers serve`.

Two modes:

- Load generator (`--url`): drives any OpenAI-compatible server with --requests streamed requests,
  --concurrency at a time, of fixed seeded prompts (held-out standard-library docs, the offline base's
  corpus; cut to 12-40 words by a seeded RNG), and prints requests/s, output tokens/s and the p50/p95/p99
  of the time to the first token and of the whole request. Output tokens are the usage the server
  reports at the end of the stream (stream_options.include_usage, sent unless --no-usage), else the
  number of chunks that carried text.

      python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME [--concurrency 32]
          [--requests 32] [--max-tokens 64] [--seed 0] [--api-key KEY] [--endpoint completions|chat]
          [--extra '{"ignore_eos": true}']

- Comparison (no --url): the issue's benchmark on the offline base `tiny-deepseek-v3` at its default
  recipe (4.4M parameters, MLA attention, MoE; `seektune base build`, fp32 on the CPU), the same
  --requests requests of --max-tokens output tokens each (greedy), measured one after the other:
  1. seektune serve (`seektune serve FOLDER`, continuous batching), all requests at once; requests send
     `ignore_eos: true` (as vLLM accepts it) so that every one makes --max-tokens tokens.
  2. generate: the same prompts one by one through `model.generate` in a worker process (greedy, the
     prompts tokenised as the server does, --max-tokens new tokens, `eos_token_id=None`: on past EOS as
     ignore_eos does). Should seektune's server not honour ignore_eos (some requests end early), every
     peer stops at EOS instead, so all three still do the same work; a note says so. Its time to first
     token counts from the moment all requests arrived, as a server that takes them one by one would
     answer; its "total" is each request's finish time from that moment.
  3. transformers serve (`transformers serve FOLDER --device cpu --dtype float32`), all requests at
     once, WITHOUT --continuous-batching: with it, transformers 5.x fails on DeepSeek-V3's MLA
     attention (`index_copy_(): Source/destination tensor must have same slice shapes`, key and value
     head sizes differ; DESIGN.md). transformers serve refuses unknown request fields, so it gets
     `generation_config` with min_new_tokens = max_new_tokens (its documented per-request override)
     instead of ignore_eos; that masks EOS (an `eos_token_id: null` there is replaced by the model's),
     so its texts part from the others' where EOS would have been the greedy choice.
  Each server is started as a subprocess, warmed up with the same requests for 4 tokens (generate too),
  measured, then stopped; peak memory is the high-water mark of its process (VmHWM), taken before it
  stops. The greedy texts of the servers are compared with generate's (the issue's "identical greedy
  outputs").

      python benchmarks/serve_load.py [--quick] [--requests 32] [--concurrency 32] [--max-tokens 64]
          [--only seektune generate tf_serve] [--model-folder FOLDER]

The goal line checks the issue's figures: seektune at least 5x generate and 1.5x transformers serve in
output tokens/s, and a p99 time to first token no worse than transformers serve's. The last line repeats
the figures as key=value pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SEED = 0
MARK = "@@ "  # prefix of the generate worker's answer lines; anything else on its stdout is library noise
GOAL = {"vs_generate": 5.0, "vs_tf_serve": 1.5}
PEERS = ("seektune", "generate", "tf_serve")
LABELS = {"seektune": "seektune serve", "generate": "generate, one by one", "tf_serve": "transformers serve"}
# A few fixed prompts for when seektune's corpus is not importable (a load run from another machine).
FIXED_PROMPTS = (
    "The os module provides a portable way of using operating system dependent functionality",
    "A list comprehension consists of brackets containing an expression followed by a for clause",
    "The json module exposes an API familiar to users of the standard library marshal and pickle modules",
    "Context managers are normally invoked using the with statement",
    "The itertools module implements a number of iterator building blocks",
    "A dictionary maps hashable values to arbitrary objects",
    "The subprocess module allows you to spawn new processes and connect to their pipes",
    "Exceptions are raised when an error is detected during execution",
)


# ---- prompts ----


def bench_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts of 12-40 words cut from held-out standard-library docs, chosen by `seed`."""
    rng = random.Random(seed)
    try:
        from seektune.data.stdlib_docs import collect_units

        texts = [f"{u.title}. {u.text}" for u in collect_units() if u.split != "train"]
    except ImportError:
        texts = list(FIXED_PROMPTS)
    texts = [" ".join(text.split()) for text in texts if len(text.split()) >= 12]
    prompts = []
    for _ in range(count):
        words = rng.choice(texts).split()
        prompts.append(" ".join(words[: rng.randint(12, min(40, len(words)))]))
    return prompts


# ---- the load generator ----


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    error: str = ""
    ttft_s: float | None = None  # from the request's send to the first chunk with text
    total_s: float = 0.0
    output_tokens: int = 0
    tokens_from_usage: bool = False
    text: str = ""


@dataclass
class LoadResult:
    results: list[RequestResult]
    wall_s: float
    figures: dict[str, float] = field(default_factory=dict)


def request_body(
    endpoint: str, model: str, prompt: str, max_tokens: int, usage: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if usage:
        body["stream_options"] = {"include_usage": True}
    return {**body, **extra}


async def stream_request(client: Any, path: str, body: dict[str, Any], chat: bool) -> RequestResult:
    """One streamed request: its first-token time, total time, output tokens and text."""
    began = time.perf_counter()
    result = RequestResult(ok=False)
    pieces: list[str] = []
    chunks_with_text = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                result.total_s = time.perf_counter() - began
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    break
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - began
                        pieces.append(text)
                        chunks_with_text += 1
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"]["completion_tokens"])
                    result.tokens_from_usage = True
    except Exception as exc:  # a failed request is a figure of the run, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.total_s = time.perf_counter() - began
    result.text = "".join(pieces)
    if not result.tokens_from_usage:
        result.output_tokens = chunks_with_text
    result.ok = not result.error and result.status == 200
    return result


async def run_load(
    url: str,
    model: str,
    prompts: list[str],
    *,
    concurrency: int,
    max_tokens: int,
    endpoint: str = "completions",
    api_key: str | None = None,
    usage: bool = True,
    extra: dict[str, Any] | None = None,
) -> LoadResult:
    """Send one streamed request per prompt, `concurrency` at a time; results in the prompts' order."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(900.0), limits=limits
    ) as client:

        async def one(prompt: str) -> RequestResult:
            async with gate:
                body = request_body(endpoint, model, prompt, max_tokens, usage, extra or {})
                return await stream_request(client, path, body, endpoint == "chat")

        began = time.perf_counter()
        results = await asyncio.gather(*(one(prompt) for prompt in prompts))
        wall_s = time.perf_counter() - began
    return LoadResult(list(results), wall_s, summarise(list(results), wall_s))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    total = [r.total_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    figures = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall_s if wall_s else 0.0,
    }
    for q in (50, 95, 99):
        figures[f"ttft_p{q}_s"] = percentile(ttft, q)
        figures[f"total_p{q}_s"] = percentile(total, q)
    return figures


def print_load(figures: dict[str, float], label: str) -> None:
    print(
        f"{label}: {figures['requests']:.0f} requests ({figures['failed']:.0f} failed) in "
        f"{figures['wall_s']:.2f} s: {figures['requests_per_s']:.2f} requests/s, "
        f"{figures['output_tok_s']:.1f} output tokens/s ({figures['output_tokens']:.0f} tokens)"
    )
    print(
        "  time to first token p50/p95/p99: "
        + " / ".join(f"{figures[f'ttft_p{q}_s']:.3f}" for q in (50, 95, 99))
        + " s; total p50/p95/p99: "
        + " / ".join(f"{figures[f'total_p{q}_s']:.3f}" for q in (50, 95, 99))
        + " s"
    )


# ---- servers as subprocesses ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a live process's resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    """A server started as a subprocess (its own session), ready once `ready_path` answers 200."""

    def __init__(self, name: str, command: list[str], url: str, log: Path, ready_path: str) -> None:
        self.name = name
        self.url = url
        self.log = log
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.ready_path = ready_path

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        import httpx

        began = time.perf_counter()
        while time.perf_counter() - began < timeout_s:
            if self.process.poll() is not None:
                sys.stderr.write(self.log.read_text()[-6000:])
                raise SystemExit(
                    f"{self.name} stopped before it was ready (exit code {self.process.returncode})"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    return time.perf_counter() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.name} was not ready after {timeout_s:.0f} s; its log: {self.log}")

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure_server(
    server: ServerProcess, model: str, prompts: list[str], args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    """Warm the server up with one request, then the measured load; its figures, texts and peak RSS."""
    try:
        ready_s = server.wait_ready()
        # Warm-up: the measured load's prompts and concurrency for a few tokens, so that first-call costs
        # of the batch's shapes (kernel selection, allocator growth) fall outside the measured run.
        warm = asyncio.run(
            run_load(server.url, model, prompts, concurrency=args.concurrency, max_tokens=4, extra=extra)
        )
        failed = next((r for r in warm.results if r.error), None)
        if failed is not None:
            raise SystemExit(f"{server.name}'s warm-up requests failed: {failed.error}")
        load = asyncio.run(
            run_load(
                server.url,
                model,
                prompts,
                concurrency=args.concurrency,
                max_tokens=args.max_tokens,
                endpoint="completions",
                extra=extra,
            )
        )
        rss = server.peak_rss_mb()
    finally:
        server.stop()
    failed = [r for r in load.results if not r.ok]
    if failed:
        print(f"{server.name}: {len(failed)} requests failed, first: {failed[0].status} {failed[0].error}")
    return {
        **load.figures,
        "ready_s": ready_s,
        "peak_rss_mb": rss,
        "texts": [r.text for r in load.results],
        "tokens": [r.output_tokens for r in load.results],
    }


def run_seektune(folder: Path, prompts: list[str], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    port = free_port()
    program = Path(sys.executable).with_name("seektune")
    command = [str(program) if program.is_file() else "seektune", "serve", str(folder), "--port", str(port)]
    command += ["--set", f"serve.limits.max_batch_size={max(args.concurrency, 1)}"]
    command += ["--set", f"serve.limits.max_queue={max(args.requests, 1)}"]
    server = ServerProcess(
        "seektune serve", command, f"http://127.0.0.1:{port}", root / "seektune.log", "/ready"
    )
    return measure_server(server, folder.name, prompts, args, {"ignore_eos": True})


def run_tf_serve(
    folder: Path,
    prompts: list[str],
    args: argparse.Namespace,
    root: Path,
    generation: dict[str, Any],
    ignore_eos: bool,
) -> dict[str, Any]:
    port = free_port()
    program = Path(sys.executable).with_name("transformers")
    command = [str(program) if program.is_file() else "transformers", "serve", str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    command += ["--no-continuous-batching", "--log-level", "warning"]
    server = ServerProcess(
        "transformers serve", command, f"http://127.0.0.1:{port}", root / "tf_serve.log", "/health"
    )
    config = {**generation, "max_new_tokens": args.max_tokens}
    if ignore_eos:  # its only way to run to max_new_tokens (eos_token_id: null is overridden by the
        config["min_new_tokens"] = args.max_tokens  # model's): EOS is masked, so texts differ after one
    return measure_server(server, str(folder), prompts, args, {"generation_config": json.dumps(config)})


# ---- generate, one by one (a worker process, for its own peak memory) ----


def run_generate_worker(spec_file: str) -> None:
    """Load the model, then generate each prompt in turn; one JSON answer line."""
    import logging
    import warnings

    import torch

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    from seektune.config import ModelConfig
    from seektune.models.load import load_model

    spec = json.loads(Path(spec_file).read_text())
    loaded = load_model(ModelConfig(name_or_path=spec["folder"], device="cpu", dtype="float32"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer

    class FirstToken(BaseStreamer):
        """Notes the time of the first generated token (generate's first put() is the prompt)."""

        def __init__(self) -> None:
            self.puts = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2 and self.first is None:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(prompt: str, new_tokens: int, streamer: Any = None) -> list[int]:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                **({"eos_token_id": None} if spec["ignore_eos"] else {}),  # on past EOS, as ignore_eos
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        return out[0, ids.shape[1] :].tolist()

    for prompt in spec["prompts"]:  # warm-up, as the servers get: first-call costs of each shape
        generate(prompt, 4)
    results = []
    began = time.perf_counter()  # every request arrived now; they are answered in turn
    for prompt, new_tokens in zip(spec["prompts"], spec["tokens"], strict=True):
        streamer = FirstToken()
        tokens = generate(prompt, new_tokens, streamer)
        finished = time.perf_counter()
        results.append(
            {
                "ttft_s": (streamer.first or finished) - began,
                "total_s": finished - began,
                "output_tokens": len(tokens),
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
            }
        )
    wall_s = time.perf_counter() - began
    print(
        MARK + json.dumps({"results": results, "wall_s": wall_s, "peak_rss_mb": _own_peak_rss_mb()}),
        flush=True,
    )


def _own_peak_rss_mb() -> float:
    return peak_rss_mb(os.getpid())


def run_generate(
    folder: Path, prompts: list[str], tokens: list[int], ignore_eos: bool, root: Path
) -> dict[str, Any]:
    spec = root / "generate.json"
    spec.write_text(
        json.dumps({"folder": str(folder), "prompts": prompts, "tokens": tokens, "ignore_eos": ignore_eos})
    )
    log = root / "generate.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--generate-worker", str(spec)],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
        check=False,
    )
    answer = next((line for line in done.stdout.splitlines() if line.startswith(MARK)), None)
    if done.returncode != 0 or answer is None:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"the generate worker failed (exit code {done.returncode})")
    data = json.loads(answer[len(MARK) :])
    results = [RequestResult(ok=True, status=200, **item) for item in data["results"]]
    return {
        **summarise(results, data["wall_s"]),
        "peak_rss_mb": data["peak_rss_mb"],
        "texts": [r.text for r in results],
        "tokens": [r.output_tokens for r in results],
    }


# ---- the comparison ----


def model_folder(args: argparse.Namespace) -> Path:
    if args.model_folder:
        return Path(args.model_folder).expanduser().resolve()
    from seektune.config import ModelConfig
    from seektune.models.load import resolve_model_path

    return Path(resolve_model_path(ModelConfig()))  # the offline base at its default recipe (built once)


def generation_defaults(folder: Path) -> dict[str, Any]:
    """The special tokens of the model's generation config, for transformers serve's generation_config."""
    try:
        config = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config} | {"do_sample": False}


def _print_header(args: argparse.Namespace, folder: Path) -> None:
    from importlib.metadata import version

    packages = ("torch", "transformers", "fastapi", "uvicorn", "httpx")
    print(
        "seektune serving benchmark: continuous batching against one-by-one generate and transformers serve"
    )
    print(
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}; "
        + ", ".join(f"{name} {version(name)}" for name in packages)
    )
    print(
        f"model {folder} (fp32, cpu); {args.requests} requests of {args.max_tokens} output tokens, "
        f"{args.concurrency} at a time, greedy, completions endpoint, streamed; seed {args.seed}"
    )


def _ratio(value: float, peer: float) -> float:
    return value / peer if peer else float("nan")


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print(
        f"\n{'':<24}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p95':>8}{'p99':>8}"
        f"{'total p50':>11}{'p95':>8}{'p99':>8}{'peak RSS MB':>13}{'failed':>8}"
    )
    for name, run in runs.items():
        print(
            f"{LABELS[name]:<24}{run['requests_per_s']:>8.2f}{run['output_tok_s']:>11.1f}"
            f"{run['ttft_p50_s']:>10.3f}{run['ttft_p95_s']:>8.3f}{run['ttft_p99_s']:>8.3f}"
            f"{run['total_p50_s']:>11.3f}{run['total_p95_s']:>8.3f}{run['total_p99_s']:>8.3f}"
            f"{run['peak_rss_mb']:>13.0f}{run['failed']:>8.0f}"
        )
    values: dict[str, Any] = {}
    keys = {"seektune": "seektune", "generate": "generate", "tf_serve": "tf_serve"}
    for name, run in runs.items():
        key = keys[name]
        values[f"{key}_tok_s"] = round(run["output_tok_s"], 1)
        values[f"{key}_p99_ttft_s"] = round(run["ttft_p99_s"], 3)
        values[f"{key}_rss_mb"] = round(run["peak_rss_mb"])
    if "seektune" in runs:
        values["p99_ttft_s"] = values["seektune_p99_ttft_s"]
    for name, run in runs.items():
        values[f"{name}_tokens"] = sum(run["tokens"])  # the same work for each, when equal
    checks = {}
    seektune = runs.get("seektune")
    if seektune and "generate" in runs:
        ratio = _ratio(seektune["output_tok_s"], runs["generate"]["output_tok_s"])
        values["ratio_vs_generate"] = round(ratio, 2)
        same = sum(a == b for a, b in zip(seektune["texts"], runs["generate"]["texts"], strict=True))
        values["identical_vs_generate"] = same
        print(
            f"seektune / generate: {ratio:.2f}x output tokens/s; p99 time to first token "
            f"{_ratio(runs['generate']['ttft_p99_s'], seektune['ttft_p99_s']):.1f}x shorter; greedy texts "
            f"identical in {same} of {len(seektune['texts'])} requests"
        )
        checks[f"tokens/s >= {GOAL['vs_generate']:g}x generate"] = ratio >= GOAL["vs_generate"]
    if seektune and "tf_serve" in runs:
        tf = runs["tf_serve"]
        ratio = _ratio(seektune["output_tok_s"], tf["output_tok_s"])
        values["ratio_vs_tf_serve"] = round(ratio, 2)
        values["ttft_p99_ratio_vs_tf_serve"] = round(_ratio(seektune["ttft_p99_s"], tf["ttft_p99_s"]), 3)
        print(
            f"seektune / transformers serve (no continuous batching: it fails on MLA): {ratio:.2f}x output "
            f"tokens/s; p99 time to first token {seektune['ttft_p99_s']:.3f} s against "
            f"{tf['ttft_p99_s']:.3f} s"
        )
        checks[f"tokens/s >= {GOAL['vs_tf_serve']:g}x transformers serve"] = ratio >= GOAL["vs_tf_serve"]
        checks["p99 TTFT <= transformers serve's"] = seektune["ttft_p99_s"] <= tf["ttft_p99_s"]
    if "generate" in runs and "tf_serve" in runs:
        texts = runs["generate"]["texts"]
        same = sum(a == b for a, b in zip(runs["tf_serve"]["texts"], texts, strict=True))
        print(
            f"transformers serve / generate: greedy texts identical in {same} of {len(texts)} (transformers "
            "serve masks EOS to make max_tokens tokens, the others generate past it)"
        )
    if checks:
        print("goal: " + "; ".join(f"{label} {'met' if met else 'MISSED'}" for label, met in checks.items()))
    return values


def compare(args: argparse.Namespace) -> None:
    folder = model_folder(args)
    _print_header(args, folder)
    prompts = bench_prompts(args.requests, args.seed)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="seektune-serve-bench-") as tmp:
        root = Path(tmp)
        tokens = [args.max_tokens] * len(prompts)
        ignore_eos = True
        if "seektune" in args.only:
            runs["seektune"] = run_seektune(folder, prompts, args, root)
            print(f"seektune serve: ready in {runs['seektune']['ready_s']:.1f} s, measured")
            ignore_eos = all(count == args.max_tokens for count in runs["seektune"]["tokens"])
            if not ignore_eos:  # the same work for every peer: then they stop at EOS as well
                counts = runs["seektune"]["tokens"]
                print(
                    f"note: seektune made {min(counts)}-{max(counts)} tokens per request, not "
                    f"{args.max_tokens} each (its server ignored ignore_eos): the peers stop at EOS too"
                )
        if "generate" in args.only:
            runs["generate"] = run_generate(folder, prompts, tokens, ignore_eos, root)
            print("generate: measured")
        if "tf_serve" in args.only:
            generation = generation_defaults(folder)
            runs["tf_serve"] = run_tf_serve(folder, prompts, args, root, generation, ignore_eos)
            print(f"transformers serve: ready in {runs['tf_serve']['ready_s']:.1f} s, measured")
        values = report(runs, args)
    print(" ".join(f"{key}={value}" for key, value in values.items()))


def load_only(args: argparse.Namespace) -> None:
    prompts = bench_prompts(args.requests, args.seed)
    extra = json.loads(args.extra) if args.extra else {}
    load = asyncio.run(
        run_load(
            args.url,
            args.model,
            prompts,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            endpoint=args.endpoint,
            api_key=args.api_key,
            usage=not args.no_usage,
            extra=extra,
        )
    )
    print_load(load.figures, args.url)
    failed = [r for r in load.results if not r.ok]
    if failed:
        print(f"first failure: HTTP {failed[0].status}: {failed[0].error}")
    figures = {key: round(value, 4) for key, value in load.figures.items()}
    print(" ".join(f"{key}={value}" for key, value in figures.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="load-generator mode: the server's base URL (without /v1)")
    parser.add_argument("--model", help="--url mode: the model name to send")
    parser.add_argument("--api-key", default=os.environ.get("SEEKTUNE_API_KEY"), help="bearer key (--url)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--extra", help="--url mode: JSON object merged into every request body")
    parser.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32)")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default 32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64)")
    parser.add_argument("--seed", type=int, default=SEED, help="chooses the prompts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 requests of 16 tokens")
    parser.add_argument("--only", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument(
        "--model-folder", help="comparison mode: a saved model folder; default: the offline base"
    )
    parser.add_argument("--generate-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate_worker:
        run_generate_worker(args.generate_worker)
        return
    sizes = {"concurrency": 8, "requests": 8, "max_tokens": 16} if args.quick else {}
    for key, default in (("concurrency", 32), ("requests", 32), ("max_tokens", 64)):
        if getattr(args, key) is None:
            setattr(args, key, sizes.get(key, default))
    if args.url:
        if not args.model:
            parser.error("--url needs --model (the name the server serves; see GET /v1/models)")
        load_only(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
