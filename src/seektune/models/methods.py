"""Fine-tuning methods: which parameters train, and the adapters that add new ones.

Method 'freeze' is ours (neither PEFT nor transformers selects trainable blocks): it freezes everything,
unfreezes the decoder blocks chosen by Python slices, then parameters matched by glob patterns, then
re-freezes the `freeze_modules` patterns, and logs a table of what trains. Patterns and slices that select
nothing are user errors, not silent no-ops.

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

`method.lora.include_experts` adapts the routed experts too. They are fused 3-D parameters (experts x out x
in, e.g. `model.layers.1.mlp.experts.gate_up_proj`), not `nn.Linear`, so module targets cannot reach them;
we pass their full names to PEFT as `target_parameters` (PEFT's `lora.ParamWrapper`: one rank-r update per
expert). With the rewrite switched off, those names reach PEFT unchanged, at creation and at load.
ParamWrapper has no dropout and no DoRA, so those settings are rejected before the model is touched.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import peft
from torch import nn

from seektune.config import FreezeConfig, LoraConfig, MethodConfig
from seektune.errors import UserError
from seektune.models.families import FamilyPreset

logger = logging.getLogger(__name__)

AVAILABLE_METHODS = ("full", "freeze", "lora", "dora", "qlora", "adapter", "prefix")

# Last name part of the module list that holds the decoder blocks (Llama/Qwen2/DeepSeek: model.layers,
# GPT-2: transformer.h, others: blocks).
_BLOCK_LIST_NAMES = ("layers", "h", "blocks")


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
    model: nn.Module, method: MethodConfig, family: FamilyPreset, gradient_checkpointing: bool = False
) -> tuple[Any, TrainableSummary]:
    """Make `model` trainable by `method`; LoRA/DoRA/QLoRA return the PEFT-wrapped model.

    QLoRA expects the base loaded in 4-bit; PEFT's `prepare_model_for_kbit_training` then casts norms
    to fp32 and enables input gradients (and checkpointing when `gradient_checkpointing`).
    """
    if method.name == "full":
        model.requires_grad_(True)
    elif method.name == "freeze":
        freeze_model(model, method.freeze)
    elif method.name in ("lora", "dora"):
        model = _wrap_lora(model, method.lora, family, use_dora=method.name == "dora")
    elif method.name == "qlora":  # the base was loaded in 4-bit (`load_model(four_bit=True)`)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = _wrap_lora(model, method.lora, family, use_dora=False)
    elif method.name == "adapter":
        from seektune.models.adapters import apply_adapters

        model = apply_adapters(model, method.adapter)
    elif method.name == "prefix":
        from seektune.models.prefix import apply_prefix

        model = apply_prefix(model, method.prefix)
    else:
        raise ValueError(f"unknown method {method.name!r}: the config accepts {', '.join(AVAILABLE_METHODS)}")
    summary = count_parameters(model)
    logger.info("method %s: %s", method.name, summary)
    return model, summary


@dataclass
class FreezeSelection:
    """What method 'freeze' left trainable: decoder block indices and the trainable parameter names."""

    blocks_name: str | None
    block_count: int
    block_indices: list[int]
    trainable_names: list[str]


def freeze_model(model: nn.Module, freeze: FreezeConfig) -> FreezeSelection:
    """Train only the chosen decoder blocks and `train_modules`, minus `freeze_modules`; log what trains."""
    blocks_name, blocks = find_decoder_blocks(model)
    block_count = len(blocks) if blocks is not None else 0
    block_indices = parse_layer_slices(freeze.train_layers, block_count)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    to_train = _matching_names(params, freeze.train_modules, "train_modules", model)
    to_freeze = _matching_names(params, freeze.freeze_modules, "freeze_modules", model)
    model.requires_grad_(False)
    for index in block_indices:
        blocks[index].requires_grad_(True)
    for name in to_train:
        params[name].requires_grad_(True)
    for name in to_freeze:
        params[name].requires_grad_(False)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise UserError(
            f"method 'freeze' with method.freeze.train_layers {freeze.train_layers!r}, train_modules "
            f"{freeze.train_modules!r} and freeze_modules {freeze.freeze_modules!r} leaves no parameter "
            "to train: select some blocks or modules, or freeze fewer"
        )
    selection = FreezeSelection(blocks_name, block_count, block_indices, trainable)
    block_params = {id(p) for index in block_indices for p in blocks[index].parameters()}
    logger.info("method freeze, what trains:\n%s", _trainable_table(model, selection, block_params))
    return selection


def find_decoder_blocks(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """The first ModuleList named like a decoder block list (e.g. model.model.layers), or (None, None)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES:
            return name, module
    return None, None


