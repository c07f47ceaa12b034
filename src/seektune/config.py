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
    int8_kernel: Literal["auto", "torchao", "fbgemm"] = Field(
        "auto",
        description="Kernel of an int8_dynamic model on a CPU: 'auto' is fbgemm (PyTorch's int8 matmul; "
        "decode about 2x faster than torchao's CPU path on a 114M DeepSeek-V3 here); the weights are the "
        "same. An adapter on an int8 base always runs on torchao's.",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


SOURCE_FIELDS = (
    "messages", "conversations", "system", "instruction", "input", "output", "context", "response",
    "prompt", "completion", "question", "answer", "text", "metadata", "label", "history", "chosen",
    "rejected",
)  # fmt: skip
PII_KINDS = ("email", "phone", "id_card", "bank_card", "ip", "secret")
AUGMENT_METHODS = ("synonym", "swap", "delete", "insert", "reorder", "back_translation")


class SourceConfig(Section):
    """One data source: a file, a folder of text files, a `save_to_disk` dataset or a built-in task."""

    path: str = Field(
        BUILTIN_DATASET,
        description="File (.jsonl .json .csv .parquet .txt .md), folder, saved dataset, "
        "or 'builtin:stdlib-docs-qa'.",
    )
    name: str | None = Field(
        None, description="Name in the report and the mixing ratios; None: the file name or built-in task."
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "arrow"] = Field(
        "auto",
        description="File format; 'auto' reads it from the suffix (a folder: text files or a saved dataset).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Standard field -> this source's column, e.g. {instruction: question, output: answer}.",
    )
    text_unit: Literal["file", "paragraph", "line"] = Field(
        "file", description="For plain text: one record per file, per blank-line paragraph or per line."
    )
    split: Literal["auto", "train", "validation", "test"] = Field(
        "auto", description="Put every record of this source into one split; 'auto' splits by data ratios."
    )
    ratio: float | None = Field(
        None, gt=0, description="Share of this source in the training mix (mix.strategy: ratio)."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Read at most this many records of this source (of each of its own splits)."
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(SOURCE_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown standard field(s) {', '.join(unknown)}; map from one of: {', '.join(SOURCE_FIELDS)}"
            )
        return value


class CleanConfig(Section):
    """Cleaning rules, applied in this order; each one is counted in the data report."""

    enabled: bool = Field(True, description="Apply the cleaning rules below.")
    unicode_nfkc: bool = Field(True, description="Unicode NFKC normalisation (full-width to half-width ...).")
    strip_html: bool = Field(True, description="Remove HTML tags and comments, unescape entities.")
    remove_control: bool = Field(True, description="Remove control and zero-width characters.")
    fold_whitespace: bool = Field(
        True, description="Fold runs of spaces inside lines and of blank lines; indentation is kept."
    )
    allowed_chars: str | None = Field(
        None,
        description="Regex character-class body of characters to keep, "
        "e.g. 'a-zA-Z0-9\\u4e00-\\u9fa5\\s.,!?'; others are removed.",
    )
    min_chars: int = Field(1, ge=0, description="Drop records with fewer characters of text.")
    max_chars: int | None = Field(None, ge=1, description="Drop records with more characters of text.")
    min_tokens: int = Field(0, ge=0, description="Drop examples with fewer tokens (after the chat template).")
    languages: list[str] | None = Field(
        None, description="ISO 639-1 codes to keep, e.g. [zh, en]; None keeps every language."
    )
    language_min_confidence: float = Field(
        0.5, ge=0, le=1, description="Keep a record when its language's confidence reaches this."
    )

    @field_validator("allowed_chars")
    @classmethod
    def _is_character_class(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(f"[^{value}]")
            except re.error as exc:
                raise ValueError(f"not a valid regex character class body ({exc})") from None
        return value


class DedupConfig(Section):
    """Exact and near-duplicate removal across all sources and splits."""

    exact: bool = Field(True, description="Drop records whose normalised text equals an earlier record's.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH.")
    threshold: float = Field(
        0.85, gt=0, lt=1, description="Estimated Jaccard similarity that makes a near-twin."
    )
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations (more: finer estimate, slower)."
    )
    ngram: int = Field(5, ge=1, le=32, description="Character n-gram length of the shingles.")


class PrivacyConfig(Section):
    """Detection of personal and secret data."""

    enabled: bool = Field(True, description="Look for personal and secret data.")
    action: Literal["mask", "drop"] = Field(
        "mask", description="Replace each find by <KIND>, or drop the record."
    )
    detectors: list[Literal["email", "phone", "id_card", "bank_card", "ip", "secret"]] = Field(
        default_factory=lambda: list(PII_KINDS), description="What to look for."
    )


class AugmentConfig(Section):
    """Reproducible augmentation of training records (never of validation or test)."""

    enabled: bool = Field(False, description="Add augmented copies of training records.")
    methods: list[Literal["synonym", "swap", "delete", "insert", "reorder", "back_translation"]] = Field(
        default_factory=lambda: ["swap", "delete"], min_length=1, description="Augmentations, picked in turn."
    )
    share: float = Field(0.1, gt=0, le=1, description="Share of training records that get augmented copies.")
    copies: int = Field(1, ge=1, le=16, description="Augmented copies per chosen record.")
    rate: float = Field(
        0.1, gt=0, le=0.5, description="Share of words changed by synonym/swap/delete/insert."
    )
    apply_to: Literal["user", "assistant", "all"] = Field(
        "user", description="Which messages are changed (plain-text records are always changed)."
    )
    synonyms: Path | None = Field(
        None, description="Synonym dictionary: JSON {word: [synonyms]} or lines 'word syn1 syn2'."
    )
    translation_model: str | None = Field(
        None, description="Model translating into the pivot language (e.g. Helsinki-NLP/opus-mt-zh-en)."
    )
    back_translation_model: str | None = Field(
        None, description="Model translating back (e.g. Helsinki-NLP/opus-mt-en-zh)."
    )

    @model_validator(mode="after")
    def _resources_for_methods(self) -> AugmentConfig:
        if self.enabled and "synonym" in self.methods and self.synonyms is None:
            raise ValueError("method 'synonym' needs augment.synonyms: a synonym dictionary file")
        if (
            self.enabled
            and "back_translation" in self.methods
            and not (self.translation_model and self.back_translation_model)
        ):
            raise ValueError(
                "method 'back_translation' needs augment.translation_model and augment.back_translation_model"
            )
        return self


class BalanceConfig(Section):
    """Class balancing of the training split by a label field."""

    field: str | None = Field(
        None, description="Label to balance on: 'label', 'source' or 'metadata.<key>'; None: no balancing."
    )
    strategy: Literal["oversample", "undersample"] = Field(
        "oversample", description="Repeat rare classes up to the largest, or cut large ones to the smallest."
    )


class MixConfig(Section):
    """How several sources are mixed into the training split."""

    strategy: Literal["concat", "ratio", "temperature"] = Field(
        "concat",
        description="'concat': everything once; 'ratio': sources[].ratio shares; "
        "'temperature': shares by n_i^(1/T).",
    )
    fill: Literal["undersample", "oversample"] = Field(
        "undersample",
        description="Reach the shares by sampling down the larger sources, or by repeating the smaller ones.",
    )
    temperature: float = Field(2.0, gt=0, description="T of temperature sampling (1: natural shares).")
    dynamic: bool = Field(
        False, description="Re-weight sources during training from their validation loss (domain fitness)."
    )
    dynamic_step: float = Field(
        1.0, gt=0, description="How strongly a source's excess validation loss raises its weight."
    )
    dynamic_min_share: float = Field(0.05, ge=0, lt=1, description="No source's share drops below this.")


class DataConfig(Section):
    """Where the training data comes from, how it is cleaned, split, mixed and tokenised."""

    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig()], min_length=1, description="Data sources, read in order."
    )
    on_error: Literal["stop", "skip"] = Field(
        "stop", description="A malformed record: stop with its file and line, or skip and count it."
    )
    num_proc: int | None = Field(
        None, ge=1, description="Worker processes for cleaning and tokenising; None: automatic by size."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning rules.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Deduplication.")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Personal-data masking.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation.")
    balance: BalanceConfig = Field(default_factory=BalanceConfig, description="Class balancing.")
    mix: MixConfig = Field(default_factory=MixConfig, description="Source mixing.")
    validation_ratio: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of a file source held out for validation (built-in tasks have fixed splits).",
    )
    test_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of a file source held out for the test split."
    )
    stratify_by: str | None = Field(
        None, description="Keep this field's class shares equal across splits ('label', 'metadata.<key>')."
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Keep at most this many training records (before balance, mix, augment)."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Keep at most this many validation and test examples each."
    )
    max_length: int = Field(512, ge=16, description="Most tokens of one tokenised example.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="An example over max_length: drop it, or keep its first max_length tokens."
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="Tokens in the loss: every assistant answer, only the last one, or all."
    )
    packing: bool = Field(
        False, description="Pack several examples into each training row (no attention across them)."
    )
    pack_length: int | None = Field(
        None, ge=16, description="Tokens per packed row; None: max_length. Batch = batch_size rows."
    )
    pack_order: Literal["shuffled", "decreasing"] = Field(
        "shuffled",
        description="Which examples share a row: first fit in a seeded random order (rows mix examples like "
        "random batches), or longest first (fills rows tightest, but rows of look-alike examples make a "
        "noisier gradient).",
    )
    system_prompt: str | None = Field(None, description="System message put before every conversation.")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.validation_ratio + self.test_ratio >= 1:
            raise ValueError("validation_ratio + test_ratio must be below 1 so that training data remains")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(
                f"pack_length ({self.pack_length}) must be at least max_length ({self.max_length})"
            )
        if self.packing and self.mix.dynamic:
            raise ValueError(
                "mix.dynamic re-weights sources example by example, which packing mixes into one row: "
                "turn off one of packing and mix.dynamic"
            )
        return self

    @model_validator(mode="after")
    def _mixing_ratios_add_up(self) -> DataConfig:
        # Only sources that feed the training split take part in the mix.
        mixed = [s for s in self.sources if s.split in ("auto", "train")]
        if self.mix.strategy != "ratio":
            if any(s.ratio is not None for s in self.sources):
                raise ValueError(
                    "sources[].ratio is set but mix.strategy is not 'ratio': set mix.strategy: ratio"
                )
            return self
        held_out = [s.name or s.path for s in self.sources if s not in mixed and s.ratio is not None]
        if held_out:
            raise ValueError(
                f"source {', '.join(held_out)} goes to a held-out split, which is not mixed: remove its ratio"
            )
        missing = [s.name or s.path for s in mixed if s.ratio is None]
        if missing:
            raise ValueError(
                "mix.strategy 'ratio' needs a ratio on every training source; missing on "
                + ", ".join(missing)
            )
        ratios = [s.ratio for s in mixed if s.ratio is not None]
        total = sum(ratios)
        shares = all(r <= 1 for r in ratios) and any(r != int(r) for r in ratios)  # 0.7, 0.2 ...
        if shares and abs(total - 1) > 1e-6:
            raise ValueError(
                f"the sources' ratios add up to {total:g}: shares must add up to 1 "
                "(or give whole-number weights such as 7, 2, 1)"
            )
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
    include_experts: bool = Field(
        False,
        description="Also adapt the routed experts' fused weights (MoE models, PEFT target_parameters; "
        "needs dropout 0 and not DoRA).",
    )


