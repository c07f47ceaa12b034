"""The compression chain: merge → distil → prune → QAT → export → quantise, each step checked.

Every step reads the folder of the step before and writes a folder of its own under `<run>/compress/`
(`01-merge`, `02-distill`, ...), so the model the chain starts from is never modified. After each step the
new model is compared with the one before on a fixed prompt set (`verify.check_step`: logits, greedy
tokens, perplexity, EOS) against that step's `check` limits, and measured for the before/after table
(`table.measure_model`). A step that fails its check stops the chain: its folder is renamed
`<folder>.rejected`, the report says which limit it broke, and the error reaches the user, so a broken
merged or quantised model is never the chain's result.

The GGUF export runs on the last float model, before torchao quantisation (llama.cpp quantises its own
way: `compress.export.gguf_type`); its check reads the file back, and the chain goes on from the float
model. The final folder is checked for what vLLM would not load (`export.vllm_layout_problems`).

Only this module knows the order of the steps; each step is a plain function of its own config section.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.compress.table import before_after_rows
from seektune.config import CPU_QUANTIZE_METHODS, SeektuneConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError
from seektune.logs import log_event
from seektune.rundir import RunDir, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

COMPRESS_DIR = "compress"
RESULTS_FILE = f"{COMPRESS_DIR}/results.json"
REPORT_FILE = f"{COMPRESS_DIR}/report.md"
# Distillation hands on a new model (the student), so it comes before the steps that shrink the model in
# hand: pruning the teacher would be thrown away. QAT keeps pruned weights at zero (`qat_finetune`).
ORDER = ("merge", "distill", "prune", "qat", "export", "quantize")


@dataclass
class CompressResult:
    """What the chain produced: the final model folder, each step's record and the before/after rows."""

    source: str
    final_model: Path | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    status: str = "completed"
    vllm_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "source": self.source,
            "final_model": str(self.final_model) if self.final_model else None,
            "files": self.files,
            "vllm_problems": self.vllm_problems,
            "steps": self.steps,
            "table": before_after_rows(self.rows),  # each row with its changes against the source
        }


def needs_training_data(cfg: SeektuneConfig) -> bool:
    """Whether a step trains (pruning's recovery, distillation, QAT), so the data needs a training split."""
    c = cfg.compress
    return (c.prune.enabled and c.prune.recovery_steps > 0) or c.distill.enabled or c.qat.enabled


ADAPTER_METHODS = ("lora", "dora", "qlora")  # what these train is a PEFT LoRA/DoRA folder


def check_compress_config(cfg: SeektuneConfig, source: Path | None = None) -> None:
    """What cannot run, found before anything runs: a GPU quantisation without a GPU (or bitsandbytes, or
    an fp8-capable GPU), a GGUF export of an architecture llama.cpp's format does not hold, a student whose
    tokenizer is not the teacher's; and, for `seektune run` (no `source`, no compress.source), what the
    training method will hand the chain: bottleneck adapters and prefixes no step can take, nothing to do
    for a full model, an adapter with merge off.

    `source` is the model the chain starts from; None: compress.source, else the run's base (what a run
    trains has its base's architecture and tokenizer)."""
    c = cfg.compress
    if c.quantize.method not in ("none", *CPU_QUANTIZE_METHODS):
        from seektune.compress.quantize import require_gpu_method

        require_gpu_method(c.quantize.method, cfg.model)
    if source is None and not c.source:
        if cfg.method.name in ("adapter", "prefix"):
            raise UserError(
                f"compress works on plain models and LoRA/DoRA adapters, and method.name {cfg.method.name} "
                "trains weights outside the base that cannot be merged into it: train with method.name "
                "lora (or full), or set compress.enabled: false"
            )
        _steps_for(cfg, "the model this run trains", cfg.method.name in ADAPTER_METHODS)
    if c.distill.enabled or c.export.gguf:
        _check_models(cfg, source)


def _steps_for(cfg: SeektuneConfig, what: str, adapter: bool) -> list[str]:
    """The steps the config asks of a model (`what`, for messages) that is or is not an adapter."""
    c = cfg.compress
    merge = c.merge.enabled and adapter
    wanted = {
        "merge": merge,
        "distill": c.distill.enabled,
        "prune": c.prune.enabled,
        "qat": c.qat.enabled,
        "export": c.export.gguf,
        "quantize": c.quantize.method != "none",
    }
    steps = [name for name in ORDER if wanted[name]]
    if not steps:
        raise UserError(
            f"compress has nothing to do for {what}: it is no LoRA/DoRA adapter to merge and no other step "
            "is enabled: set compress.quantize.method (int8_dynamic or int8_weight_only on a CPU) or "
            "enable compress.prune, distill or export"
        )
    if adapter and not merge:
        raise UserError(
            f"{what} is a LoRA/DoRA adapter and compress.merge.enabled is false, but "
            f"{', '.join(steps)} need(s) a plain model: set compress.merge.enabled: true"
        )
    return steps


