"""`seektune serve --engine vllm`: hand the model and its LoRA adapters to vLLM's own server on a GPU host.

vLLM serves the same OpenAI API with its own engine (paged attention, CUDA kernels), so seektune does not
wrap it: it translates the `serve:` section into a `vllm serve` command line and replaces its own process
with it (`os.execvp`), so that vLLM receives the signals (SIGTERM: vLLM's graceful shutdown) and its exit
code is the container's. What is ours is that translation and the refusals: whatever of the `serve:`
section vLLM cannot honour is a UserError before anything starts, rather than a setting silently dropped:

- A/B splits (`serve.ab`): vLLM routes by model name only; put a router in front, or use --engine seektune.
- `serve.admin_keys` and `serve.adapter_dir`: vLLM's run-time adapter loading is a process-wide switch
  (VLLM_ALLOW_RUNTIME_LORA_UPDATING) guarded by the ordinary API keys, with no folder restriction.
- seektune's torchao int8/fp8 folders (`compress` quantize: made for the CPU, with fbgemm kernels here).
- seektune's bottleneck adapters and prefixes, and DoRA adapters: vLLM attaches plain LoRA only.

Limits vLLM has no flag for (max_tokens per request, max_n, max_queue, max_body_bytes,
default_max_tokens) are logged as not enforced; max_prompt_tokens + max_tokens becomes --max-model-len
and max_batch_size --max-num-seqs. The flags are those of `vllm serve` (vllm/entrypoints/openai/
cli_args.py and vllm/engine/arg_utils.py: --api-key and --served-model-name take several values,
--lora-modules takes name=path items, --max-lora-rank one of vLLM's allowed ranks).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from seektune.config import SeektuneConfig, ServeLimitsConfig
from seektune.errors import UserError

logger = logging.getLogger(__name__)

# vllm/config/lora.py: MaxLoRARanks. --max-lora-rank must be one of these (default 16).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# What vLLM cannot enforce, and the default each limit has in seektune (a non-default one gets a warning).
_UNENFORCED_LIMITS = ("max_tokens", "default_max_tokens", "max_n", "max_queue", "max_body_bytes")


def vllm_command(cfg: SeektuneConfig, model_path: str, adapters: dict[str, str]) -> list[str]:
    """The `vllm serve` command line for MODEL_OR_RUN (`model_path`) with `adapters` (name -> folder, on
    top of serve.adapters), or a UserError for what vLLM cannot take."""
    from seektune.serve.adapters import ADAPTER_NAME, resolve_served_model
    from seektune.serve.server import check_bind

    serve = cfg.serve
    _refuse_unsupported_settings(cfg)
    check_bind(serve)  # the same rule as the built-in server: no keys, loopback only
    source = resolve_served_model(model_path)  # refuses bottleneck adapters and prefixes
    for note in source.notes:
        logger.info("%s", note)
    base_name = serve.served_model_name or source.base.rstrip("/").split("/")[-1]
    wanted = {**serve.adapters, **adapters}
    if source.adapter is not None:
        if source.name in wanted or source.name == base_name:
            raise UserError(
                f"the adapter {model_path} would be served as {source.name!r}, a name already taken: "
                "set serve.served_model_name or rename the --adapter"
            )
        wanted = {source.name: source.adapter, **wanted}
    base = _local_base(cfg, source.base)
    _refuse_quantized(base)

    command = ["vllm", "serve", base, "--host", serve.host, "--port", str(serve.port)]
    command += ["--served-model-name", base_name]
    if serve.api_keys:
        command += ["--api-key", *serve.api_keys]
    command += ["--max-model-len", str(_max_model_len(base, serve.limits))]
    command += ["--max-num-seqs", str(serve.limits.max_batch_size)]
    command += _model_flags(cfg, base)
    if wanted:
        ranks = []
        modules = []
        for name, path in wanted.items():
            if name == base_name or not ADAPTER_NAME.fullmatch(name):
                what = "the base model's name" if name == base_name else "not valid"
                raise UserError(
                    f"adapter name {name!r} is {what}: use letters, digits and . _ : - (up to 64 "
                    "characters), other than the base's name"
                )
            ranks.append(_lora_rank(Path(path)))
            modules.append(_lora_module(name, str(Path(path).expanduser())))
        command += ["--enable-lora", "--lora-modules", *modules]
        command += ["--max-loras", str(len(wanted)), "--max-lora-rank", str(_vllm_rank(max(ranks)))]
    return command


def run_vllm(cfg: SeektuneConfig, model_path: str, adapters: dict[str, str]) -> None:
    """Replace this process with `vllm serve` for the model and adapters (never returns on success)."""
    command = vllm_command(cfg, model_path, adapters)
    executable = vllm_executable()
    _warn_unenforced(cfg.serve.limits)
    logger.info("handing over to vLLM: %s", " ".join(_shown(command)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(executable, [executable, *command[1:]])


def vllm_installed() -> bool:
    """Whether vLLM is importable here (without importing it: that takes seconds and wants a GPU)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_executable() -> str:
    """The `vllm` program of this environment; a UserError when vLLM or CUDA is missing."""
    if not vllm_installed():
        raise UserError(
            "--engine vllm needs vLLM, which is not installed: on a CUDA host run `pip install vllm` into "
            "this environment, or serve with --engine seektune (the built-in engine, CPU or GPU)"
        )
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "--engine vllm needs a CUDA GPU, and torch sees none here: run it on a CUDA host with a CUDA "
            "build of torch, or serve with --engine seektune (the built-in engine runs on the CPU too)"
        )
    beside = Path(sys.executable).parent / "vllm"  # the venv's script, also when the venv is not on PATH
    found = str(beside) if beside.is_file() else shutil.which("vllm")
    if found is None:
        raise UserError(
            "vLLM is importable but its `vllm` command is not on PATH nor beside this Python: reinstall it "
            "with `pip install vllm` into this environment"
        )
    return found


