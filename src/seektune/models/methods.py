"""Fine-tuning methods: which parameters train, and the adapters that add new ones.

PEFT builds the adapters. What is ours: mapping `MethodConfig` onto PEFT, resolving `target_modules:
auto` to the family preset (keeping only the names this model has, so one preset serves DeepSeek-V2
and V2-Lite), rejecting target names that match no module *before* PEFT runs (PEFT only complains
when none matches, so a typo next to a valid name would silently adapt less), and a parameter count
that says how much trains.

One PEFT behaviour is worked around: with transformers 5.x, PEFT (seen in 0.21.2) rewrites the target names
`gate_proj`/`up_proj`/`down_proj` of DeepSeek-V2/V3 (which transformers maps like Qwen2-MoE) into
`target_parameters` on the fused routed experts, as if they were transformers-v4 names of the expert
`nn.Linear`s. That silently drops LoRA from the dense MLP and the shared experts, and it also drops those
weights when a saved adapter is loaded back (huggingface/peft#3711). seektune only ever names modules of
the model it was given (checked below), so `apply_method` and `load_adapter` switch that rewrite off.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
from torch import nn

from seektune.config import LoraConfig, MethodConfig
from seektune.errors import UserError
from seektune.models.families import FamilyPreset

logger = logging.getLogger(__name__)

AVAILABLE_METHODS = ("full", "lora", "dora")


@dataclass
class TrainableSummary:
    """How many parameters train, out of all the model's parameters."""

    trainable: int
    total: int

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({self.ratio:.2%})"


def count_parameters(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params)
    )


def apply_method(
    model: nn.Module, method: MethodConfig, family: FamilyPreset
) -> tuple[Any, TrainableSummary]:
    """Make `model` trainable by `method`; LoRA/DoRA return the PEFT-wrapped model."""
    if method.name == "full":
        model.requires_grad_(True)
    elif method.name in ("lora", "dora"):
        model = _wrap_lora(model, method.lora, family, use_dora=method.name == "dora")
    else:
        raise UserError(
            f"method.name {method.name!r} is not available in this version of seektune yet; "
            f"use {', '.join(AVAILABLE_METHODS[:-1])} or {AVAILABLE_METHODS[-1]}"
        )
    summary = count_parameters(model)
    logger.info("method %s: %s", method.name, summary)
    return model, summary


def _wrap_lora(model: nn.Module, lora: LoraConfig, family: FamilyPreset, use_dora: bool) -> Any:
    targets = resolve_target_modules(model, lora.target_modules, family)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        with _targets_as_named(), warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every call (peft 0.21,
            # transformers 5.2x): a warning about their code, not the user's.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target name that is a container module, not a layer
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"method.lora.target_modules {targets!r} rejected by PEFT: {first_line}") from exc


def resolve_target_modules(
    model: nn.Module, target_modules: list[str] | str, family: FamilyPreset
) -> list[str] | str:
    """The `target_modules` handed to PEFT: the preset's names present in `model`, 'all-linear', or the
    user's list, each name of which must match a module (PEFT's rule: the full name or its last parts)."""
    if target_modules == "all-linear":
        return "all-linear"
    names = [name for name, _ in model.named_modules()]
    if target_modules == "auto":
        present = [t for t in family.lora_target_modules if _matches_any(t, names)]
        if not present:
            raise UserError(
                f"none of the {family.name} preset's LoRA targets ({', '.join(family.lora_target_modules)}) "
                f"is a module of this model: set method.lora.target_modules, e.g. to some of "
                f"{', '.join(_linear_leaf_names(model))}"
            )
        dropped = sorted(set(family.lora_target_modules) - set(present))
        if dropped:
            logger.debug("preset targets absent from this model, skipped: %s", ", ".join(dropped))
        return present
    missing = [t for t in target_modules if not _matches_any(t, names)]
    if missing:
        raise UserError(
            f"method.lora.target_modules: {', '.join(repr(m) for m in missing)} match no module of this "
            f"model; linear modules it has: {', '.join(_linear_leaf_names(model))}"
        )
    return list(target_modules)


def _matches_any(target: str, module_names: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for name in module_names)


def _linear_leaf_names(model: nn.Module, limit: int = 12) -> list[str]:
    """Distinct last name parts of the model's nn.Linear modules, in model order."""
    leaves = dict.fromkeys(
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    )
    return list(leaves)[:limit]


def load_adapter(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """Load a LoRA/DoRA adapter saved by seektune onto its base model, every adapted module included."""
    with _targets_as_named():
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


@contextmanager
def _targets_as_named() -> Iterator[None]:
    """Keep PEFT from re-reading module targets as transformers-v4 MoE expert names (see module docstring)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the v4 -> v5 rewrite, or transformers 4.x
        conversion = None
    name = "convert_peft_config_for_transformers"
    original = getattr(conversion, name, None)
    if original is None:
        yield
        return
    setattr(conversion, name, _leave_config_as_is)
    try:
        yield
    finally:
        setattr(conversion, name, original)


def _leave_config_as_is(*args: Any, **kwargs: Any) -> None:
    return None