class FreezeConfig(Section):
    """Which parameters train with method 'freeze' (everything else is frozen)."""

    train_layers: str = Field(
        "-2:",
        description="Decoder blocks that train, as Python slices joined by commas: '8:' (block 8 to the "
        "last), '-2:' (the top two), '0:4,10:12'.",
    )
    train_modules: list[str] = Field(
        default_factory=lambda: ["lm_head", "model.norm"],
        description="Glob patterns of parameter names outside those blocks that also train.",
    )
    freeze_modules: list[str] = Field(
        default_factory=list,
        description="Glob patterns of parameter names kept frozen even inside trained blocks, "
        "e.g. '*.mlp.experts.*'.",
    )


class AdapterConfig(Section):
    """Bottleneck adapters (method 'adapter'): down-projection, non-linearity, up-projection, residual."""

    reduction_factor: int = Field(16, ge=1, description="Hidden size divided by the bottleneck width.")
    positions: list[Literal["attention", "mlp"]] = Field(
        default_factory=lambda: ["attention", "mlp"],
        min_length=1,
        description="After which sub-layers of every block an adapter sits.",
    )
    non_linearity: Literal["relu", "gelu", "silu"] = Field("gelu", description="Bottleneck activation.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the adapter.")


class PrefixConfig(Section):
    """Prefix tuning (method 'prefix'): trained key/value vectors prepended to every attention layer."""

    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length in key/value positions.")
    projection: bool = Field(
        True,
        description="Train the prefix through a two-layer MLP (reparameterisation, more stable); the "
        "saved prefix is the MLP's output either way.",
    )
    projection_hidden_size: int = Field(512, ge=1, description="Hidden width of that MLP.")


