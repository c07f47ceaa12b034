"""Compression step 'merge': fold a LoRA/DoRA adapter into its base and save a plain Hugging Face model.

PEFT does the merge (`merge_and_unload`) and transformers the saving (`save_pretrained`, safetensors in the
hub layout that vLLM and transformers load). What is ours:
- deciding what can be merged: a PEFT LoRA/DoRA adapter folder yes; seektune's bottleneck adapters and
  prefixes are no linear delta on a base weight, so they are refused with what to do instead;
- checking that the base is the one the adapter was trained on: training writes the base's fingerprint
  next to the adapter (`seektune.models.fingerprint`), PEFT itself only records a name; a base of another
  size, which PEFT reports as a state-dict size mismatch, becomes one `UserError` too;
- saving the tokenizer the adapter was trained with (its chat template included) beside the weights, and
  the whole folder atomically (`save_step_model`); the adapter folder is only read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from seektune.compress.steps import StepOutput, load_step_model, save_step_model
from seektune.config import MergeConfig, ModelConfig
from seektune.errors import UserError
from seektune.models.adapters import is_adapter_folder
from seektune.models.fingerprint import base_fingerprint, read_fingerprint
from seektune.models.prefix import is_prefix_folder

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def needs_merge(source: Path) -> bool:
    """True when `source` (a model folder or a run directory) is a PEFT LoRA/DoRA adapter to merge.

    A plain model (config.json present), a hub id or any other folder is False; seektune's bottleneck
    adapter and prefix folders, and PEFT adapters of other types, raise a `UserError` (they cannot be merged).
    """
    folder = model_folder(Path(source))
    if is_adapter_folder(folder):
        raise _unmergeable(folder, "holds bottleneck adapters (method adapter)")
    if is_prefix_folder(folder):
        raise _unmergeable(folder, "holds a prefix (method prefix)")
    if not (folder / PEFT_CONFIG_FILE).is_file() or (folder / "config.json").is_file():
        return False
    peft_type = _adapter_config(folder).get("peft_type")
    if peft_type != "LORA":
        raise _unmergeable(folder, f"holds a PEFT {peft_type} adapter")
    return True


def model_folder(source: Path) -> Path:
    """The model folder of a seektune run directory (`<run>/model`), else `source` itself."""
    if (source / "model").is_dir() and (source / "status.json").is_file():
        return source / "model"
    return source


def merge_adapter(source: Path, out_dir: Path, cfg: MergeConfig, model_cfg: ModelConfig) -> StepOutput:
    """Merge the LoRA/DoRA adapter in `source` into its base (`cfg.base`, else the one the adapter names)
    and write the plain model, tokenizer and generation config to `out_dir`, whole or not at all."""
    folder = model_folder(Path(source))
    if not needs_merge(folder):
        raise UserError(
            f"{folder} is no LoRA/DoRA adapter folder (adapter_config.json without config.json): there is "
            "nothing to merge; set compress.merge.enabled: false or give the adapter's folder"
        )
    adapter = _adapter_facts(folder)
    base_name = cfg.base or adapter["trained_on"]
    loaded = load_step_model(model_cfg, base_name, other_model=base_name != model_cfg.name_or_path)
    verified = _check_base(folder, loaded.model, base_name, adapter["trained_on"])
    peft_model = _attach_adapter(loaded.model, folder, base_name)
    merged_modules = _count_tuner_layers(peft_model)
    merged = peft_model.merge_and_unload()
    tokenizer = _adapter_tokenizer(folder, model_cfg) or loaded.tokenizer
    save_step_model(merged, tokenizer, Path(out_dir))
    logger.info(
        "merged %d %s modules of %s into %s: %s", merged_modules, adapter["type"], folder, base_name, out_dir
    )
    details = {
        "base": base_name,
        "base_verified": verified,
        "adapter": {key: value for key, value in adapter.items() if key != "trained_on"},
        "merged_modules": merged_modules,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    return StepOutput(name="merge", model_dir=Path(out_dir), details=details)


def _unmergeable(folder: Path, what: str) -> UserError:
    return UserError(
        f"{folder} {what}: its weights are no linear delta on the base's weights, so they cannot be merged "
        "into it, and no compression step can take it: serve or evaluate it together with its base as it "
        "is (compress.enabled: false), or retrain with method.name lora (or dora) to compress the model"
    )


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{folder / PEFT_CONFIG_FILE} cannot be read ({exc}): give a folder written by training"
        ) from exc


def _adapter_facts(folder: Path) -> dict[str, Any]:
    """What the report says about the adapter, and the base it names (`trained_on`), from PEFT's config."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    if not config.base_model_name_or_path:
        raise UserError(
            f"adapter {folder} does not name its base model (base_model_name_or_path in "
            f"{PEFT_CONFIG_FILE}): set compress.merge.base to the model it was trained on"
        )
    targets = config.target_modules
    return {
        "type": "dora" if config.use_dora else "lora",
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "target_parameters": sorted(config.target_parameters or []),
        "trained_on": config.base_model_name_or_path,
    }


def _check_base(folder: Path, base: Any, base_name: str, trained_on: str) -> bool:
    """True when the adapter's recorded base fingerprint matches `base`; False (and a warning) when the
    adapter has none; a `UserError` when it differs."""
    expected = read_fingerprint(folder)
    if expected is None:
        logger.warning(
            "adapter %s has no base fingerprint (it was not trained by seektune): cannot verify that %s is "
            "the base it was trained on; merging anyway",
            folder,
            base_name,
        )
        return False
    if base_fingerprint(base) != expected:
        raise UserError(
            f"adapter {folder} was trained on {trained_on!r}, but the base loaded for the merge "
            f"({base_name!r}) has other weights: merging an adapter into a model it was not trained on "
            "gives a broken model; set compress.merge.base (or restore the base at that path) to the model "
            "it was trained on"
        )
    return True


def _attach_adapter(base: Any, folder: Path, base_name: str) -> Any:
    """The adapter on `base` (PEFT, as `load_model` attaches it); PEFT's shape errors as one `UserError`."""
    from seektune.models.methods import load_adapter

    try:
        return load_adapter(base, folder)
    except (RuntimeError, ValueError) as exc:
        text = str(exc)
        if "size mismatch" not in text and "not found in the base model" not in text:
            raise
        first = next(
            (line.strip() for line in text.splitlines() if "size mismatch" in line), text.splitlines()[0]
        )
        raise UserError(
            f"adapter {folder} does not fit base {base_name!r} ({first.rstrip('.')}): it was trained on a "
            "model of another size or architecture; set compress.merge.base to the model it was trained on"
        ) from exc


def _count_tuner_layers(model: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def _adapter_tokenizer(folder: Path, model_cfg: ModelConfig) -> Any:
    """The tokenizer saved with the adapter by training (its chat template included), or None."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from seektune.models.load import load_tokenizer

    return load_tokenizer(model_cfg, str(folder))
