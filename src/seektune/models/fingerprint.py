"""A cheap fingerprint of a base model's weights, so an adapter is merged only into its own base.

Training writes the fingerprint of the base next to a LoRA/DoRA adapter (`base_fingerprint.json`); the
merge step compares it with the base it loads. Neither transformers nor PEFT records which weights an
adapter was trained on (`base_model_name_or_path` is only a name: a folder can be overwritten, a hub id
can move), hence this module.

What is hashed (sha256), chosen to be cheap even for a 70B model and to give the same value whatever is
attached or how the base is loaded:
- the architecture: a fixed list of config fields (model type, sizes, layer and expert counts);
- name, shape and a few fixed slices (rows 0, 1, middle and last; their first and last 16 values) of the
  input embedding, the output embedding (lm_head) and the 1-D parameters (norms, biases) of the first and
  last decoder block. Only these because they are never quantised: bitsandbytes (QLoRA's 4-bit base),
  torchao and FP8 checkpoints change the Linear weights' storage and shape, not these;
- the values rounded to bfloat16 first, so a base loaded in float32 and the same base loaded in bfloat16
  (training on a GPU, merging on a CPU) give one fingerprint.
PEFT's wrappers are read through (`get_base_layer`, `original_module`), and seektune's bottleneck adapters
skipped, so a model with adapters attached has the fingerprint of its base.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seektune.rundir import atomic_write_json

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "base_fingerprint.json"
FINGERPRINT_VERSION = 1
_CONFIG_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "tie_word_embeddings",
)  # fmt: skip
_EDGE = 16  # values taken from each end of a sampled row


def base_fingerprint(model: nn.Module) -> str:
    """`sha256:<hex>` of the base's architecture and a few fixed weight slices (see the module docstring);
    `model` may be a PeftModel or carry seektune adapters: the result is its base's."""
    base = _peft_base(model)
    digest = hashlib.sha256()
    config = getattr(base, "config", None)
    architecture = {key: _json_value(getattr(config, key, None)) for key in _CONFIG_FIELDS}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    for name, tensor in _sampled_tensors(base):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(_slices(name, tensor).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def write_fingerprint(folder: Path, model: nn.Module) -> Path:
    """Write `model`'s base fingerprint and the base's name (for messages) to `base_fingerprint.json`."""
    base = _peft_base(model)
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    path = Path(folder) / FINGERPRINT_FILE
    atomic_write_json(
        path, {"version": FINGERPRINT_VERSION, "fingerprint": base_fingerprint(model), "base": name}
    )
    return path


def read_fingerprint(folder: Path) -> str | None:
    """The fingerprint saved in `folder`, or None when there is none (or one this version cannot compare)."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if not isinstance(saved, dict) or saved.get("version") != FINGERPRINT_VERSION:
        logger.warning("ignoring %s: not a version-%d base fingerprint", path, FINGERPRINT_VERSION)
        return None
    fingerprint = saved.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def _peft_base(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (still with PEFT's layers inside), else `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module inside PEFT's tuner layers (LoRA, DoRA, ParamWrapper) and modules_to_save wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    while True:
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = module.original_module
        else:
            return module


def _sampled_tensors(base: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the embeddings and the first and last block's 1-D parameters, in a fixed order."""
    for name, getter in (("input_embeddings", "get_input_embeddings"), ("lm_head", "get_output_embeddings")):
        module = getattr(base, getter, lambda: None)()
        weight = getattr(_unwrapped(module), "weight", None) if module is not None else None
        if isinstance(weight, torch.Tensor):
            yield name, weight
    from seektune.models.methods import find_decoder_blocks

    _, blocks = find_decoder_blocks(base)
    if not blocks:
        return
    for label, block in (("first_block", blocks[0]), ("last_block", blocks[-1])):
        for name, parameter in sorted(_base_parameters(block)):
            if parameter.dim() == 1 and parameter.is_floating_point():
                yield f"{label}.{name}", parameter


def _base_parameters(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """`module`'s parameters with PEFT's wrappers read through and seektune's bottleneck adapters left out;
    names are those of the plain base."""
    from seektune.models.adapters import BottleneckAdapter

    module = _unwrapped(module)
    for name, parameter in module.named_parameters(recurse=False):
        yield prefix + name, parameter
    for name, child in module.named_children():
        if not isinstance(_unwrapped(child), BottleneckAdapter):
            yield from _base_parameters(child, f"{prefix}{name}.")


def _slices(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Fixed slices of `tensor` as float32 on the CPU, rounded to bfloat16 (dtype-independent)."""
    if tensor.is_meta or tensor.numel() == 0:
        raise ValueError(
            f"{name} has no values in this process (meta or sharded weights): gather the model first"
        )
    tensor = tensor.detach()
    if tensor.dim() == 1:
        middle = tensor.shape[0] // 2
        parts = [tensor[:_EDGE], tensor[middle : middle + _EDGE], tensor[-_EDGE:]]
    else:
        rows = tensor.flatten(1)  # a view of a contiguous parameter: nothing is copied but the slices
        picks = sorted({0, min(1, rows.shape[0] - 1), rows.shape[0] // 2, rows.shape[0] - 1})
        parts = [part for index in picks for part in (rows[index, :_EDGE], rows[index, -_EDGE:])]
    return torch.cat(parts).to(torch.bfloat16).to(device="cpu", dtype=torch.float32)


def _json_value(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