def _check_models(cfg: SeektuneConfig, source: Path | None) -> None:
    from seektune.compress.export import gguf_unsupported
    from seektune.models.load import resolve_model_path

    c = cfg.compress
    if source is None:  # compress.source or the run's base, built-in names resolved
        named = cfg.model.model_copy(update={"name_or_path": c.source or cfg.model.name_or_path})
        source = Path(resolve_model_path(named))
    if c.distill.enabled:
        _check_distill_tokenizers(cfg, source)
    if c.export.gguf:
        # distillation hands the student on: that is the model exported
        exported = Path(str(c.distill.student)) if c.distill.enabled else source
        reason = gguf_unsupported(exported, heads_pruned=c.prune.enabled and c.prune.mode == "heads")
        if reason:
            raise UserError(reason)


def plan_steps(cfg: SeektuneConfig, source: Path) -> list[str]:
    """The steps to run on `source`, in order; one line on what cannot run, before anything runs."""
    from seektune.compress.merge import needs_merge
    from seektune.compress.quantize import already_quantized

    adapter = needs_merge(source)  # bottleneck adapters and prefixes stop here: no step can take them
    steps = _steps_for(cfg, str(source), adapter)
    quantized = already_quantized(source) if not adapter else None
    if quantized:
        raise UserError(
            f"{source} is already quantised ({quantized}): compress the float model it was made from "
            "(quantising twice, pruning or exporting quantised weights loses quality unnoticed)"
        )
    check_compress_config(cfg, source)
    return steps


def _check_distill_tokenizers(cfg: SeektuneConfig, source: Path) -> None:
    """Teacher and student must share a tokenizer: refused before a run directory or model exists."""
    from seektune.compress.distill import check_same_tokenizer
    from seektune.compress.merge import model_folder
    from seektune.compress.steps import other_model_config
    from seektune.models.load import load_tokenizer

    student = str(cfg.compress.distill.student)
    teacher = load_tokenizer(cfg.model, str(model_folder(source)))
    student_model = other_model_config(cfg.model, student)  # builtin names resolve too
    check_same_tokenizer(teacher, load_tokenizer(student_model), str(source), student)


def _collect() -> None:
    """Return freed memory (the caller has dropped its references) to the system and the GPU."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


class _Chain:
    """One run of the chain: the current model folder, the probe of its model, the table's rows."""

    def __init__(self, cfg: SeektuneConfig, run: RunDir, data: PreparedData, source: Path) -> None:
        self.cfg = cfg
        self.run = run
        self.data = data
        self.folder = run.path / COMPRESS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.current = source
        self.result = CompressResult(source=str(source), final_model=None)
        self.probes: Any = None
        self.probe: Any = None
        self.prompts: list[str] = []

    # -- measuring --------------------------------------------------------------------------------------

    def _load(self, folder: Path, step: str | None = None) -> Any:
        from seektune.compress.steps import load_step_model

        if step == "export":  # the GGUF file, read back through transformers' GGUF reader
            from seektune.compress.export import load_gguf

            return load_gguf(folder, self.cfg.model)
        return load_step_model(self.cfg.model, folder)

    def _row(self, label: str, model: Any, tokenizer: Any, files: list[Path] | None) -> None:
        from seektune.compress.table import measure_model

        c = self.cfg.compress
        row = measure_model(
            label,
            model,
            tokenizer,
            files,
            self.data if c.evaluate else None,
            self.cfg.eval,
            self.cfg.data.system_prompt,
            self.prompts,
            c.check_new_tokens,
        )
        self.result.rows.append(row)

    def start(self) -> None:
        """Probe and measure the source model: the first row and the reference of the first check."""
        from seektune.compress.verify import build_probe_set, probe_model

        loaded = self._load(self.current)
        c = self.cfg.compress
        self.probes = build_probe_set(
            self.data, loaded.tokenizer, c.check_prompts, self.cfg.data.system_prompt
        )
        self.prompts = [loaded.tokenizer.decode(ids) for ids in self.probes.prompt_ids]
        self.probe = probe_model(loaded.model, loaded.tokenizer, self.probes, c.check_new_tokens)
        from seektune.models.load import adapter_base

        base = adapter_base(str(self.current))
        # a hub base's files are in the hub cache, which we do not measure: no size rather than a wrong one
        files = None if base and not Path(base).is_dir() else [Path(p) for p in (base, self.current) if p]
        self._row("source", loaded.model, loaded.tokenizer, files)
        del loaded
        _collect()

    # -- steps ------------------------------------------------------------------------------------------

    def step(self, index: int, name: str) -> None:
        out_dir = self.folder / f"{index:02d}-{name}"
        work_dir = self.folder / "work" / name
        log_event(logger, "compress step started", step=name, source=str(self.current))
        output = _STEPS[name](self, out_dir, work_dir)
        record: dict[str, Any] = {
            "step": name,
            "model_dir": str(output.model_dir),
            "files": [str(f) for f in output.files],
            "details": output.details,
        }
        self.result.steps.append(record)
        passed = self._check(name, output, record)
        if not passed:
            rejected = self._reject(output, name)
            record["rejected_as"] = rejected
            self.result.status = "failed"
            self.write()
            failures = record["check"]["failures"]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise UserError(
                f"compression step {name} failed its check: {failures[0]}{more}; the chain stopped and its "
                f"output was kept as {rejected} for inspection: see {self.run.path / REPORT_FILE}; fix the "
                f"step or loosen compress.{name}.check"
            )
        self.result.files += record["files"]
        if name != "export":  # the later steps (quantize) go on from the float model, not the GGUF file
            self.current = output.model_dir
        log_event(logger, "compress step finished", step=name, model_dir=str(output.model_dir))

    def _check(self, name: str, output: Any, record: dict[str, Any]) -> bool:
        from seektune.compress.verify import check_step

        c = self.cfg.compress
        check_cfg = getattr(c, name).check
        loaded = self._load(output.model_dir, name)
        model, tokenizer = loaded.model, loaded.tokenizer
        result, probe = check_step(
            name, self.probe, model, tokenizer, self.probes, check_cfg, c.check_new_tokens
        )
        record["check"] = result.to_dict()
        log_event(logger, "compress check", step=name, passed=result.passed, **_flat(result.figures))
        if result.passed:
            self._row(name, model, tokenizer, output.files or [output.model_dir])
            if name != "export":  # the next step is compared with the float model it starts from
                self.probe = probe
        del loaded, model, tokenizer
        _collect()
        return result.passed

    def _reject(self, output: Any, name: str) -> str:
        """Rename what a failed step wrote, so no later command mistakes it for a good model."""
        targets = [output.model_dir, *output.files]
        renamed = []
        for target in targets:
            target = Path(target)
            if target.exists():
                moved = target.with_name(target.name + ".rejected")
                if moved.exists():
                    shutil.rmtree(moved) if moved.is_dir() else moved.unlink()
                target.rename(moved)
                renamed.append(str(moved))
        return ", ".join(renamed) or str(targets[0])

    # -- results ----------------------------------------------------------------------------------------

    def finish(self) -> CompressResult:
        from seektune.compress.export import vllm_layout_problems

        self.result.final_model = self.current
        self.result.vllm_problems = vllm_layout_problems(self.current)
        for problem in self.result.vllm_problems:
            logger.warning("vLLM would not load %s: %s", self.current, problem)
        shutil.rmtree(self.folder / "work", ignore_errors=True)
        self.write()
        return self.result

    def write(self) -> None:
        from seektune.compress.report import render_compress_report

        atomic_write_json(self.run.path / RESULTS_FILE, self.result.to_dict())
        atomic_write_text(self.run.path / REPORT_FILE, render_compress_report(self.result.to_dict()))