class MethodConfig(Section):
    """How the model is fine-tuned."""

    name: Literal["full", "freeze", "lora", "dora", "qlora", "prefix", "adapter"] = Field(
        "lora", description="Fine-tuning method."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Settings of 'lora' and 'dora'.")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="Settings of 'freeze'.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Settings of 'adapter'.")
    prefix: PrefixConfig = Field(default_factory=PrefixConfig, description="Settings of 'prefix'.")


DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair"]


class PreferenceConfig(Section):
    """Preference tuning (train.objective dpo, orpo or kto) with TRL, on prompt/chosen/rejected rows."""

    beta: float = Field(
        0.1,
        gt=0,
        description="DPO/KTO: how far the model may move from the reference (higher: less); ORPO: the weight "
        "of the odds-ratio term (TRL's beta, lambda in the paper).",
    )
    loss_type: DpoLoss = Field(
        "sigmoid", description="DPO loss: sigmoid is the paper's; ipo, hinge, robust, ... are TRL's variants."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO robust/sigmoid: assumed share of flipped preference labels."
    )
    precompute_ref: bool = Field(
        False,
        description="DPO: compute the reference model's log-probabilities once before training, so no "
        "reference copy stays in memory (full and freeze; LoRA's reference is the base without the adapter).",
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable (chosen) answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable answers.")


class TrainConfig(Section):
    """The optimisation loop."""

    objective: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="sft: next-token loss on the answers; dpo, orpo, kto: preference tuning (TRL) on rows "
        "with a chosen and a rejected answer (see train.preference).",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Settings of the preference objectives."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training split (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1 runs whole epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimiser step.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"] = (
        Field("cosine", description="Learning-rate schedule after warm-up.")
    )
    lr_cycles: int = Field(1, ge=1, description="Cosine cycles of 'cosine_with_restarts'.")
    optimizer: Literal["adamw", "adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw", description="Optimizer; 'adamw_8bit' (bitsandbytes) needs a CUDA GPU."
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
    keep_best: bool = Field(
        True,
        description="End with the weights of the best evaluation by train.best_metric (the lowest "
        "validation loss by default; needs a validation split).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many evaluations without a better train.best_metric (a lower "
        "validation loss, or a higher task metric).",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How much train.best_metric must improve to count as better."
    )
    task_metric: (
        Literal[
            "exact_match", "token_f1", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf", "accuracy", "macro_f1"
        ]
        | None
    ) = Field(
        None,
        description="Also generate on a sample of the validation split at every evaluation and compute this "
        "metric (logged as eval_<metric>); None: validation loss only.",
    )
    task_metric_samples: int = Field(
        32,
        ge=1,
        description="Validation conversations generated on at every evaluation: the first N, the same at "
        "every step so that values compare across steps.",
    )
    best_metric: Literal["eval_loss", "task_metric"] = Field(
        "eval_loss",
        description="What keep_best and early stopping watch: the validation loss (lower is better) or "
        "train.task_metric (higher is better).",
    )
    max_grad_norm_spike: float = Field(
        100.0,
        gt=1,
        description="Warn when a step's gradient norm exceeds this many times the running median.",
    )
    resume: Literal["never", "auto"] = Field(
        "never",
        description="'auto': continue from the newest complete checkpoint of the newest run of the same "
        "name and output_dir, when there is one (the CLI's --resume does the same once).",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics go besides the run's log: TensorBoard (offline files in the run "
        "directory), MLflow, Weights & Biases.",
    )

    @model_validator(mode="after")
    def _best_metric_is_computed(self) -> TrainConfig:
        if self.best_metric == "task_metric" and self.task_metric is None:
            raise ValueError(
                "train.best_metric task_metric needs train.task_metric: set train.task_metric "
                "(e.g. rouge_l) or train.best_metric: eval_loss"
            )
        return self


# Objectives a study can optimise, with the direction each is better in.
TUNE_METRICS = {
    "eval_loss": "minimize",
    "train_loss": "minimize",
    "perplexity": "minimize",
    "rouge_l": "maximize",
    "eos_rate": "maximize",
    "latency_s": "minimize",
    "trainable_params": "minimize",
    "train_runtime_s": "minimize",
    "tokens_per_s": "maximize",
    "peak_memory_gb": "minimize",
}
TuneMetric = Literal[
    "eval_loss",
    "train_loss",
    "perplexity",
    "rouge_l",
    "eos_rate",
    "latency_s",
    "trainable_params",
    "train_runtime_s",
    "tokens_per_s",
    "peak_memory_gb",
]
Direction = Literal["minimize", "maximize"]


class ReplayConfig(Section):
    """Earlier training examples mixed into a continual-learning round, sampled by priority."""

    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="The earlier data: its training split is the replay pool, its test split the old test "
        "set. Empty: the data/ splits of the run that trained the registered start version.",
    )
    share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of the round's training examples that are replayed earlier ones (0: no replay).",
    )
    alpha: float = Field(
        1.0,
        ge=0,
        description="Priority exponent: example i is drawn with p_i ∝ rank_i^-alpha, rank 1 being the "
        "highest loss under the start model (0: uniform).",
    )
    max_pool: int | None = Field(
        2000, ge=1, description="Most earlier training examples scored for priority (a seeded sample)."
    )


