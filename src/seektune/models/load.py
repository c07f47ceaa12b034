"""Load the base model and tokenizer named by `ModelConfig`, on the right device and dtype.

transformers does the loading. What is ours: choosing device and dtype from 'auto', resolving
`tiny-deepseek-v3` to the offline base, detecting the family before any weight is read, and turning
the errors users cause (a wrong path, a hub model missing from the offline cache) into one-line
`UserError`s that say what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from seektune.config import BUILTIN_BASE, ModelConfig
from seektune.errors import UserError
from seektune.models.adapters import is_adapter_folder, load_adapters
from seektune.models.families import FamilyPreset, detect_family, ensure_chat_template
from seektune.models.int8_cpu import apply_int8_kernel
from seektune.models.methods import count_parameters, load_adapter
from seektune.models.prefix import is_prefix_folder, load_prefix

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoadedModel:
    """A base model ready for `apply_method`, with what was decided while loading it."""

    model: Any
    tokenizer: Any
    family: FamilyPreset
    device: torch.device
    dtype: torch.dtype
    path: str


def pick_device(device: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; an explicit device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"model.device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"model.device is {device!r} but no CUDA GPU is available: use device: auto or cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(
                f"model.device is {device!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible"
            )
    return chosen


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that has it, else float32 (older GPUs train in fp16 mixed precision)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    chosen = getattr(torch, dtype)
    if device.type == "cpu" and chosen in (torch.bfloat16, torch.float16):
        logger.warning(
            "dtype %s on CPU: this CPU probably has no fast %s path (matmuls can run ~100x slower than "
            "in float32); use dtype: auto or float32 unless you know it has one",
            dtype,
            dtype,
        )
    return chosen


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ('org/name' with exactly one slash is a hub id)."""
    if name.startswith((".", "/", "~")):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in name for sep in separators) and not _HUB_ID.fullmatch(name)


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory, or a hub id left for transformers to resolve; the built-in base is built."""
    name = cfg.name_or_path
    if name == BUILTIN_BASE:
        from seektune.models.tiny import ensure_base  # lazy: building it pulls in the training stack

        return str(ensure_base(cfg.base, cfg.cache_dir))
    path = Path(name).expanduser()
    if not (path.exists() or _looks_local(name)):
        return name
    if not path.is_dir():
        raise UserError(
            f"model.name_or_path {name!r} is not a directory: give a folder written by save_pretrained, "
            f"a Hugging Face model id (org/name) or {BUILTIN_BASE!r}"
        )
    if (path / "model").is_dir() and (path / "status.json").is_file():
        path = path / "model"  # a seektune run directory: its trained model
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return str(path)  # an adapter folder; load_model loads its base first
    if not (path / "config.json").is_file():
        raise UserError(
            f"model directory {str(path)!r} has no config.json: point model.name_or_path at the folder "
            "save_pretrained wrote (config.json, weights and tokenizer files)"
        )
    return str(path)


def _missing_offline(exc: BaseException) -> bool:
    """Whether `exc` comes from a file that is not cached while the hub cannot be reached."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _user_facing_load_errors(name: str) -> Iterator[None]:
    """Turn transformers' file errors into one-line `UserError`s."""
    try:
        yield
    except ImportError as exc:  # e.g. attn_implementation: flash_attention_2 without its package
        raise UserError(f"could not load model {name!r}: {str(exc).strip().splitlines()[0]}") from exc
    except OSError as exc:
        if _missing_offline(exc):
            raise UserError(
                f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached: "
                f"download it on a connected machine (huggingface-cli download {name}) "
                "or give a local directory"
            ) from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model {name!r}: {first_line}") from exc


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    """The model's tokenizer with a pad token and a chat template (padding side left to callers)."""
    path = path or resolve_model_path(cfg)
    with _user_facing_load_errors(cfg.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {cfg.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    ensure_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter folder was trained on, or None when `adapter_dir` is no adapter folder."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file() or (Path(adapter_dir) / "config.json").is_file():
        return None
    base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {adapter_dir} does not name its base model (base_model_name_or_path)")
    return base


def four_bit_config(compute_dtype: torch.dtype) -> Any:
    """QLoRA's base quantisation: 4-bit NF4 weights with double-quantised constants (bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # Heads and routers stay in 16-bit: quantising them costs accuracy for little memory.
        llm_int8_skip_modules=["lm_head", "gate"],
    )


def _require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "method.name qlora loads the base in 4-bit through bitsandbytes, which is not installed: "
            "pip install bitsandbytes (on a machine with a CUDA GPU), or use method.name lora"
        )


def load_model(cfg: ModelConfig, four_bit: bool = False) -> LoadedModel:
    """Load model and tokenizer; the family is detected from config.json before the weights are read.

    An adapter folder (or a run directory holding one) loads its base model, then the adapter on top.
    With `four_bit` (method qlora) the base's linear layers load as 4-bit NF4 (`four_bit_config`).
    """
    path = resolve_model_path(cfg)
    base = adapter_base(path)
    if base is not None:
        # PEFT wraps nn.Linear and torchao's int8 Linear, not fbgemm's swapped module: torchao's kernels then
        base_cfg = cfg.model_copy(update={"name_or_path": base, "int8_kernel": "torchao"})
        loaded = load_model(base_cfg, four_bit)
        if is_adapter_folder(Path(path)):
            loaded.model = load_adapters(loaded.model, Path(path))
        elif is_prefix_folder(Path(path)):
            loaded.model = load_prefix(loaded.model, Path(path))
        else:
            loaded.model = load_adapter(loaded.model, path)
        loaded.path = path
        logger.info("loaded adapter %s on %s", path, base)
        return loaded
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    quantization = None
    if four_bit:
        _require_bitsandbytes()
        dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        quantization = four_bit_config(dtype)
    with _user_facing_load_errors(cfg.name_or_path):
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
        family = detect_family(config, cfg.family)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            attn_implementation=cfg.attn_implementation,
            quantization_config=quantization,
            device_map={"": device},  # straight onto the device: a large model never sits whole in CPU RAM
        )
    tokenizer = load_tokenizer(cfg, path)
    n_params = count_parameters(model).total
    int8_kernel = apply_int8_kernel(model, cfg.int8_kernel, device)  # after counting: fbgemm hides weights
    logger.info(
        "loaded %s: family %s, %s parameters, %s on %s%s",
        cfg.name_or_path,
        family.name,
        f"{n_params:,}",
        str(dtype).removeprefix("torch."),
        device,
        f", int8 kernel {int8_kernel}" if int8_kernel else "",
    )
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, device=device, dtype=dtype, path=path)