def parse_layer_slices(spec: str, block_count: int) -> list[int]:
    """Sorted block indices selected by `spec`: Python slices or single indices joined by commas
    ('8:', '-2:', '0:4,10:12', '5'); '' selects no block."""
    selected: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part and spec.strip() == "":
            continue
        if block_count == 0:
            raise UserError(
                f"method.freeze.train_layers {spec!r}: found no list of decoder blocks in this model (a "
                f"ModuleList named {', '.join(_BLOCK_LIST_NAMES)}); set method.freeze.train_layers to '' "
                "and name what trains in method.freeze.train_modules"
            )
        indices = _slice_indices(part, spec, block_count)
        if not indices:
            raise UserError(
                f"method.freeze.train_layers {spec!r}: {part!r} selects no decoder block; the model has "
                f"{block_count} blocks (0 to {block_count - 1})"
            )
        selected.update(indices)
    return sorted(selected)


def _slice_indices(part: str, spec: str, block_count: int) -> list[int]:
    fields = part.split(":")
    try:
        numbers = [int(f) if f.strip() else None for f in fields]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) > 3 or numbers == [None] or (len(numbers) == 3 and numbers[2] == 0):
        raise UserError(
            f"method.freeze.train_layers {spec!r}: cannot read {part!r} as a Python slice; write slices "
            "over the decoder blocks joined by commas, e.g. '8:', '-2:' or '0:4,10:12'"
        )
    blocks = range(block_count)
    if len(numbers) == 1:  # a single index, '5' or '-1'
        index = numbers[0]
        return [blocks[index]] if index is not None and -block_count <= index < block_count else []
    return list(blocks[slice(*numbers)])


def _matching_names(
    params: dict[str, nn.Parameter], patterns: list[str], key: str, model: nn.Module
) -> list[str]:
    """Parameter names matched by any of `patterns`; a pattern matching none is a user error."""
    matched: list[str] = []
    for pattern in patterns:
        names = [name for name in params if _name_matches(pattern, name)]
        if not names:
            raise UserError(
                f"method.freeze.{key}: {pattern!r} matches no parameter of this model; glob patterns match "
                f"parameter names or their modules, e.g. {', '.join(_module_overview(model))}"
            )
        matched.extend(names)
    return matched