class ContinualConfig(Section):
    """Incremental training of a model (usually a registered version) on new data without forgetting."""

    enabled: bool = Field(False, description="Train as a continual-learning round (seektune train / run).")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay of earlier examples.")
    trainable_share: float | None = Field(
        0.1,
        gt=0,
        le=1,
        description="Layer freezing: only the top decoder layers (and the output head) holding about this "
        "share of the parameters train; the rest stay frozen. None: as the method says.",
    )
    compare_plain: bool = Field(
        True,
        description="Also fine-tune the start model on the new data alone (no replay, no freezing) and "
        "report forgetting on the old test set and learning on the new one for both.",
    )


class TuneConfig(Section):
    """Hyperparameter search (Optuna): `seektune tune`, and `seektune run` when enabled."""

    enabled: bool = Field(False, description="`seektune run`: search first, then evaluate the best trial.")
    n_trials: int = Field(10, ge=1, description="Trials of the whole study (all workers together).")
    timeout_s: float | None = Field(
        None, gt=0, description="Stop starting new trials after this many seconds (per worker)."
    )
    sampler: Literal["grid", "random", "tpe", "cmaes"] = Field(
        "tpe", description="Optuna sampler: grid, random, TPE (Bayesian) or CMA-ES."
    )
    metric: TuneMetric | list[TuneMetric] = Field(
        "eval_loss",
        description="Objective: the validation loss, an evaluation metric on the validation split "
        "(perplexity, rouge_l, eos_rate, latency_s: generation seconds per answer) or a cost "
        "(trainable_params, train_runtime_s, tokens_per_s, peak_memory_gb); a list for a Pareto front.",
    )
    direction: Direction | list[Direction] | None = Field(
        None, description="minimize or maximize per metric; None: each metric's natural direction."
    )
    pruner: Literal["auto", "none", "median", "hyperband"] = Field(
        "auto",
        description="Stop hopeless trials early from their validation loss at each evaluation; 'auto': "
        "median when the one objective is eval_loss, else none.",
    )
    pruner_startup_trials: int = Field(
        2, ge=0, description="Trials that run to the end before the median pruner prunes any."
    )
    pruner_warmup_ratio: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of a trial's training rows before the median pruner may stop it (early losses "
        "mostly reflect the warm-up, not where a trial ends).",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage: None: a SQLite file in the run directory; a database URL "
        "(sqlite:///..., postgresql://...) or journal:<path> (a file on a shared disk) for several workers.",
    )
    study_name: str | None = Field(None, description="Study name in the storage; None: the run name.")
    include_config: bool = Field(
        True, description="Run the config's own values as the first trial, the baseline to beat."
    )
    keep_models: Literal["best", "all"] = Field(
        "best", description="Trained models kept on disk: the best trial's (Pareto front's), or every one."
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="Search space by dotted config key: {type: float|int|categorical, low, high, log, step, "
        "choices, when} or a list of choices (docs/tune.md).",
    )

    def metrics(self) -> list[str]:
        """The objectives, in order."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def directions(self) -> list[str]:
        """The direction of every objective."""
        if self.direction is None:
            return [TUNE_METRICS[m] for m in self.metrics()]
        return [self.direction] if isinstance(self.direction, str) else list(self.direction)

    def pruner_name(self) -> str:
        """The pruner in effect ('auto' resolved)."""
        if self.pruner != "auto":
            return self.pruner
        return "median" if self.metrics() == ["eval_loss"] else "none"

    @model_validator(mode="after")
    def _objectives_agree(self) -> TuneConfig:
        metrics = self.metrics()
        if not metrics:
            raise ValueError("tune.metric needs at least one metric")
        if len(set(metrics)) < len(metrics):
            raise ValueError("tune.metric lists a metric twice")
        if len(self.directions()) != len(metrics):
            raise ValueError(f"tune.direction needs one direction per metric ({len(metrics)})")
        if len(metrics) > 1 and self.pruner_name() != "none":
            raise ValueError(
                "Optuna cannot prune a multi-objective study: set tune.pruner: none (or search one metric)"
            )
        if self.pruner_name() != "none" and metrics[0] != "eval_loss":
            raise ValueError(
                f"tune.pruner stops trials from the validation loss at each evaluation, which is not the "
                f"objective {metrics[0]}: set tune.pruner: none, or tune.metric: eval_loss"
            )
        return self


EVAL_METRICS = (
    "perplexity", "exact_match", "token_f1", "accuracy", "macro_f1",
    "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf",
)  # fmt: skip
EvalMetric = Literal[
    "perplexity", "exact_match", "token_f1", "accuracy", "macro_f1",
    "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf",
]  # fmt: skip
PERTURBATIONS = ("typo", "chinese", "punctuation", "casing", "distractor")
SCORECARD_DIMENSIONS = ("accuracy", "robustness", "efficiency", "explainability", "fairness", "adaptability")
DEFAULT_SCORECARD_WEIGHTS = {
    "accuracy": 0.3,
    "robustness": 0.2,
    "efficiency": 0.15,
    "explainability": 0.15,
    "fairness": 0.1,
    "adaptability": 0.1,
}


class RobustnessConfig(Section):
    """The task metrics again on perturbed prompts, reported as the drop from clean input."""

    enabled: bool = Field(True, description="Measure robustness to noisy input.")
    noise_rates: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2],
        min_length=1,
        description="Noise rates of the robustness curve: the share of characters (typos, Chinese noise, "
        "casing), punctuation marks or sentences (distractors) changed.",
    )
    perturbations: list[Literal["typo", "chinese", "punctuation", "casing", "distractor"]] = Field(
        default_factory=lambda: list(PERTURBATIONS),
        min_length=1,
        description="Kinds of noise: typo (character swap, deletion, insertion, keyboard-neighbour "
        "substitution), chinese (character-level noise on Han text), punctuation, casing, distractor "
        "(irrelevant sentences added). Each is measured on its own at every rate.",
    )
    max_samples: int | None = Field(
        32, ge=1, description="Test examples perturbed (the first N of those evaluated); None: all."
    )

    @field_validator("noise_rates")
    @classmethod
    def _rates_in_range(cls, value: list[float]) -> list[float]:
        bad = [rate for rate in value if not 0 < rate <= 1]
        if bad:
            raise ValueError(f"noise rates must lie in (0, 1]; got {', '.join(map(str, bad))}")
        return sorted(set(value))


class EfficiencyConfig(Section):
    """Latency, throughput, memory and size of each evaluated model."""

    enabled: bool = Field(True, description="Measure time to first token, per-token latency, throughput.")
    prompts: int = Field(8, ge=1, description="Test prompts timed (each one alone, then all batched).")
    max_new_tokens: int = Field(32, ge=2, description="Tokens generated per timed prompt (no early stop).")
    batch_size: int = Field(8, ge=1, description="Batch size of the batched throughput measurement.")
    latency_budget_ms: float = Field(
        50.0,
        gt=0,
        description="Milliseconds per output token at batch 1 that earn a full efficiency score; slower "
        "models score budget / measured.",
    )


class ExplainabilityConfig(Section):
    """Attention concentration on the prompt while the model writes its answer."""

    enabled: bool = Field(True, description="Measure the share of attention answer tokens put on the prompt.")
    max_samples: int = Field(16, ge=1, description="Test examples whose attention is read.")


class FairnessConfig(Section):
    """The gap of the primary metric across the groups of a protected attribute."""

    attribute: str | None = Field(
        None,
        description="Record field holding the group ('label' or 'metadata.<key>', e.g. metadata.gender); "
        "None: fairness is not measured.",
    )
    min_group_size: int = Field(5, ge=1, description="Groups with fewer test examples are left out.")

    @field_validator("attribute")
    @classmethod
    def _record_field(cls, value: str | None) -> str | None:
        if value is None or value in ("label", "source") or (value.startswith("metadata.") and value[9:]):
            return value
        raise ValueError(
            f"{value!r} is not a record field: use 'label', 'source' or 'metadata.<key>' "
            f"(e.g. metadata.{value})"
        )


class AdaptabilityConfig(Section):
    """The primary metric on a second-domain test set."""

    source: SourceConfig | None = Field(
        None,
        description="A data source of another domain, evaluated as a whole with the same metrics; None: "
        "adaptability is not measured.",
    )


class ScorecardConfig(Section):
    """Each dimension normalised to 0..1 and combined with weights."""

    weights: dict[Literal[SCORECARD_DIMENSIONS], float] = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(DEFAULT_SCORECARD_WEIGHTS),
        description="Weight of each dimension (accuracy, robustness, efficiency, explainability, fairness, "
        "adaptability); a dimension not listed keeps its default weight (0 drops it); the overall score "
        "renormalises over the dimensions measured.",
    )

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, value: dict[str, float]) -> dict[str, float]:
        negative = [name for name, weight in value.items() if weight < 0]
        if negative:
            raise ValueError(f"scorecard weights cannot be negative ({', '.join(negative)})")
        merged = {**DEFAULT_SCORECARD_WEIGHTS, **value}
        if not sum(merged.values()) > 0:
            raise ValueError("scorecard weights must not all be 0")
        return merged


class ReviewConfig(Section):
    """A blinded sheet for human reviewers, and their scores read back into the report."""

    enabled: bool = Field(
        False,
        description="Write eval/review.csv and review.jsonl for domain experts; `seektune review import "
        "RUN SHEET` reads their scores back into the run's report.",
    )
    max_samples: int = Field(50, ge=1, description="Test prompts on the sheet.")
    max_models: int = Field(4, ge=1, description="Most models whose outputs are put side by side.")


class CompareConfig(Section):
    """The A/B comparison of two models on the same test set."""

    with_model: str | None = Field(
        None,
        description="Model B for `seektune eval` (hub id, folder or run directory), compared with "
        "model.name_or_path (A); `seektune run` compares the base (A) with the tuned model (B).",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    examples: int = Field(5, ge=0, description="Examples where the two models differ most, in the report.")

    @model_validator(mode="after")
    def _enough_resamples(self) -> CompareConfig:
        # The smallest p-value S resamples can give is 2 / (S + 1); it must fall below 1 - confidence.
        alpha = round(1 - self.confidence, 12)
        if 2 / (self.bootstrap_samples + 1) >= alpha:
            needed = int(2 / alpha)
            while 2 / (needed + 1) >= alpha:
                needed += 1
            raise ValueError(
                f"eval.compare.bootstrap_samples {self.bootstrap_samples} cannot show a difference at "
                f"confidence {self.confidence}: use at least {needed} resamples, or a lower confidence"
            )
        return self


class EvalConfig(Section):
    """Evaluation of the base and the tuned model on the test split."""

    enabled: bool = Field(True, description="Evaluate after training.")
    compare_base: bool = Field(True, description="Also evaluate the untuned base model, side by side.")
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: ["perplexity", "rouge_l"],
        min_length=1,
        description="Task metrics: perplexity; exact_match, token_f1, rouge_1, rouge_2, rouge_l, bleu, chrf "
        "(generated answers against the reference answers); accuracy, macro_f1 (classification: the "
        "test examples' label field).",
    )
    primary_metric: EvalMetric | None = Field(
        None,
        description="The metric of the scorecard's accuracy, robustness, fairness and adaptability; None: "
        "the first of metrics that is not perplexity (perplexity when it is the only one).",
    )
    chinese_tokenization: Literal["char", "jieba"] = Field(
        "char",
        description="How Chinese text is split for token_f1, ROUGE and BLEU: one token per character, or "
        "jieba words.",
    )
    classify_by: Literal["loglik", "generate"] = Field(
        "loglik",
        description="How accuracy reads the predicted label: the choice with the highest log-likelihood "
        "after the prompt (fast, exact), or the label found in the generated answer.",
    )
    choices: list[str] | None = Field(
        None, description="Labels of a classification task; None: the labels found in the test split."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many test examples.")
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig, description="Noisy input.")
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig, description="Latency and memory.")
    explainability: ExplainabilityConfig = Field(
        default_factory=ExplainabilityConfig, description="Attention on the prompt."
    )
    fairness: FairnessConfig = Field(default_factory=FairnessConfig, description="Gap across groups.")
    adaptability: AdaptabilityConfig = Field(
        default_factory=AdaptabilityConfig, description="A second domain."
    )
    scorecard: ScorecardConfig = Field(default_factory=ScorecardConfig, description="Weighted scorecard.")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Human review sheets.")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="A/B comparison.")

    def primary(self) -> str:
        """The metric the scorecard's dimensions are measured with."""
        if self.primary_metric is not None:
            return self.primary_metric
        return next((m for m in self.metrics if m != "perplexity"), self.metrics[0])

    @model_validator(mode="after")
    def _primary_is_computed(self) -> EvalConfig:
        if self.primary_metric is not None and self.primary_metric not in self.metrics:
            raise ValueError(
                f"eval.primary_metric {self.primary_metric} is not in eval.metrics: add it there"
            )
        if len(set(self.metrics)) < len(self.metrics):
            raise ValueError("eval.metrics lists a metric twice")
        return self


