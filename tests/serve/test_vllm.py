"""`--engine vllm`: the `vllm serve` command seektune builds, and what it refuses before handing over.

vLLM is not installed here (nor a GPU): the command is checked as a list, the hand-over with `os.execvp`
and the environment checks replaced by fakes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from seektune.cli import main
from seektune.config import ABSplitConfig, SeektuneConfig
from seektune.errors import UserError
from seektune.serve import vllm
from seektune.serve.vllm import run_vllm, vllm_command


def make_base(folder: Path, positions: int = 4096, chat_template: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", "max_position_embeddings": positions})
    )
    tokenizer_config = {"chat_template": "{{ messages }}"} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def make_lora(folder: Path, base: Path, r: int = 8, **extra: object) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "base_model_name_or_path": str(base), **extra}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def config(**serve: object) -> SeektuneConfig:
    return SeektuneConfig.model_validate({"serve": serve})


def flag(command: list[str], name: str) -> list[str]:
    """The values after `name` up to the next flag."""
    start = command.index(name) + 1
    end = next((i for i in range(start, len(command)) if command[i].startswith("--")), len(command))
    return command[start:end]


def test_command_carries_host_keys_adapters_and_limits(tmp_path):
    base = make_base(tmp_path / "base")
    legal = make_lora(tmp_path / "legal", base, r=4)
    chat = make_lora(tmp_path / "chat", base, r=24, rank_pattern={"o_proj": 12})
    cfg = config(
        host="0.0.0.0",
        port=9000,
        served_model_name="ds",
        api_keys=["k1", "k2"],
        adapters={"legal": str(legal)},
        limits={
            "max_prompt_tokens": 1000,
            "max_tokens": 500,
            "default_max_tokens": 100,
            "max_batch_size": 16,
        },
    )
    command = vllm_command(cfg, str(base), {"chat": str(chat)})
    assert command[:3] == ["vllm", "serve", str(base)]
    assert flag(command, "--host") == ["0.0.0.0"]
    assert flag(command, "--port") == ["9000"]
    assert flag(command, "--served-model-name") == ["ds"]
    assert flag(command, "--api-key") == ["k1", "k2"]
    assert flag(command, "--max-model-len") == ["1500"]
    assert flag(command, "--max-num-seqs") == ["16"]
    assert flag(command, "--enable-lora") == []
    assert flag(command, "--lora-modules") == [f"legal={legal}", f"chat={chat}"]
    assert flag(command, "--max-loras") == ["2"]
    assert flag(command, "--max-lora-rank") == ["32"]  # rank 24 rounds up to vLLM's next allowed rank
    assert flag(command, "--seed") == [str(cfg.seed)]
    assert "--chat-template" not in command  # the folder has its own


def test_plain_command_has_no_lora_or_key_flags(tmp_path):
    base = make_base(tmp_path / "base", positions=512, chat_template=False)
    command = vllm_command(config(), str(base), {})
    for absent in ("--api-key", "--enable-lora", "--lora-modules", "--max-lora-rank"):
        assert absent not in command
    assert flag(command, "--served-model-name") == ["base"]
    assert flag(command, "--host") == ["127.0.0.1"]
    assert flag(command, "--max-model-len") == ["512"]  # capped by the model's positions
    assert "{%" in flag(command, "--chat-template")[0]  # seektune's fallback template, as the own server


def test_adapter_folder_as_model_serves_its_base(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_lora(tmp_path / "legal-1", base)
    command = vllm_command(config(), str(adapter), {})
    assert command[2] == str(base)
    assert flag(command, "--lora-modules") == [f"legal-1={adapter}"]


def test_path_with_equals_sign_uses_vllm_json_form(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_lora(tmp_path / "r=4", base)
    (item,) = flag(vllm_command(config(), str(base), {"legal": str(adapter)}), "--lora-modules")
    assert json.loads(item) == {"name": "legal", "path": str(adapter)}


@pytest.mark.parametrize(
    ("serve", "expected"),
    [
        ({"ab": [ABSplitConfig(name="ds", versions={"base": 0.9, "x": 0.1})]}, "serve.ab"),
        ({"admin_keys": ["a"], "api_keys": ["k"]}, "serve.admin_keys"),
        ({"adapter_dir": "/tmp"}, "serve.adapter_dir"),
        ({"host": "0.0.0.0"}, "no serve.api_keys"),
    ],
)
def test_settings_vllm_cannot_take_are_refused(tmp_path, serve, expected):
    base = make_base(tmp_path / "base")
    with pytest.raises(UserError, match=expected):
        vllm_command(config(**serve), str(base), {})


def test_torchao_folder_is_refused(tmp_path):
    base = make_base(tmp_path / "int8")
    data = json.loads((base / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": {}}}
    (base / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"torchao.*model/ folder"):
        vllm_command(config(), str(base), {})


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d, b: make_lora(d, b, use_dora=True), "DoRA"),
        (lambda d, b: make_lora(d, b, peft_type="IA3"), "IA3 adapter"),
        (lambda d, b: make_lora(d, b, r=1024), "rank 1024"),
        (lambda d, b: (d.mkdir(), (d / "adapters.safetensors").write_bytes(b""))[0], "bottleneck"),
        (lambda d, b: d.mkdir(), "no adapter_config.json"),
        (lambda d, b: None, "not a folder"),
    ],
)
def test_adapters_vllm_cannot_attach_are_refused(tmp_path, make, expected):
    base = make_base(tmp_path / "base")
    make(tmp_path / "adapter", base)
    with pytest.raises(UserError, match=expected):
        vllm_command(config(), str(base), {"x": str(tmp_path / "adapter")})


def test_bottleneck_run_model_is_refused(tmp_path):
    model = tmp_path / "bottleneck"
    model.mkdir()
    (model / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="bottleneck"):
        vllm_command(config(), str(model), {})


@pytest.mark.parametrize("name", ["base", "bad name", ""])
def test_adapter_names_vllm_would_clash_on_are_refused(tmp_path, name):
    base = make_base(tmp_path / "base")
    adapter = make_lora(tmp_path / "a", base)
    with pytest.raises(UserError, match="adapter name"):
        vllm_command(config(), str(base), {name: str(adapter)})


def test_without_vllm_the_hand_over_says_what_to_do(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: False)
    monkeypatch.setattr(vllm.os, "execvp", pytest.fail)
    with pytest.raises(UserError, match=r"pip install vllm.*--engine seektune"):
        run_vllm(config(), str(base), {})


def test_without_cuda_the_hand_over_says_what_to_do(tmp_path, monkeypatch):
    import torch

    base = make_base(tmp_path / "base")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm.os, "execvp", pytest.fail)
    with pytest.raises(UserError, match=r"CUDA.*--engine seektune"):
        run_vllm(config(), str(base), {})


def test_refusals_come_before_the_environment_checks(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: False)
    with pytest.raises(UserError, match=r"serve.admin_keys"):
        run_vllm(config(admin_keys=["a"], api_keys=["k"]), str(base), {})


def test_hand_over_execs_vllm_with_the_command_and_masks_keys_in_the_log(tmp_path, monkeypatch, caplog):
    import torch

    base = make_base(tmp_path / "base")
    program = tmp_path / "bin" / "vllm"
    monkeypatch.setattr(vllm, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm.shutil, "which", lambda name: str(program))
    monkeypatch.setattr(vllm.sys, "executable", str(tmp_path / "python"))  # no vllm beside it
    calls = []
    monkeypatch.setattr(vllm.os, "execvp", lambda file, argv: calls.append((file, argv)))
    cfg = config(api_keys=["secret-key"])
    with caplog.at_level(logging.INFO, logger="seektune.serve.vllm"):
        run_vllm(cfg, str(base), {})
    expected = vllm_command(cfg, str(base), {})
    assert calls == [(str(program), [str(program), *expected[1:]])]
    assert "secret-key" not in caplog.text
    assert "--api-key ***" in caplog.text


def test_cli_engine_vllm_fails_in_one_line(tmp_path, monkeypatch, capsys):
    base = make_base(tmp_path / "base")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: False)
    code = main(["serve", str(base), "--engine", "vllm"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.rstrip("\n").splitlines()[-1]  # the lines before are the log's
    assert last.startswith("error: --engine vllm needs vLLM") and "Traceback" not in err


def test_changed_limits_vllm_ignores_are_named_in_a_warning(tmp_path, monkeypatch, caplog):
    import torch

    base = make_base(tmp_path / "base")
    monkeypatch.setattr(vllm, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm.shutil, "which", lambda name: "/usr/bin/vllm")
    monkeypatch.setattr(vllm.os, "execvp", lambda file, argv: None)
    with caplog.at_level(logging.INFO, logger="seektune.serve.vllm"):
        run_vllm(config(limits={"max_queue": 8}), str(base), {})
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "ignored: max_queue" in warning.getMessage()