def _flat(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if isinstance(v, (int, float, bool)) or v is None}


def _merge(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.merge import merge_adapter

    return merge_adapter(chain.current, out_dir, chain.cfg.compress.merge, chain.cfg.model)


def _prune(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.prune import prune_model

    cfg = chain.cfg
    return prune_model(
        chain.current, out_dir, work_dir, cfg.compress.prune, cfg.model, cfg.train, chain.data, cfg.seed
    )


def _qat(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.qat import qat_finetune

    cfg = chain.cfg
    c = cfg.compress
    keep_zeros = c.prune.enabled and c.prune.mode == "unstructured"  # training must not refill them
    return qat_finetune(
        chain.current,
        out_dir,
        c.qat,
        c.quantize.method,
        cfg.model,
        cfg.train,
        chain.data,
        cfg.seed,
        work_dir,
        keep_zeros=keep_zeros,
    )


def _export(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.export import export_gguf

    return export_gguf(chain.current, out_dir, chain.cfg.compress.export, chain.cfg.model)


def _quantize(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.quantize import quantize_model

    return quantize_model(chain.current, out_dir, chain.cfg.compress.quantize, chain.cfg.model)


def _distill(chain: _Chain, out_dir: Path, work_dir: Path) -> Any:
    from seektune.compress.distill import distill_model

    cfg = chain.cfg
    return distill_model(
        chain.current, out_dir, work_dir, cfg.compress.distill, cfg.model, cfg.train, chain.data, cfg.seed
    )


_STEPS: dict[str, Callable[[_Chain, Path, Path], Any]] = {
    "merge": _merge,
    "distill": _distill,
    "prune": _prune,
    "qat": _qat,
    "export": _export,
    "quantize": _quantize,
}


def run_compression(cfg: SeektuneConfig, run: RunDir, data: PreparedData, source: Path) -> CompressResult:
    """Run the planned steps on `source` (a model folder, adapter folder or hub id) inside `run`.

    Writes `compress/results.json` and `compress/report.md` (also when a step fails its check, before the
    error is raised); returns the result with the final model's folder.
    """
    steps = plan_steps(cfg, source)
    chain = _Chain(cfg, run, data, source)
    log_event(logger, "compress started", source=str(source), steps=",".join(steps))
    chain.start()
    for index, name in enumerate(steps, start=1):
        chain.step(index, name)
    return chain.finish()