class StepCheckConfig(Section):
    """How a compression step's result must compare with the step before it on the fixed prompt set.

    A check that fails stops the chain with a report (compress/report.md); None turns that check off.
    """

    max_logit_diff: float | None = Field(
        None, gt=0, description="Largest absolute difference of any next-token logit; None: not checked."
    )
    max_perplexity_increase: float | None = Field(
        0.05, ge=0, description="Largest relative rise of test perplexity (0.05 = 5%); None: not checked."
    )
    min_greedy_agreement: float | None = Field(
        0.5,
        ge=0,
        le=1,
        description="Smallest share of greedy next tokens (over the prompts' continuations) that must "
        "equal the step before's; None: not checked.",
    )
    max_eos_rate_drop: float | None = Field(
        0.25,
        ge=0,
        le=1,
        description="Largest fall of the share of greedy answers that end at EOS; None: not checked.",
    )


def _check(**values: Any) -> Any:
    return Field(
        default_factory=lambda: StepCheckConfig(**values), description="Check against the step before."
    )


class MergeConfig(Section):
    """Fold a LoRA/DoRA adapter into its base and save a plain Hugging Face model."""

    enabled: bool = Field(True, description="Merge when the model to compress is a LoRA/DoRA adapter.")
    base: str | None = Field(
        None,
        description="Base to merge into; None: the base recorded in the adapter (base_model_name_or_path).",
    )
    check: StepCheckConfig = _check(
        max_logit_diff=1e-3, max_perplexity_increase=0.001, min_greedy_agreement=0.9, max_eos_rate_drop=0.0
    )


