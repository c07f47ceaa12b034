"""Shared test helpers: the reduced offline-base recipe and a whole-run config on it."""

from __future__ import annotations

import socket
from pathlib import Path

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
