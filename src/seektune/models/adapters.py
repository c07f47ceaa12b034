"""Bottleneck adapters (Houlsby / Pfeiffer style) for the method 'adapter'.

An adapter is a small residual MLP, ``x + up(act(down(x)))``, that sits after the attention and/or the MLP
sub-layer of every decoder block; only the adapters train, the base stays frozen.

Why our own code: PEFT (checked in 0.21, `peft/tuners/`) has no bottleneck adapter (its tuners are LoRA
and relatives, IA3, prompt/prefix tuning, ...; `shadow` is a parallel shadow network, not an adapter), and
the AdapterHub `adapters` package supports a fixed list of architectures that does not include
DeepSeek-V2/V3. The mechanism is small, so it lives here.

How it attaches: each adapter is registered as a child of its decoder block (``self_attn_adapter``,
``mlp_adapter``) and applied by a forward hook on the sub-layer (``self_attn``, ``mlp``; for DeepSeek MoE
blocks ``mlp`` is the whole MoE module). Unlike replacing the sub-layer with a wrapper, this keeps every
base parameter name unchanged, so a state dict of the adapted model is the base's plus the adapters'.
The up-projection starts at zero, so a freshly adapted model computes exactly what the base computes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save
from torch import nn

from seektune.config import AdapterConfig
from seektune.errors import UserError
from seektune.rundir import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
CONFIG_KEY = "seektune_adapter"
SUBLAYER_OF_POSITION = {"attention": "self_attn", "mlp": "mlp"}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """``x + up(dropout(act(down(x))))`` with ``up`` zero-initialised, so it starts as the identity."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.activation = _ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: (batch, seq, hidden) -> down (batch, seq, bottleneck) -> up (batch, seq, hidden)
        return hidden_states + self.up(self.dropout(self.activation(self.down(hidden_states))))


class _AdapterHook:
    """Forward hook that passes a sub-layer's output (its first element when a tuple) through `adapter`.

    A callable object rather than a closure so that `copy.deepcopy` of the model maps it onto the copied
    adapter (deepcopy's memo shares the copy with the block's child)."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.adapter(output[0]), *output[1:])
        return self.adapter(output)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze `model` and attach a trainable bottleneck adapter after the `cfg.positions` sub-layers of
    every decoder block; returns the same model object."""
    blocks = decoder_blocks(model)
    hidden_size = _hidden_size(model)
    bottleneck_size = hidden_size // cfg.reduction_factor
    if bottleneck_size < 1:
        raise UserError(
            f"method.adapter.reduction_factor {cfg.reduction_factor} leaves no bottleneck for hidden size "
            f"{hidden_size}: use a value of at most {hidden_size}"
        )
    model.requires_grad_(False)
    for index, block in enumerate(blocks):
        for position in cfg.positions:
            _attach(block, index, position, hidden_size, bottleneck_size, cfg)
    logger.info(
        "adapters (bottleneck %d, %s) after %s of %d blocks",
        bottleneck_size,
        cfg.non_linearity,
        " and ".join(cfg.positions),
        len(blocks),
    )
    model.seektune_adapter_config = cfg  # read back by `save_adapters` callers (the trainer)
    return model


def _attach(
    block: nn.Module, index: int, position: str, hidden: int, bottleneck: int, cfg: AdapterConfig
) -> None:
    sublayer_name = SUBLAYER_OF_POSITION[position]
    sublayer = getattr(block, sublayer_name, None)
    if not isinstance(sublayer, nn.Module):
        raise UserError(
            f"method.adapter.positions has {position!r}, but decoder block {index} "
            f"({type(block).__name__}) has no '{sublayer_name}' sub-layer: remove {position!r}"
        )
    adapter_name = f"{sublayer_name}_adapter"
    if hasattr(block, adapter_name):
        raise ValueError(f"decoder block {index} already has an adapter {adapter_name!r}")
    reference = _floating_parameter(block)
    adapter = BottleneckAdapter(hidden, bottleneck, cfg.non_linearity, cfg.dropout)
    adapter.to(device=reference.device, dtype=reference.dtype)
    adapter.train(block.training)
    block.add_module(adapter_name, adapter)
    sublayer.register_forward_hook(_AdapterHook(adapter))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` in Llama, Qwen2, DeepSeek-V2/V3)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UserError(
            f"method.name 'adapter' needs a model with decoder blocks at model.model.layers "
            f"(Llama, Qwen2, DeepSeek-V2/V3); {type(model).__name__} has none: choose another method.name"
        )
    return layers


def _hidden_size(model: nn.Module) -> int:
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise UserError(
            f"method.name 'adapter' needs config.hidden_size, which {type(model).__name__} does not "
            f"have: choose another method.name"
        )
    return hidden_size


def _floating_parameter(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter of `module` (quantised weights are integer), for dtype and device."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take dtype from")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only, under their names in `model`'s state dict."""
    return {
        f"{name}.{key}": tensor
        for name, module in model.named_modules()
        if isinstance(module, BottleneckAdapter)
        for key, tensor in module.state_dict().items()
    }


def save_adapters(model: nn.Module, path: Path, cfg: AdapterConfig) -> None:
    """Write `adapters.safetensors` and `adapter_config.json` into the folder `path`, atomically."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no adapters to save; call apply_adapters first")
    path = Path(path)
    atomic_write_bytes(path / ADAPTER_WEIGHTS_FILE, save(tensors))
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    atomic_write_json(
        path / ADAPTER_CONFIG_FILE,
        {CONFIG_KEY: cfg.model_dump(), "hidden_size": _hidden_size(model), "base_model_name_or_path": base},
    )


def is_adapter_folder(path: Path) -> bool:
    """True when `path` holds adapters saved by `save_adapters` (not a PEFT adapter)."""
    config_file = Path(path) / ADAPTER_CONFIG_FILE
    if not config_file.is_file() or not (Path(path) / ADAPTER_WEIGHTS_FILE).is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_adapters(model: nn.Module, path: Path, is_trainable: bool = False) -> nn.Module:
    """Attach the adapters saved in folder `path` (by `save_adapters`) to the base `model`."""
    path = Path(path)
    cfg, saved_hidden = _read_adapter_config(path)
    hidden_size = _hidden_size(model)
    if saved_hidden != hidden_size:
        raise UserError(
            f"the adapters in {path} were trained on a model of hidden size {saved_hidden}, but this base "
            f"model has hidden size {hidden_size}: load them onto the base they were trained on"
        )
    apply_adapters(model, cfg)
    saved = load_file(path / ADAPTER_WEIGHTS_FILE)
    expected = adapter_state_dict(model)
    if saved.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        raise UserError(
            f"the adapters in {path} do not fit this base model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): load them onto the base they were trained on"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(saved[name])
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            module.requires_grad_(is_trainable)
    return model


def _read_adapter_config(path: Path) -> tuple[AdapterConfig, int]:
    config_file, weights_file = path / ADAPTER_CONFIG_FILE, path / ADAPTER_WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"{path} is not a seektune adapter folder: it needs {ADAPTER_CONFIG_FILE} and "
            f"{ADAPTER_WEIGHTS_FILE} (written by save_adapters); point at the folder a method 'adapter' "
            f"run saved"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        return AdapterConfig(**raw[CONFIG_KEY]), int(raw["hidden_size"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(
            f"{config_file} is not a valid seektune adapter config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}): save the adapters again with save_adapters"
        ) from exc
