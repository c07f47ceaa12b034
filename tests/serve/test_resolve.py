"""What `seektune serve MODEL_OR_RUN` serves: run directories, adapter folders, model folders, hub ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seektune.errors import UserError
from seektune.serve.adapters import resolve_served_model


def model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def lora_folder(folder: Path, base: str, peft_type: str = "LORA") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "base_model_name_or_path": base})
    )
    return folder


def run_dir(folder: Path, metrics: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "done"}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_run_directory_serves_its_model_under_the_runs_name(tmp_path):
    run = run_dir(tmp_path / "legal-20261203")
    model_folder(run / "model")
    source = resolve_served_model(str(run))
    assert (source.base, source.name, source.adapter) == (str(run / "model"), "legal-20261203", None)


def test_run_that_trained_an_adapter_serves_base_plus_adapter(tmp_path):
    run = run_dir(tmp_path / "legal-1")
    lora_folder(run / "model", base="tiny-deepseek-v3")
    source = resolve_served_model(str(run))
    assert (source.base, source.name, source.adapter) == ("tiny-deepseek-v3", "legal-1", str(run / "model"))


def test_run_with_compression_serves_the_compressed_model(tmp_path):
    run = run_dir(tmp_path / "small")
    model_folder(run / "model")
    final = model_folder(run / "compress" / "02-quantize")
    (run / "metrics.json").write_text(json.dumps({"compress": {"final_model": str(final)}}))
    source = resolve_served_model(str(run))
    assert source.base == str(final)
    assert source.notes and "compressed" in source.notes[0]


def test_moved_run_still_finds_its_compressed_model(tmp_path):
    run = run_dir(tmp_path / "moved", {"compress": {"final_model": "/gone/runs/moved/compress/02-quantize"}})
    model_folder(run / "model")
    final = model_folder(run / "compress" / "02-quantize")
    assert resolve_served_model(str(run)).base == str(final)


def test_failed_compression_falls_back_to_the_model(tmp_path):
    run = run_dir(tmp_path / "failed", {"compress": {"final_model": "None"}})
    model_folder(run / "model")
    assert resolve_served_model(str(run)).base == str(run / "model")


def test_run_without_a_model_is_refused(tmp_path):
    run = run_dir(tmp_path / "data-only")
    with pytest.raises(UserError, match="no model/ folder"):
        resolve_served_model(str(run))


def test_adapter_folder_and_refusals(tmp_path):
    adapter = lora_folder(tmp_path / "support", base="/models/base")
    source = resolve_served_model(str(adapter))
    assert (source.base, source.name, source.adapter) == ("/models/base", "support", str(adapter))
    prompt = lora_folder(tmp_path / "prompt", base="/models/base", peft_type="PREFIX_TUNING")
    with pytest.raises(UserError, match="PREFIX_TUNING"):
        resolve_served_model(str(prompt))
    bottleneck = tmp_path / "bottleneck"
    bottleneck.mkdir()
    (bottleneck / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="bottleneck"):
        resolve_served_model(str(bottleneck))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        resolve_served_model(str(file))


def test_model_folder_and_hub_id_are_served_as_given(tmp_path):
    folder = model_folder(tmp_path / "merged")
    assert (resolve_served_model(str(folder)).name, resolve_served_model(str(folder)).base) == (
        "merged",
        str(folder),
    )
    hub = resolve_served_model("deepseek-ai/DeepSeek-V2-Lite-Chat")
    assert (hub.base, hub.name) == ("deepseek-ai/DeepSeek-V2-Lite-Chat", "DeepSeek-V2-Lite-Chat")


def test_a_path_that_does_not_exist_is_no_hub_id(tmp_path):
    for missing in (str(tmp_path / "gone"), "./gone", "~/gone", "runs/x/model"):
        with pytest.raises(UserError, match="does not exist"):
            resolve_served_model(missing)
