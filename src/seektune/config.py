"""The one declarative config: a YAML file validated by pydantic, one section per stage.

Every field has a default and a one-line description (the description is what `seektune config schema`
and `--help` show). Unknown keys and wrong types are reported with the file, the dotted key and what is
allowed. Command-line overrides (`--set train.learning_rate=2e-5`) are applied to the raw mapping before
validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seektune.errors import UserError

BUILTIN_BASE = "tiny-deepseek-v3"
BUILTIN_DATASET = "builtin:stdlib-docs-qa"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseBuildConfig(Section):
    """How `seektune base build` makes the offline `tiny-deepseek-v3` base model."""

    vocab_size: int = Field(4096, ge=512, description="Size of the byte-level BPE vocabulary.")
    hidden_size: int = Field(192, ge=16, description="Width of the residual stream.")
    num_hidden_layers: int = Field(4, ge=2, description="Decoder blocks; the first is dense, the rest MoE.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads of the MLA attention.")
    n_routed_experts: int = Field(8, ge=2, description="Routed experts per MoE block.")
    num_experts_per_tok: int = Field(2, ge=1, description="Routed experts each token is sent to.")
    moe_intermediate_size: int = Field(192, ge=8, description="Hidden size of each routed expert.")
    intermediate_size: int = Field(512, ge=8, description="Hidden size of the dense MLP block.")
    context_length: int = Field(128, ge=32, description="Tokens per pre-training sequence.")
    pretrain_steps: int = Field(1000, ge=0, description="Optimiser steps of causal-LM pre-training.")
    batch_size: int = Field(8, ge=1, description="Sequences per pre-training step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate of pre-training (cosine decay).")
    seed: int = Field(1234, description="Seed of the tokenizer corpus order, the weights and the batches.")


class ModelConfig(Section):
    """Which base model to load and how."""

    name_or_path: str = Field(
        BUILTIN_BASE,
        description="Hugging Face model id, local directory, or 'tiny-deepseek-v3' (the offline base).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model id.")
    family: Literal["auto", "deepseek_v3", "deepseek_v2", "llama", "qwen2"] = Field(
        "auto", description="Family preset; 'auto' reads it from the model's config.json."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' is bfloat16 on a GPU that supports it, else float32."
    )
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint.")
    attn_implementation: str | None = Field(
        None,
        description="Attention kernel ('sdpa', 'eager', 'flash_attention_2'); None lets transformers pick.",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template to use instead of the tokenizer's (or the family preset's)."
    )
    cache_dir: Path | None = Field(
        None, description="Where built-in base models are cached; None is the user's cache directory."
    )
    base: BaseBuildConfig = Field(
        default_factory=BaseBuildConfig, description="Recipe of the offline base model."
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class SourceConfig(Section):
    """One data source."""

    path: str = Field(
        BUILTIN_DATASET,
        description="A JSONL/JSON file, or 'builtin:stdlib-docs-qa' (Q&A built from the Python docs).",
    )


class DataConfig(Section):
    """Where the training data comes from and how it is split and tokenised."""

    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig()], min_length=1, description="Data sources, read in order."
    )
    validation_ratio: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of a file source held out for validation (built-in tasks have fixed splits).",
    )
    test_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of a file source held out for the test split."
    )
    max_train_samples: int | None = Field(None, ge=1, description="Keep at most this many training examples.")
    max_eval_samples: int | None = Field(
        None, ge=1, description="Keep at most this many validation and test examples each."
    )
    max_length: int = Field(512, ge=16, description="Longest tokenised example; longer ones are dropped.")
    system_prompt: str | None = Field(None, description="System message put before every conversation.")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.validation_ratio + self.test_ratio >= 1:
            raise ValueError("validation_ratio + test_ratio must be below 1 so that training data remains")
        return self


class LoraConfig(Section):
    """Low-rank adapter settings (LoRA and DoRA)."""

    r: int = Field(16, ge=1, description="Rank of the update.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="Module names to adapt; 'auto' takes the family preset."
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")


class MethodConfig(Section):
    """How the model is fine-tuned."""

    name: Literal["full", "freeze", "lora", "dora", "qlora", "prefix", "adapter"] = Field(
        "lora", description="Fine-tuning method."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Settings of 'lora' and 'dora'.")


class TrainConfig(Section):
    """The optimisation loop."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training split (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1 runs whole epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimiser step.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on a GPU that has it, fp16 mixed on older GPUs, fp32 on a CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps; None: once per epoch."
    )
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps; None: once per epoch.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class TuneConfig(Section):
    """Hyperparameter search (Optuna); runs when enabled."""

    enabled: bool = Field(False, description="Run a search before the final training.")
    n_trials: int = Field(10, ge=1, description="Trials to run.")
    sampler: Literal["grid", "random", "tpe", "cmaes"] = Field("tpe", description="Optuna sampler.")
    metric: str = Field("eval_loss", description="Objective: the validation loss or any evaluation metric.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Optimisation direction.")
    space: dict[str, Any] = Field(default_factory=dict, description="Search space by dotted config key.")


