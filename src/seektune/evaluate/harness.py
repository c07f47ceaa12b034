"""Evaluate a seektune model on lm-evaluation-harness tasks: the `seektune` model type and `run_harness`.

lm-evaluation-harness (lm-eval) does the evaluation: its task YAMLs, prompts, scoring, metrics and results
dict are used as they are. What is ours is only what lm-eval cannot know: how a seektune model name is
loaded (`tiny-deepseek-v3` built offline, a run directory's `model/` folder, a LoRA/DoRA or bottleneck
adapter loaded onto its base), which `SeektuneLM` does through `seektune.models.load.load_model` before
handing the loaded model and tokenizer to lm-eval's own `HFLM`; checking task names before a model is
loaded; and a rich table of the results for the CLI (lm-eval's `make_table` writes Markdown text).

lm-eval is an optional extra (`pip install 'seektune[harness]'`), so it is imported inside functions
only, and the `seektune` model type is registered the first time it is needed (`seektune_lm_class`).
lm-eval 0.4.13 has no plugin entry points for model types: its registry is filled by importing
`lm_eval.models`, so a plain `lm_eval --model seektune` cannot find it. `python -m
seektune.evaluate.harness ARGS` runs lm-eval's own command line with the type registered (`main`).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from seektune.config import BUILTIN_BASE, ModelConfig
from seektune.errors import UserError

logger = logging.getLogger(__name__)

MODEL_TYPE = "seektune"
INSTALL_HINT = "pip install 'seektune[harness]'"
# HFLM arguments that load or split a model from a name; a seektune model is loaded by seektune instead.
_LOADING_ARGS = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan", "subfolder")
_GLOB_CHARS = frozenset("*?[")
_PREBUILT_MODEL_WARNINGS = ("`pretrained` model kwarg is not of type", "already-initialized model")


def require_lm_eval() -> None:
    """Raise a `UserError` with the install command when lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None


def harness_model_config(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> ModelConfig:
    """The `ModelConfig` for lm-eval model_args; a value ModelConfig refuses is a one-line `UserError`."""
    fields = {
        "name_or_path": str(model),
        "device": str(device),
        "dtype": str(dtype),
        "trust_remote_code": bool(trust_remote_code),
        "cache_dir": Path(cache_dir) if cache_dir is not None else None,
        "revision": revision,
    }
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "model"
        key = {"name_or_path": "model"}.get(key, key)
        raise UserError(
            f"--model seektune argument {key}={fields.get(key, fields['name_or_path'])!r}: {error['msg']}"
        ) from None


@functools.cache
def seektune_lm_class() -> type:
    """The `SeektuneLM` class, defined and registered with lm-eval as model type 'seektune' on first use."""
    require_lm_eval()
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own model types first)
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class SeektuneLM(HFLM):
        """lm-eval's `HFLM` on a model loaded by seektune (model_args: model, device, dtype, batch_size,
        max_length, trust_remote_code, cache_dir, revision; other HFLM arguments pass through)."""

        def __init__(
            self,
            model: str | None = None,
            device: str | None = "auto",
            dtype: str | None = "auto",
            batch_size: int | str = 1,
            max_length: int | None = None,
            trust_remote_code: bool = False,
            cache_dir: str | None = None,
            revision: str | None = None,
            pretrained: str | None = None,
            **kwargs: Any,
        ) -> None:
            refused = [key for key in _LOADING_ARGS if kwargs.get(key)]
            if refused:
                raise UserError(
                    f"--model seektune does not take {', '.join(refused)}: give the adapter folder or run "
                    "directory as model=PATH (seektune loads an adapter onto its base)"
                )
            from seektune.models.load import load_model

            name = str(model or pretrained or BUILTIN_BASE)  # pretrained=: the name hf users type by habit
            device = _available_device(device or "auto")
            cfg = harness_model_config(name, device, dtype or "auto", trust_remote_code, cache_dir, revision)
            loaded = load_model(cfg)
            with _quiet_prebuilt_model_warnings():
                super().__init__(
                    pretrained=loaded.model,
                    tokenizer=loaded.tokenizer,
                    backend="causal",
                    batch_size=batch_size,
                    max_length=int(max_length) if max_length else None,
                    **kwargs,
                )
            self.seektune_model = name
            self.seektune_path = loaded.path

        def get_model_info(self) -> dict:
            """What was evaluated, without HFLM's hub look-up of the model's commit."""
            params = list(self._model.parameters())
            return {
                "model_num_parameters": sum(p.numel() for p in params),
                "model_dtype": str(params[0].dtype).removeprefix("torch.") if params else "",
                "seektune_model": self.seektune_model,
                "seektune_model_path": self.seektune_path,
            }

    SeektuneLM.__module__ = __name__
    SeektuneLM.__qualname__ = "SeektuneLM"
    return register_model(MODEL_TYPE)(SeektuneLM)


def _available_device(device: str) -> str:
    """`device`, or a `UserError` when it names CUDA on a machine without (lm-eval's CLI default: cuda:0)."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r} but no CUDA GPU is available: pass --device cpu (lm-eval's command line "
            "defaults to cuda:0) or device='auto'"
        )
    return str(device)


class _DropPrebuiltModelWarnings(logging.Filter):
    """HFLM warns that a model passed as an object skips its loading arguments: true, and by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in _PREBUILT_MODEL_WARNINGS)


@contextmanager
def _quiet_prebuilt_model_warnings() -> Iterator[None]:
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    dropped = _DropPrebuiltModelWarnings()
    hf_logger.addFilter(dropped)
    try:
        yield
    finally:
        hf_logger.removeFilter(dropped)