def _local_base(cfg: SeektuneConfig, base: str) -> str:
    """The built-in base's folder (built if needed: vLLM knows no such name), anything else as given."""
    from seektune.models.load import BUILTIN_BASE, resolve_model_path

    if base != BUILTIN_BASE:
        return base
    return resolve_model_path(cfg.model.model_copy(update={"name_or_path": base}))


def _refuse_unsupported_settings(cfg: SeektuneConfig) -> None:
    serve = cfg.serve
    if serve.ab:
        raise UserError(
            f"serve.ab ({', '.join(split.name for split in serve.ab)}): vLLM has no A/B split of one model "
            "name over two versions; remove serve.ab (and route in front of vLLM), or use --engine seektune"
        )
    if serve.admin_keys:
        raise UserError(
            "serve.admin_keys: vLLM has no separate admin keys (its run-time adapter loading is open to "
            "every API key); remove serve.admin_keys, or use --engine seektune"
        )
    if serve.adapter_dir is not None:
        raise UserError(
            "serve.adapter_dir: vLLM cannot restrict run-time adapter loading to a folder; remove "
            "serve.adapter_dir and list the adapters with --adapter NAME=PATH, or use --engine seektune"
        )


def _refuse_quantized(base: str) -> None:
    from seektune.compress.quantize import already_quantized

    method = already_quantized(base) if Path(base).is_dir() else None
    if method == "torchao":
        raise UserError(
            f"{base} holds torchao-quantised weights (seektune's int8/fp8 compression, made for the CPU "
            "kernels), which vLLM does not load: serve the float model (the run's model/ folder) with "
            "--engine vllm, or this folder with --engine seektune"
        )


def _max_model_len(base: str, limits: ServeLimitsConfig) -> int:
    """Prompt plus output limit, capped by the model's positions (vLLM refuses a longer context)."""
    wanted = limits.max_prompt_tokens + limits.max_tokens
    positions = _model_config(base).get("max_position_embeddings")
    if isinstance(positions, int) and 0 < positions < wanted:
        logger.info(
            "serve.limits allow %d tokens of prompt + output, the model %d positions: vLLM gets "
            "--max-model-len %d",
            wanted,
            positions,
            positions,
        )
        return positions
    return wanted


def _model_flags(cfg: SeektuneConfig, base: str) -> list[str]:
    """The model: section's settings that vLLM has flags for."""
    model = cfg.model
    flags = ["--seed", str(cfg.seed)]
    if model.dtype != "auto":
        flags += ["--dtype", model.dtype]
    if model.revision and not Path(base).is_dir():
        flags += ["--revision", model.revision]
    if model.trust_remote_code:
        flags.append("--trust-remote-code")
    template = model.chat_template
    if template is None and Path(base).is_dir() and not _has_chat_template(Path(base)):
        from seektune.models.families import DEEPSEEK_CHAT_TEMPLATE

        template = DEEPSEEK_CHAT_TEMPLATE  # what seektune's own server falls back to
    if template is not None:
        flags += ["--chat-template", template]
    return flags


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def _model_config(base: str) -> dict:
    try:
        return json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _lora_rank(folder: Path) -> int:
    """The rank of the LoRA adapter in `folder`; a UserError for anything vLLM cannot attach."""
    shown = str(folder)
    folder = folder.expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter {shown} is not a folder: give the folder a LoRA training run saved")
    if (folder / "adapters.safetensors").is_file() or (folder / "prefix.safetensors").is_file():
        raise UserError(
            f"{shown} holds seektune bottleneck adapters or a prefix, which vLLM cannot attach: retrain "
            "with method.name lora, or merge it into the model (seektune compress)"
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{shown} has no adapter_config.json: it is no PEFT adapter folder") from None
    except ValueError:
        raise UserError(f"{shown}/adapter_config.json is not valid JSON") from None
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{shown} holds a {config.get('peft_type')} adapter: vLLM serves LoRA adapters only; merge it "
            "(seektune compress) or use --engine seektune"
        )
    if config.get("use_dora"):
        raise UserError(
            f"{shown} is a DoRA adapter, which vLLM cannot attach: merge it into the model (seektune "
            "compress) and serve that, or use --engine seektune"
        )
    ranks = [int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > VLLM_LORA_RANKS[-1]:
        raise UserError(f"{shown} has LoRA rank {max(ranks)}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
    return max(ranks)


def _vllm_rank(rank: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values that holds `rank`."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


def _lora_module(name: str, path: str) -> str:
    """One --lora-modules item: name=path, or vLLM's JSON form where the path holds '=' or ','."""
    if "=" in path or "," in path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


def _warn_unenforced(limits: ServeLimitsConfig) -> None:
    defaults = ServeLimitsConfig()
    changed = [key for key in _UNENFORCED_LIMITS if getattr(limits, key) != getattr(defaults, key)]
    logger.log(
        logging.WARNING if changed else logging.INFO,
        "vLLM does not enforce serve.limits %s%s (requests are bounded by --max-model-len only, and a full "
        "server queues instead of answering 429)",
        ", ".join(_UNENFORCED_LIMITS),
        f"; set here but ignored: {', '.join(changed)}" if changed else "",
    )


def _shown(command: list[str]) -> list[str]:
    """The command with API keys masked, for the log."""
    shown, masking = [], False
    for item in command:
        if item.startswith("--"):
            masking = item == "--api-key"
            shown.append(item)
        else:
            shown.append("***" if masking else item)
    return shown
