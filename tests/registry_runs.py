"""Run directories shaped like those `seektune run` writes, for the registry's tests (no model is trained:
registration only reads files)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def make_run(
    root: Path,
    name: str = "legal",
    compress_steps: tuple[str, ...] = ("merge", "quantize"),
    evaluated: bool = True,
    seed: int = 0,
) -> Path:
    """A completed run: a LoRA adapter in model/, and one folder per compression step."""
    run = root / f"{name}-{seed}"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/cache/tiny-base"})
    )
    (run / "model" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (seed + 1))
    (run / "model" / "base_fingerprint.json").write_text(
        json.dumps({"version": 1, "fingerprint": "sha256:abc", "base": "/cache/tiny-base"})
    )
    config = {
        "name": name,
        "seed": seed,
        "model": {"name_or_path": "tiny-deepseek-v3", "revision": None},
        "method": {"name": "lora", "lora": {"r": 8 + seed}},
        "eval": {"metrics": ["perplexity", "rouge_l"], "primary_metric": None},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "environment.json").write_text(json.dumps({"python": "3.11", "torch": "2.13.0"}))
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    metrics = {"data": {"fingerprint": f"data-{seed}", "train_rows": 64}}
    if evaluated:
        metrics["eval"] = {"tuned": {"n": 16, "perplexity": 20.0 - seed, "rouge_l": 0.3 + seed / 100}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    steps, table = [], [{"label": "source", "perplexity": 20.0}]
    for index, step in enumerate(compress_steps, start=1):
        folder = run / "compress" / f"{index:02d}-{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "step": step}))
        (folder / "model.safetensors").write_bytes(step.encode() * 100)
        details = {"method": "int8_dynamic"} if step == "quantize" else {}
        steps.append({"step": step, "model_dir": str(folder), "files": [], "details": details})
        table.append({"label": step, "perplexity": 20.5, "size_on_disk_mb": 1.0, "device": "cpu"})
    if steps:
        results = {"status": "completed", "source": str(run / "model"), "steps": steps, "table": table}
        (run / "compress" / "results.json").write_text(json.dumps(results))
    return run