def __getattr__(name: str) -> Any:
    """`from seektune.evaluate.harness import SeektuneLM` defines (and registers) the class lazily."""
    if name == "SeektuneLM":
        return seektune_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_task_manager(include_path: Path | None = None, include_defaults: bool = True) -> Any:
    """lm-eval's `TaskManager` over its own tasks (unless `include_defaults` is off) and `include_path`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).exists():
        raise UserError(
            f"include_path {str(include_path)!r} does not exist: give the folder that holds your task YAMLs"
        )
    paths = str(include_path) if include_path is not None else None
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def resolve_tasks(task_manager: Any, tasks: Sequence[str]) -> list[str]:
    """Task names (comma lists and glob patterns expanded) and YAML paths as lm-eval loads them.

    A name lm-eval does not know raises a `UserError` that says how to find tasks, before any model loads.
    """
    requested = [name.strip() for item in tasks for name in str(item).split(",") if name.strip()]
    if not requested:
        raise UserError("no lm-eval task given: name at least one, e.g. tasks=['hellaswag']")
    known = set(task_manager.all_tasks)
    resolved: list[str] = []
    missing: list[str] = []
    for name in requested:
        if name in known:
            matches = [name]
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            matches = [str(Path(name).resolve())]
        elif _GLOB_CHARS & set(name):
            matches = task_manager.match_tasks([name])
        else:
            matches = []
        if not matches:
            missing.append(name)
        resolved += [match for match in matches if match not in resolved]
    if missing:
        raise UserError(_unknown_tasks_message(missing, task_manager))
    return resolved


def _unknown_tasks_message(missing: list[str], task_manager: Any) -> str:
    close = [match for name in missing for match in difflib.get_close_matches(name, task_manager.all_tasks)]
    did_you_mean = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
    return (
        f"unknown lm-eval task {', '.join(map(repr, missing))}{did_you_mean}: list the known ones with "
        "`lm-eval ls tasks` (add --include_path DIR to see your own), and pass the folder holding a local "
        "task's YAML as include_path (seektune harness --include-path DIR)"
    )


@contextmanager
def _user_facing_data_errors() -> Iterator[None]:
    """A task's dataset that cannot be read (not cached offline, a missing file) is the user's to fix."""
    try:
        yield
    except (ConnectionError, FileNotFoundError) as exc:  # datasets raises these for both
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"lm-eval could not load a task's data ({first_line}): offline, a standard task needs its "
            "dataset in the datasets cache, or a local copy of the task (dataset_path: json, "
            "dataset_kwargs.data_files, read from the working folder when relative); see docs/harness.md"
        ) from exc


def run_harness(
    model: str,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    *,
    model_args: dict[str, Any] | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
) -> dict:
    """Evaluate `model` (a hub id, a folder, a run directory or 'tiny-deepseek-v3') on lm-eval `tasks`.

    Returns lm-eval's results dict ("results", "versions", "n-shot", "n-samples", "config", ...; with
    `log_samples` also "samples"), made JSON-safe the way lm-eval writes it. `model_args` adds SeektuneLM
    arguments (dtype, max_length, trust_remote_code, revision); `include_defaults=False` skips indexing
    lm-eval's ~15k built-in tasks (seconds) when every task comes from `include_path`.
    """
    require_lm_eval()
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 example per task, not {limit}")
    task_manager = make_task_manager(include_path, include_defaults)
    task_names = resolve_tasks(task_manager, tasks)
    seektune_lm_class()
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    args: dict[str, Any] = {"model": str(model), **(model_args or {})}
    if cache_dir is not None:
        args["cache_dir"] = str(cache_dir)
    logger.info("lm-eval: %s on %s", model, ", ".join(task_names))
    with _user_facing_data_errors():
        results = simple_evaluate(
            model=MODEL_TYPE,
            model_args=args,
            tasks=task_names,
            task_manager=task_manager,
            limit=limit,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            device=device,
            log_samples=log_samples,
        )
    return json.loads(json.dumps(results or {}, default=handle_non_serializable))


def harness_rows(results: dict, section: str = "results") -> list[tuple[str, ...]]:
    """One row per metric of every task (or group: section 'groups'): name, version, filter, n-shot,
    metric, direction (↑ higher is better, ↓ lower), value, stderr; as lm-eval's `make_table` lays them."""
    rows = []
    for key, entry in results.get(section, {}).items():
        name = str(entry.get("alias", key))
        version = str(results.get("versions", {}).get(key, "N/A"))
        n_shot = str(results.get("n-shot", {}).get(key, ""))
        better = results.get("higher_is_better", {}).get(key, {})
        for metric_filter, value in sorted(entry.items()):
            metric, _, filter_name = metric_filter.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue  # alias, name, sample_len ... and the stderr that goes with its metric
            stderr = entry.get(f"{metric}_stderr,{filter_name}", "")
            direction = {True: "↑", False: "↓"}.get(better.get(metric), "")
            rows.append((name, version, filter_name, n_shot, metric, direction, _fmt(value), _fmt(stderr)))
            name = version = n_shot = ""  # as lm-eval prints: the task's cells only on its first row
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def harness_table(results: dict) -> Any:
    """A rich `Table` of `run_harness`'s results, for `Console.print`."""
    from rich.table import Table

    table = Table(title="lm-evaluation-harness")
    for header, justify in (
        ("Task", "left"), ("Version", "right"), ("Filter", "left"), ("n-shot", "right"),
        ("Metric", "left"), ("", "center"), ("Value", "right"), ("Stderr", "right"),
    ):  # fmt: skip
        table.add_column(header, justify=justify)
    for row in harness_rows(results):
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (`lm-eval run ...`) with the 'seektune' model type registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        seektune_lm_class()
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except UserError as exc:  # one line, as the seektune CLI prints it
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    # Run in the importable module, not in this `__main__` copy, so the class is registered only once.
    from seektune.evaluate import harness

    harness.main()