class EvalConfig(Section):
    """Evaluation of the base and the tuned model on the test split."""

    enabled: bool = Field(True, description="Evaluate after training.")
    compare_base: bool = Field(True, description="Also evaluate the untuned base model, side by side.")
    metrics: list[Literal["perplexity", "rouge_l"]] = Field(
        default_factory=lambda: ["perplexity", "rouge_l"], min_length=1, description="Metrics to compute."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many test examples.")


class CompressConfig(Section):
    """Compression of the tuned model; runs when enabled."""

    enabled: bool = Field(False, description="Compress after evaluation.")
    merge_adapter: bool = Field(True, description="Fold a LoRA/DoRA adapter into the base weights.")
    quantize: Literal["none", "int8", "nf4"] = Field("none", description="Weight quantisation.")


class ServeConfig(Section):
    """The OpenAI-compatible server."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    max_batch_tokens: int = Field(4096, ge=1, description="Token budget of one batched forward pass.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted API keys; empty: no auth.")


class RegistryConfig(Section):
    """The model registry."""

    enabled: bool = Field(False, description="Register what the run produces.")
    url: str | None = Field(None, description="SQLAlchemy URL; None is a SQLite file in the user data dir.")
    model_name: str | None = Field(None, description="Registered name; None uses the run name.")


class SeektuneConfig(Section):
    """A whole seektune run."""

    name: str = Field("seektune", min_length=1, description="Run name; the run directory is <name>-<time>.")
    seed: int = Field(42, description="Seeds Python, NumPy, torch and the data order.")
    output_dir: Path = Field(Path("runs"), description="Folder the run directories are created in.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data stage.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training stage.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Search stage.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation stage.")
    compress: CompressConfig = Field(default_factory=CompressConfig, description="Compression stage.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Registry.")

    @field_validator("output_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if any(ch in value for ch in "/\\:") or value.startswith("."):
            raise ValueError("must be a plain folder name (no '/', '\\', ':' and not starting with '.')")
        return value


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SeektuneConfig:
    """Read, override and validate a config. `path=None` starts from the defaults."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> SeektuneConfig:
    """Validate a mapping; errors name `source`, the dotted key and what is allowed."""
    try:
        return SeektuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"config {path} is a folder: give the path of a YAML file in it (see configs/)")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: give the path of a YAML file (see configs/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data:, model:, train:, ...).")
    # A section whose keys are all commented out reads as null: it means "the defaults".
    sections = {name for name, field in SeektuneConfig.model_fields.items() if _is_section(field.annotation)}
    return {key: {} if value is None and key in sections else value for key, value in data.items()}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: write overrides as dotted.key=value, e.g. train.learning_rate=2e-5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (None when it is not a model)."""
    model: type[BaseModel] | None = SeektuneConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and isinstance(part, str):
            # list[SourceConfig] and similar: the next location part is an index.
            args = getattr(annotation, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _describe_validation_error(exc: ValidationError, source: str) -> str:
    problems: dict[str, list[str]] = {}  # dotted key -> what is wrong (a union reports once per member)
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Union members add their type name to the location (e.g. 'literal['auto','all-linear']').
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int"})))
        dotted = ".".join(str(p) for p in loc) or "<top level>"
        problems.setdefault(dotted, []).append(_describe_one(err, loc))
    lines = [f"{key}: " + " or ".join(dict.fromkeys(msgs)) for key, msgs in problems.items()]
    return f"{source}: " + "; ".join(lines)


def _describe_one(err: Any, loc: tuple[Any, ...]) -> str:
    if err["type"] == "extra_forbidden":
        owner = _model_at(tuple(p for p in loc if not isinstance(p, int)))
        allowed = sorted(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"unknown key{did_you_mean}; allowed in {section}: {', '.join(allowed)}"
    got = err.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    message = err["msg"][:1].lower() + err["msg"][1:]
    return f"{message} (got {shown})"


def config_to_yaml(cfg: SeektuneConfig) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_schema() -> dict[str, Any]:
    """JSON schema of the whole config."""
    return SeektuneConfig.model_json_schema()
