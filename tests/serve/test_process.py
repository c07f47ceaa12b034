"""`seektune serve` as its users start it: a process whose engine runs on the main thread and uvicorn on a
second one; SIGTERM after a stream began lets it end with [DONE] and exits 0 (that the engine keeps
generating for a stream running at the signal is test_app.py's graceful-shutdown test, on a slowed
engine); a port in use is one line, exit code 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from support import TINY_RECIPE, free_port


def start_serve(base_cache: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"cache_dir": str(base_cache), "base": TINY_RECIPE, "device": "cpu"},
                "serve": {"served_model_name": "tiny", "shutdown_timeout_s": 20, "cpu_threads": 1},
            }
        )
    )
    program = Path(sys.executable).with_name("seektune")
    command = [str(program), "serve", "tiny-deepseek-v3", "--config", str(config)]
    return subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"seektune serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail("seektune serve was not ready in time")


def test_sigterm_lets_a_begun_stream_end_and_exits_0(base_cache: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve(base_cache, tmp_path, port)
    try:
        wait_ready(process, url)
        body = {"model": "tiny", "prompt": "The cat", "max_tokens": 60, "temperature": 0}
        plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert plain["usage"]["completion_tokens"] > 0

        chunks: list[dict] = []
        done = threading.Event()
        first = threading.Event()

        def stream() -> None:
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "stream": True, "ignore_eos": True}, timeout=60
            ) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done.set()
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert done.is_set()  # the stream ended normally
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert sum(1 for c in chunks if c["choices"][0]["text"]) <= 60 and text
        assert process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_port_in_use_is_one_line_and_exit_code_2(base_cache: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_serve(base_cache, tmp_path, port)
        try:
            output, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 2, output
    assert "could not listen" in output and "Traceback" not in output