class PruneConfig(Section):
    """Pruning, applied gradually and made permanent so the saved model is plain."""

    enabled: bool = Field(False, description="Prune the model.")
    mode: Literal["unstructured", "channels", "heads"] = Field(
        "unstructured",
        description="'unstructured': the smallest weights of all Linear layers by magnitude (L1, one global "
        "ratio); 'channels': whole MLP hidden channels by importance; 'heads': whole attention heads.",
    )
    sparsity: float = Field(
        0.5, ge=0, le=1, description="Share of weights (or channels, or heads) removed at the end (0..1)."
    )
    steps: int = Field(1, ge=1, description="Pruning steps, reaching the sparsity on a cubic schedule.")
    recovery_steps: int = Field(
        0, ge=0, description="Fine-tuning steps on the training split after each pruning step (0: none)."
    )
    recovery_learning_rate: float = Field(1e-4, gt=0, description="Learning rate of recovery fine-tuning.")
    check: StepCheckConfig = _check(max_perplexity_increase=0.25, min_greedy_agreement=0.3)

    @model_validator(mode="after")
    def _keeps_a_unit(self) -> PruneConfig:
        if self.mode != "unstructured" and self.sparsity >= 1:
            raise ValueError(
                f"sparsity {self.sparsity} with mode {self.mode} would remove every "
                f"{'channel' if self.mode == 'channels' else 'head'}: set it below 1"
            )
        return self