def _name_matches(pattern: str, name: str) -> bool:
    """fnmatch on the parameter name, or on any module above it ('lm_head' matches 'lm_head.weight')."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _module_overview(model: nn.Module, limit: int = 12) -> list[str]:
    """A few module names to suggest: parents of parameters, block contents as 'model.layers.*.mlp'."""
    blocks_name, _ = find_decoder_blocks(model)
    names: dict[str, None] = {}
    for name, _ in model.named_parameters():
        if blocks_name and name.startswith(blocks_name + "."):
            rest = name[len(blocks_name) + 1 :].split(".")
            names[f"{blocks_name}.*.{rest[1]}" if len(rest) > 2 else f"{blocks_name}.*"] = None
        else:
            names[name.rsplit(".", 1)[0] if "." in name else name] = None
    return list(names)[:limit]


def _trainable_table(model: nn.Module, selection: FreezeSelection, block_params: set[int]) -> str:
    """Rows: the trained blocks, then each other module with trainable parameters; counts per row."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(name)
    blocks_row = f"{selection.blocks_name} blocks {_index_ranges(selection.block_indices)}"
    blocks_row += f" (of 0-{selection.block_count - 1})"
    rows: dict[str, int] = {blocks_row: 0} if selection.block_indices else {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in block_params:
            rows[blocks_row] += param.numel()
            continue
        row = name.rsplit(".", 1)[0] if "." in name else name
        tied = [alias for alias in aliases[id(param)] if alias != name]
        if tied:
            row += f" (tied to {', '.join(tied)}: training one trains both)"
        rows[row] = rows.get(row, 0) + param.numel()
    width = max(len(row) for row in rows)
    return "\n".join(f"  {row:<{width}}  {count:>14,}" for row, count in rows.items())


def _index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _wrap_lora(model: nn.Module, lora: LoraConfig, family: FamilyPreset, use_dora: bool) -> Any:
    targets = resolve_target_modules(model, lora.target_modules, family)
    expert_params = _expert_parameters_to_adapt(model, lora, use_dora) if lora.include_experts else None
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        target_parameters=expert_params,
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
        if expert_params and "ParamWrapper" in first_line:
            raise UserError(
                f"method.lora.include_experts: PEFT cannot adapt the fused routed experts with these "
                f"settings: {first_line}; change them or set method.lora.include_experts to false"
            ) from exc
        raise UserError(f"method.lora.target_modules {targets!r} rejected by PEFT: {first_line}") from exc


def make_trainable(
    model: Any, method: MethodConfig, family: FamilyPreset, gradient_checkpointing: bool = False
) -> tuple[Any, TrainableSummary]:
    """`apply_method` on a model that may already carry an adapter (a run that starts from a trained
    version): with LoRA/DoRA a loaded LoRA adapter keeps training (its own weights, the base frozen);
    with another method it is merged into its base first. Bottleneck adapters and prefixes cannot
    train further."""

    if isinstance(model, peft.PeftModel):
        if method.name in ("lora", "dora"):
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name)
            return model, count_parameters(model)
        model = model.merge_and_unload()
    elif getattr(model, "seektune_adapter_config", None) or getattr(model, "seektune_prefix_config", None):
        raise UserError(
            "training starts from a full model or a LoRA/DoRA adapter; a bottleneck-adapter or prefix "
            "model cannot be trained further: start from its base"
        )
    return apply_method(model, method, family, gradient_checkpointing)


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of the routed experts' fused weights: the 3-D parameters held directly by modules whose name
    ends with 'experts' (e.g. model.layers.1.mlp.experts.gate_up_proj); [] for a dense model."""
    return [
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if module_name.rsplit(".", 1)[-1] == "experts"
        for param_name, param in module.named_parameters(recurse=False)
        if param.dim() == 3
    ]


def _expert_parameters_to_adapt(model: nn.Module, lora: LoraConfig, use_dora: bool) -> list[str]:
    """The fused expert parameters for PEFT's `target_parameters`, after the checks PEFT would fail on
    half-way (having already wrapped the module targets)."""
    names = fused_expert_parameters(model)
    if not names:
        raise UserError(
            "method.lora.include_experts is true but this model has no fused routed experts (3-D parameters "
            "in a module named 'experts'); set method.lora.include_experts to false"
        )
    if use_dora:
        raise UserError(
            "method.lora.include_experts does not work with method.name 'dora': PEFT has no DoRA for fused "
            "expert parameters; use method.name 'lora' or set method.lora.include_experts to false"
        )
    if lora.dropout:
        raise UserError(
            f"method.lora.include_experts needs method.lora.dropout 0 (it is {lora.dropout}): PEFT's LoRA "
            "on fused expert parameters has no dropout on the adapter's input; set method.lora.dropout to 0"
        )
    return names


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


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"
) -> Any:
    """Load a LoRA/DoRA adapter saved by seektune onto its base model, every adapted module included; on a
    model that already is a PEFT model, as one more adapter named `adapter_name` (the server's several
    adapters on one base)."""
    with _targets_as_named(), warnings.catch_warnings():
        warnings.filterwarnings(  # as in _wrap_lora: transformers' deprecation, raised by PEFT's call
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        if isinstance(model, peft.PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return peft.PeftModel.from_pretrained(
            model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable
        )


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


def adding_lora_adapters() -> Any:
    """A context in which PEFT adds LoRA adapters to a seektune model with its targets read as named (a
    second adapter, e.g. TRL's reference copy 'ref' of preference tuning)."""
    return _targets_as_named()
