"""What every compression step returns, and how a step loads the model it starts from.

A step reads the folder of the step before and writes a new folder: the input is never modified.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.config import ModelConfig


@dataclass
class StepOutput:
    """A finished step: its model folder (loadable by `seektune.models.load.load_model`) and facts for the
    report (what was merged, the sparsity reached, the quantisation scheme, files written...)."""

    name: str
    model_dir: Path
    details: dict[str, Any] = field(default_factory=dict)
    # Extra files the step wrote besides the model folder (a GGUF file), shown in the report.
    files: list[Path] = field(default_factory=list)


def load_step_model(model_cfg: ModelConfig, folder: Path | str, other_model: bool = False) -> Any:
    """Load a step's model folder (or the chain's source) with the run's device, dtype and kernels.

    `other_model` (a distillation student, a merge base of another name): the run's hub revision and
    forced family belong to the run's model, not to this one, so they are not applied."""
    from seektune.models.load import load_model

    return load_model(
        other_model_config(model_cfg, folder)
        if other_model
        else (model_cfg.model_copy(update={"name_or_path": str(folder)}))
    )


def other_model_config(model_cfg: ModelConfig, name: Path | str) -> ModelConfig:
    """The run's loading settings (device, dtype, kernels) for another model: revision and family reset."""
    return model_cfg.model_copy(update={"name_or_path": str(name), "revision": None, "family": "auto"})


@contextmanager
def written_whole(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; it becomes `out_dir` only when the block ends
    without an error, so a failed step leaves no half-written model behind."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}-partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def save_step_model(model: Any, tokenizer: Any, out_dir: Path, generation_config: Any = None) -> None:
    """A step's model folder, whole or not at all: weights (safetensors), config, tokenizer (chat template
    included) and the generation config (`save_pretrained` writes the model's own; `generation_config`
    replaces it, e.g. the teacher's for a distilled student)."""
    with written_whole(Path(out_dir)) as partial:
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        if generation_config is not None:
            generation_config.save_pretrained(str(partial))