class DistillConfig(Section):
    """Knowledge distillation: the model so far (the teacher) trains a smaller student."""

    enabled: bool = Field(False, description="Distil into distill.student.")
    student: str | None = Field(
        None, description="The student: a model folder or hub id sharing the teacher's tokenizer."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the hard-label loss."
    )
    max_steps: int = Field(100, ge=1, description="Optimiser steps of distillation.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of the student.")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    check: StepCheckConfig = _check(
        max_perplexity_increase=None, min_greedy_agreement=None, max_eos_rate_drop=0.5
    )

    @model_validator(mode="after")
    def _student_given(self) -> DistillConfig:
        if self.enabled and not self.student:
            raise ValueError(
                "compress.distill.enabled needs compress.distill.student (a model folder or hub id)"
            )
        return self


class QatConfig(Section):
    """Quantisation-aware training (torchao): fine-tune with fake quantisation of quantize.method."""

    enabled: bool = Field(False, description="Fine-tune with fake quantisation before quantising.")
    max_steps: int = Field(50, ge=1, description="Optimiser steps of QAT fine-tuning.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of QAT fine-tuning.")
    check: StepCheckConfig = _check(max_perplexity_increase=0.25, min_greedy_agreement=0.3)


QuantizeMethod = Literal["none", "int8_weight_only", "int8_dynamic", "bnb_int8", "bnb_nf4", "fp8"]
CPU_QUANTIZE_METHODS = ("int8_weight_only", "int8_dynamic")


class QuantizeConfig(Section):
    """Post-training quantisation of the Linear weights (per-channel scales)."""

    method: QuantizeMethod = Field(
        "none",
        description="'int8_weight_only' and 'int8_dynamic' (int8 weights and activations) run on a CPU "
        "(torchao); 'bnb_int8', 'bnb_nf4' (4-bit NF4, double quantisation) and 'fp8' need a CUDA GPU.",
    )
    check: StepCheckConfig = _check(max_perplexity_increase=0.05, min_greedy_agreement=0.5)


class ExportConfig(Section):
    """Files for other runtimes."""

    gguf: bool = Field(False, description="Write a GGUF file for llama.cpp (Llama and Qwen2 architectures).")
    gguf_type: Literal["f32", "f16", "q8_0"] = Field("f16", description="Tensor type of the GGUF weights.")
    check: StepCheckConfig = _check(max_perplexity_increase=0.02, min_greedy_agreement=0.8)


class CompressConfig(Section):
    """Compression: merge → distil → prune → QAT → export → quantise, each step checked against the last."""

    enabled: bool = Field(False, description="Compress after evaluation (seektune run).")
    source: str | None = Field(
        None,
        description="Model to compress (run directory, model folder or hub id); None: this run's model in "
        "seektune run, model.name_or_path in seektune compress.",
    )
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Adapter merge.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Pruning.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation.")
    qat: QatConfig = Field(default_factory=QatConfig, description="Quantisation-aware training.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Quantisation.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export.")
    check_prompts: int = Field(
        8, ge=1, description="Test-split prompts of the fixed set every step is checked on."
    )
    check_new_tokens: int = Field(16, ge=1, description="Greedy tokens generated per check prompt.")
    evaluate: bool = Field(
        True, description="Evaluate before and after every step (eval section's metrics) for the table."
    )

    @model_validator(mode="after")
    def _qat_has_a_target(self) -> CompressConfig:
        if self.qat.enabled and self.quantize.method not in CPU_QUANTIZE_METHODS:
            raise ValueError(
                "compress.qat.enabled fine-tunes for the int8 scheme it then applies: set "
                "compress.quantize.method to int8_dynamic or int8_weight_only"
            )
        return self


