"""Shared test helpers: the reduced offline-base recipe, a whole-run config on it, the base loaded in
memory, a LoRA adapter of it, and an app served by uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A much smaller recipe than the default, so the base builds in seconds; big enough to be a real
# DeepSeek-V3 (MLA, one dense block then an MoE block with routed and shared experts).
TINY_RECIPE = {
    "vocab_size": 2048,
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "intermediate_size": 128,
    "context_length": 96,
    "pretrain_steps": 300,
    "batch_size": 8,
    "learning_rate": 3e-3,
}


def tiny_run_config(tmp_path: Path, base_cache: Path, **sections) -> dict:
    """A whole-run config on the reduced base, small enough for seconds per stage."""
    raw = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "model": {"cache_dir": str(base_cache), "base": TINY_RECIPE},
        "data": {"max_train_samples": 64, "max_eval_samples": 16, "max_length": 128},
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 4, "logging_steps": 2},
        # Robustness, efficiency and attention re-run generation: tests that check them turn them on.
        "eval": {
            "max_new_tokens": 12,
            "batch_size": 16,
            "robustness": {"enabled": False},
            "efficiency": {"enabled": False},
            "explainability": {"enabled": False},
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_tiny_base(base_cache: Path) -> Any:
    """A fresh in-memory copy of the reduced offline base (LoadedModel: model + tokenizer)."""
    from seektune.config import BaseBuildConfig, ModelConfig
    from seektune.models.load import load_model

    return load_model(
        ModelConfig(
            name_or_path="tiny-deepseek-v3",
            base=BaseBuildConfig(**TINY_RECIPE),
            cache_dir=base_cache,
            device="cpu",
            dtype="float32",
        )
    )


def save_lora(base_cache: Path, folder: Path, seed: int = 1) -> Path:
    """A LoRA adapter of the tiny base with non-zero B, so that it changes the outputs (on attention
    Linear layers only: PEFT cannot mix adapters in one batch on the fused MoE expert parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_tiny_base(base_cache).model
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # transformers' deprecation, raised from inside PEFT
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "kv_b_proj", "o_proj"])
        )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(folder)
    return folder


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    server: Any  # the uvicorn server (DrainingServer)
    thread: threading.Thread


@contextmanager
def running_server(app: Any, shutdown_timeout_s: float = 5.0) -> Iterator[RunningServer]:
    """uvicorn serving `app` on a free loopback port in a thread, stopped (gracefully) on exit."""
    from seektune.serve.server import make_server

    port = free_port()
    server = make_server(app, "127.0.0.1", port, shutdown_timeout_s)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