class ServeLimitsConfig(Section):
    """What one request may ask of the server, and how much work it takes on at once."""

    max_prompt_tokens: int = Field(
        4096, ge=1, description="Longest prompt (in tokens, after the chat template); longer ones get a 400."
    )
    max_tokens: int = Field(
        2048, ge=1, description="Largest max_tokens a request may ask for; larger ones get a 400."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sends none.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_queue: int = Field(
        256, ge=1, description="Requests waiting for a place in the batch; when full, new ones get a 429."
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body; larger ones get a 413."
    )
    max_batch_size: int = Field(64, ge=1, description="Most sequences decoded together in one forward pass.")
    max_batch_tokens: int = Field(
        65536,
        ge=1,
        description="KV-cache token budget: a sequence joins the batch only when its prompt plus max_tokens "
        "fits beside what the running ones reserve.",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeLimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is above max_tokens ({self.max_tokens})"
            )
        return self


class ABSplitConfig(Section):
    """One public model name served by two (or more) versions with a share of the traffic each."""

    name: str = Field(..., min_length=1, description="The public model name clients send.")
    versions: dict[str, float] = Field(
        ...,
        description="Served model name (the base's or an adapter's) -> share of the traffic, e.g. "
        "{stable: 0.9, candidate: 0.1}; shares are normalised to sum to 1.",
    )

    @field_validator("versions")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        if len(value) < 2:
            raise ValueError("an A/B split needs at least two versions")
        if any(share < 0 for share in value.values()) or sum(value.values()) <= 0:
            raise ValueError("shares must be >= 0 and sum to more than 0")
        return value


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key, or None. An empty one (an unset "$KEY") would turn the check off."""
    if not key:
        return "an API key is empty (an unset variable?): give a key, e.g. from `openssl rand -hex 24`"
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        return "an API key has spaces, control or non-ASCII characters, which a bearer token cannot carry"
    return None


class FeedbackConfig(Section):
    """What the server records for the feedback loop (`POST /v1/feedback`, `seektune data from-feedback`)."""

    enabled: bool = Field(
        False, description="Record prompts, answers and user feedback in the feedback store."
    )
    store: Path | None = Field(
        None,
        description="SQLite file of the feedback store; None: feedback.db in seektune's user data folder.",
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="Personal-data masking applied before anything is stored (the data stage's detectors).",
    )
    max_pending: int = Field(
        10_000,
        ge=1,
        description="Records waiting to be written; beyond it new ones are dropped (and counted in "
        "/metrics), so recording never holds up a request.",
    )

    @field_validator("store")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class ServeConfig(Section):
    """The OpenAI-compatible server (`seektune serve`)."""

    host: str = Field("127.0.0.1", description="Address to bind; anything but loopback requires api_keys.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    engine: Literal["seektune", "vllm"] = Field(
        "seektune",
        description="seektune: the built-in continuous-batching engine; vllm: hand the model to vLLM "
        "(installed on a GPU host).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients send for the base model; None: the model folder's name."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA/DoRA adapters loaded at start: name -> adapter folder."
    )
    adapter_dir: Path | None = Field(
        None,
        description="Folder under which the admin endpoint may load adapters; None: loading at run time "
        "is off.",
    )
    ab: list[ABSplitConfig] = Field(default_factory=list, description="A/B splits of public model names.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys (bearer tokens); empty: no auth (loopback only)."
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Keys that may load and unload adapters; empty: the api_keys (or anyone on loopback).",
    )
    limits: ServeLimitsConfig = Field(default_factory=ServeLimitsConfig, description="Request limits.")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for key in value:
            problem = api_key_problem(key)
            if problem:
                raise ValueError(problem)
        return value

    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Feedback recording.")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, how long running requests may take to finish."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Threads torch computes with when the model is on the CPU; None: torch's default (the "
        "usable CPUs). Fewer leave cores to the HTTP side and to other processes.",
    )


class RegistryConfig(Section):
    """The model registry (docs/registry.md): where it is, and how a run registers what it produced."""

    enabled: bool = Field(
        False,
        description="Register what the run produces (the trained model, each compression step's model).",
    )
    url: str | None = Field(
        None,
        description="SQLAlchemy URL (e.g. postgresql+psycopg://host/db for a team); None: the SQLite file "
        "registry.db in the user's data directory (or $SEEKTUNE_REGISTRY_URL from the CLI).",
    )
    artefact_dir: Path | None = Field(
        None,
        description="Folder registered artefacts are copied to; None: 'artefacts' beside a SQLite file, "
        "else in the user's data directory. A team database needs a folder every machine sees.",
    )
    artefacts: Literal["copy", "link"] = Field(
        "copy",
        description="copy: the registry keeps its own copy; link: hard links (no extra disk on one "
        "filesystem; a file changed in place in the run then changes the registered one, which the "
        "checksum check catches).",
    )
    model_name: str | None = Field(
        None,
        description="Registered name; None: the name of the version the run started from, else the run name.",
    )
    version: str | None = Field(
        None, description="Semantic version of the trained model (e.g. 1.2.0); None: the next after bump."
    )
    bump: Literal["major", "minor", "patch"] = Field(
        "minor", description="Which part of the newest version a new one increments (the first is 1.0.0)."
    )
    tags: list[str] = Field(
        default_factory=list, description="Tags for the trained model's version, e.g. [v1.0-legal-202403]."
    )


class UiConfig(Section):
    """The web dashboard (`seektune ui`, docs/ui.md)."""

    host: str = Field(
        "127.0.0.1",
        description="Address to bind; anything but loopback asks every browser for one of serve.api_keys.",
    )
    port: int = Field(7860, ge=1, le=65535, description="Port to bind.")
    runs_dir: Path | None = Field(
        None, description="Folder whose run directories the dashboard lists; None: output_dir."
    )
    jobs_dir: Path | None = Field(
        None,
        description="Folder for the configs and logs of jobs started from the dashboard; None: ui-jobs in "
        "seektune's user data folder.",
    )
    server_url: str | None = Field(
        None,
        description="The seektune server the playground talks to; None: http://serve.host:serve.port.",
    )
    server_api_key: str | None = Field(
        None,
        description="Key the dashboard sends to that server; None: the key the browser logged in with, "
        "else the first of serve.api_keys.",
    )
    max_jobs: int = Field(
        2, ge=1, description="Jobs that may run at once; a launch beyond it is refused until one ends."
    )

    @field_validator("runs_dir", "jobs_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://127.0.0.1:8000")
        return value.rstrip("/") if value else value

    @field_validator("server_api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        problem = api_key_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value


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
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig, description="Continual learning (replay, layer freezing)."
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Registry.")
    ui: UiConfig = Field(default_factory=UiConfig, description="Web dashboard.")

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
        raw = read_config_file(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> SeektuneConfig:
    """Validate a mapping; errors name `source`, the dotted key and what is allowed."""
    try:
        return SeektuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's contents as a dict (a UserError naming the file and line when it cannot be read)."""
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
