"""Plan a fine-tuning run before anything is downloaded or trained: parameters, trainable parameters,
memory (weights, gradients, optimizer states, activations) and a micro-batch that fits the device.

Why our own code: accelerate's `estimate-memory` counts weights (and a rule-of-thumb for Adam) of hub models,
but knows neither seektune's methods (LoRA targets, freeze slices, bottleneck adapters, QLoRA) nor
activations, and nothing in transformers or PEFT estimates training memory. What we reuse: transformers
builds the model from its config on the meta device (no memory, seconds even for 671B parameters), and
seektune's own `apply_method` marks what trains, so the counts are the real model's counts.

Where the model config comes from (`load_model_config`): the recipe of the built-in base, a local folder's
config.json, the local Hugging Face cache, or the configs seektune ships for DeepSeek-family hub models
(`seektune/models/known_configs.json`).

Memory, in bytes (`MemoryPlan`):
- weights: frozen parameters at the weight dtype (model.dtype), trainable ones at the dtype they train in
  (LoRA/DoRA weights are fp32: PEFT upcasts 16-bit adapters); with qlora, plain `nn.Linear` weights in NF4
  with double quantisation (0.5 byte + 1/64 byte of 8-bit block scales + 4/(64*256) of fp32 scales per
  weight), everything else (embeddings, lm_head, norms, routers, the fused routed experts, which
  bitsandbytes does not quantise) in fp32, to which PEFT's `prepare_model_for_kbit_training` casts them.
- gradients: one per trainable parameter, in its dtype.
- optimizer states: adamw two states in the parameter's dtype (transformers' Trainer keeps no separate
  master copy: with fp32 weights and bf16/fp16 autocast the fp32 weights are the masters and count under
  weights); adamw_8bit two 1-byte states plus block scales (parameters under 4096 elements keep fp32
  states); adafactor factored second moments (rows + columns of each matrix, fp32); sgd none.
- autocast copies: with fp32 weights and bf16/fp16 compute, the 16-bit casts of the matmul weights are
  kept for the backward pass (2 bytes per weight).
- optimizer step scratch: on CUDA, torch's foreach AdamW allocates one more state-sized buffer during
  `step()`, when activations are already freed.
- activations per token (`activation_bytes_per_token`), what the backward pass keeps, with `a` the bytes of
  an activation element (2 under bf16/fp16, 4 in fp32), for every decoder block that gradients reach
  (blocks below the lowest trainable block keep nothing, nor does that block's attention unless it trains;
  a trainable input embedding or prefix, which every block reads, makes every block keep its activations):
  - each RMSNorm: its fp32 input (4 bytes per feature), plus its normalised output (a) when its weight trains;
  - each linear layer's input (a per feature) when the layer's weight trains or it is a LoRA layer without
    dropout; a LoRA layer with dropout keeps its own dropped-out copy and the mask instead (a + 1 on CUDA,
    whose fused dropout keeps a 1-byte mask; 2a on a CPU, which keeps a scaled copy);
  - attention: queries and keys (MLA: H*(nope+rope) each; GQA: H*d and G*d), the values' storage (MLA:
    the kv_b output H*(nope+v); GQA: G*d), times a. A fused kernel (flash/memory-efficient SDPA) keeps its
    output (a*H*v) and 4 bytes of log-sum-exp per head, and o_proj reads that output; the math kernel keeps
    the attention probabilities instead (H * sequence length * 4 bytes, +a for their 16-bit copy), and
    o_proj its own copy of the output. The math kernel runs with eager attention and with SDPA on a CPU
    when query and value head sizes differ (MLA);
  - gated MLP of width I: 3*a*I (SiLU input and output, up projection), plus the down projection's input;
  - MoE block: 4 bytes per routed expert (router scores), the shared experts as a gated MLP, and for each of
    the k experts a token is routed to a*(3*moe_intermediate + hidden) (+ a*(hidden + moe_intermediate)
    when the experts train) plus its 8-byte index;
  - bottleneck adapters: a*(hidden + 2*bottleneck);
  - the head: the final norm, lm_head's input, and 12*vocab bytes for the loss (fp32 log-probabilities
    kept for the backward pass, then their gradient and the logits' gradient while the loss backpropagates).
  With gradient checkpointing each block keeps only its input (a*hidden) and one block's activations are
  alive again while it is recomputed. Per micro-batch the figure is multiplied by its tokens (micro-batch x
  sequence length, data.pack_length when packing, else data.max_length: padded batches are at most that).

Peak = weights + gradients + optimizer states + max(autocast copies + activations, optimizer step scratch).
Counting gradients and activations together is conservative: gradients are allocated while activations are
freed during the backward pass. A micro-batch fits when its peak is within 90% of the device memory minus
1 GiB on a GPU (CUDA context and allocator fragmentation), within 66% of the available RAM minus 1 GiB on a
CPU (the Python process, and glibc keeping freed activation memory). docs/plan.md compares the estimate
with measured peaks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seektune.config import BUILTIN_BASE, SeektuneConfig
from seektune.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

GIB = 2**30
# Share of the device memory a plan may fill. On a CPU, glibc keeps much of the freed activation memory in
# its heap: the process peak was measured up to 1.5x the live peak (docs/plan.md), hence the lower share.
SAFETY_FRACTION = {"cuda": 0.9, "cpu": 0.66}
RESERVED_BYTES = GIB  # CUDA context and fragmentation on a GPU; the Python process and libraries on a CPU
MAX_MICRO_BATCH = 64
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit block scales, fp32 scales of scales
LOGITS_BYTES_PER_VOCAB = 12  # fp32 log-probabilities, their gradient and the logits' gradient
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_KNOWN_CONFIGS = "known_configs.json"


@dataclass
class MemoryPlan:
    """Parameters and memory of one configured training run, and the micro-batch that fits the device.

    Byte figures are per device; `activation_bytes_per_token` times the tokens of a micro-batch gives its
    activations. `suggestions` says what would fit when not even micro-batch 1 does."""

    model: str
    config_source: str
    family: str
    method: str
    device: str
    weight_dtype: str
    precision: str
    optimizer: str
    sequence_length: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    autocast_copies_bytes: int
    optimizer_step_bytes: int
    activation_bytes_per_token: int
    configured_micro_batch: int
    configured_accumulation: int
    device_memory: int
    device_memory_source: str
    recommended_micro_batch: int | None = None
    recommended_accumulation: int | None = None
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def usable_memory(self) -> int:
        """What a plan may fill: 90% of a GPU's memory (66% of a CPU's), minus 1 GiB."""
        return max(0, int(self.device_memory * SAFETY_FRACTION[self.device]) - RESERVED_BYTES)

    @property
    def target_batch(self) -> int:
        """Examples per optimiser step as configured (batch_size x gradient_accumulation_steps)."""
        return self.configured_micro_batch * self.configured_accumulation

    def activation_bytes(self, micro_batch: int) -> int:
        return self.activation_bytes_per_token * self.sequence_length * micro_batch

    def total_bytes(self, micro_batch: int) -> int:
        """Estimated peak memory of training at `micro_batch` sequences per forward pass."""
        static = self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
        during_step = max(
            self.autocast_copies_bytes + self.activation_bytes(micro_batch), self.optimizer_step_bytes
        )
        return static + during_step

    def fits(self, micro_batch: int) -> bool:
        return self.total_bytes(micro_batch) <= self.usable_memory

    def to_dict(self) -> dict[str, Any]:
        """Every field plus the derived figures, for JSON."""
        data = dataclasses.asdict(self)
        data.update(
            trainable_ratio=self.trainable_ratio,
            usable_memory=self.usable_memory,
            activation_bytes_per_micro_batch=self.activation_bytes(self.configured_micro_batch),
            total_bytes_configured=self.total_bytes(self.configured_micro_batch),
            fits_configured=self.fits(self.configured_micro_batch),
        )
        if self.recommended_micro_batch is not None:
            data["total_bytes_recommended"] = self.total_bytes(self.recommended_micro_batch)
        return data


# ---------------------------------------------------------------------------------------------------------
# The model config, without weights


class ModelConfigNotFound(UserError):
    """The config.json of a hub model is neither cached nor shipped with seektune."""


class _RecipeVocabulary:
    """Stands in for the tokenizer that `tiny.make_model` reads: the base's tokenizer has `vocab_size`
    entries with the special tokens first (bos 0, eos 1, pad 2; see `tiny.train_tokenizer`)."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size


@cache
def known_model_configs() -> dict[str, dict[str, Any]]:
    """The config.json fields seektune ships for DeepSeek-family hub models, by lower-case hub id."""
    raw = json.loads(resources.files("seektune.models").joinpath(_KNOWN_CONFIGS).read_text(encoding="utf-8"))
    configs = {name.lower(): fields for name, fields in raw["models"].items()}
    for alias, name in raw["aliases"].items():
        configs[alias.lower()] = raw["models"][name]
    return configs


def load_model_config(cfg: SeektuneConfig) -> tuple[Any, str]:
    """The transformers config of `model.name_or_path` without its weights, and where it came from."""
    from transformers import AutoConfig

    from seektune.models.load import adapter_base, resolve_model_path

    model_cfg = cfg.model
    if model_cfg.name_or_path == BUILTIN_BASE:
        return _builtin_base_config(cfg)
    path = resolve_model_path(model_cfg)
    if Path(path).is_dir():
        base = adapter_base(path)
        if base is not None:  # an adapter folder: plan its base model
            return load_model_config(
                cfg.model_copy(update={"model": model_cfg.model_copy(update={"name_or_path": base})})
            )
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not read {path}/config.json: {str(exc).strip().splitlines()[0]}") from exc
        return config, f"{path}/config.json"
    return _hub_config(cfg)


def _builtin_base_config(cfg: SeektuneConfig) -> tuple[Any, str]:
    from seektune.models.tiny import base_dir, make_model

    built = base_dir(cfg.model.base, cfg.model.cache_dir)
    if (built / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(built), f"built base {built}"
    # The same construction as a build, on the meta device, with the recipe's vocabulary size; the RNG state
    # that make_model seeds is restored so that planning never changes the caller's random stream.
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = make_model(cfg.model.base, _RecipeVocabulary(cfg.model.base.vocab_size))
    return model.config, f"recipe model.base (not built yet: {BUILTIN_BASE})"


def _hub_config(cfg: SeektuneConfig) -> tuple[Any, str]:
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(
            name,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            local_files_only=True,
        )
        return config, "local Hugging Face cache"
    except (OSError, ValueError):
        pass
    fields = known_model_configs().get(name.lower())
    if fields is None:
        raise ModelConfigNotFound(
            f"model.name_or_path {name!r}: planning needs its config.json, which is neither in the local "
            f"Hugging Face cache nor among the configs seektune ships: download it on a connected machine "
            f"(huggingface-cli download {name} config.json) or put it in a folder and set "
            "model.name_or_path to that folder"
        )
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields), "config shipped with seektune"


# ---------------------------------------------------------------------------------------------------------
# Counting on the meta device


@dataclass
class _ModelFacts:
    """What planning reads from the model built on the meta device with the method applied."""

    model: nn.Module  # the transformers model (PEFT wraps its layers in place)
    config: Any
    family: str
    total: int
    trainable: int
    trainable_shapes: list[tuple[int, ...]]
    quantisable: int  # weights of plain nn.Linear layers, which bitsandbytes stores in 4 bit (not lm_head)
    matmul_weights: int  # weights autocast casts to 16 bit (every matrix but the input embedding's)


def _model_facts(cfg: SeektuneConfig, config: Any) -> _ModelFacts:
    from transformers import AutoModelForCausalLM

    from seektune.models.families import detect_family
    from seektune.models.methods import apply_method

    family = detect_family(config, cfg.model.family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    quantisable, matmul_weights = _quantisable_weights(model), _matmul_weights(model)
    method = cfg.method
    if method.name == "qlora":  # the LoRA adapters of QLoRA; the 4-bit base is counted by bytes, not here
        method = method.model_copy(update={"name": "lora"})
    with torch.device("meta"), _routing_bypassed(model, method.name == "prefix"):
        wrapped, summary = apply_method(model, method, family)
    shapes = [tuple(p.shape) for p in wrapped.parameters() if p.requires_grad]
    return _ModelFacts(
        model=model,
        config=config,
        family=family.name,
        total=summary.total,
        trainable=summary.trainable,
        trainable_shapes=shapes,
        quantisable=quantisable,
        matmul_weights=matmul_weights,
    )


@contextmanager
def _routing_bypassed(model: nn.Module, bypass: bool) -> Iterator[None]:
    """Let mixture-of-experts blocks pass their input through while `bypass`: the prefix method reads the
    attention cache's shapes with a forward pass, and on the meta device the routing (data-dependent
    shapes) cannot run. The cache does not depend on the MLP."""
    from seektune.models.methods import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    moe = [
        block.mlp for block in (blocks or []) if bypass and hasattr(getattr(block, "mlp", None), "experts")
    ]
    for module in moe:
        module.forward = _pass_through
    try:
        yield
    finally:
        for module in moe:
            del module.forward


def _pass_through(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


def _quantisable_weights(model: nn.Module) -> int:
    """Weights seektune's qlora loads in 4 bit: bitsandbytes converts exactly-`nn.Linear` layers, and
    `models.load.four_bit_config` skips lm_head and routers (names ending in 'gate')."""
    head = model.get_output_embeddings()
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and not name.endswith("gate")
    )


def _matmul_weights(model: nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2 and (p is not embedding or tied))


# ---------------------------------------------------------------------------------------------------------
# Activations per token (see the module docstring for what is counted)


@dataclass(frozen=True)
class _ActivationContext:
    act_bytes: int  # bytes of one activation element: 2 under bf16/fp16, 4 in fp32
    scores_length: int  # keys per query whose attention probabilities are stored; 0 with fused kernels
    dropout_mask_bytes: int  # per element: CUDA's fused dropout keeps a 1-byte mask, the CPU a scaled copy


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _lora_dropout(layer: nn.Module) -> float | None:
    """The dropout probability of a PEFT LoRA layer (0 without dropout), None for any other layer."""
    drops = getattr(layer, "lora_dropout", None)
    if not isinstance(drops, nn.ModuleDict):
        return None
    return max((d.p for d in drops.values() if isinstance(d, nn.Dropout)), default=0.0)


def _saved_input_bytes(
    consumers: list[nn.Module | None], width: int, ctx: _ActivationContext, kept_anyway: bool = False
) -> int:
    """What one `width`-feature tensor costs through the linear layers that read it: a layer whose weight
    trains (or a LoRA layer without dropout) keeps the tensor (free when it is `kept_anyway`); a LoRA layer
    with dropout keeps its own dropped-out copy and the dropout mask instead."""
    keeps_tensor, copies = False, 0
    for layer in consumers:
        if layer is None:
            continue
        dropout = _lora_dropout(layer)
        if dropout:
            copies += (ctx.act_bytes + ctx.dropout_mask_bytes) * width
        elif dropout is not None or _trains(layer):
            keeps_tensor = True
    return copies + (ctx.act_bytes * width if keeps_tensor and not kept_anyway else 0)


def _norm_bytes(norm: nn.Module, width: int, ctx: _ActivationContext) -> int:
    return 4 * width + (ctx.act_bytes * width if _trains(norm) else 0)


def _attention_core_bytes(heads: int, qk_width: int, value_width: int, output: nn.Module, ctx) -> int:
    """Queries and keys (`qk_width` each), the values' storage, the output and what o_proj keeps of it.
    A fused kernel keeps its output (+ fp32 log-sum-exp per head), which o_proj then reads for free; the
    math kernel keeps the attention probabilities instead, and o_proj its own contiguous copy."""
    total = ctx.act_bytes * (2 * qk_width + value_width)
    if ctx.scores_length == 0:
        total += ctx.act_bytes * output.in_features + 4 * heads
        return total + _saved_input_bytes([output], output.in_features, ctx, kept_anyway=True)
    extra_copy = ctx.act_bytes if ctx.act_bytes < 4 else 0
    total += heads * ctx.scores_length * (4 + extra_copy)
    return total + _saved_input_bytes([output], output.in_features, ctx)


def _mla_bytes(attn: nn.Module, config: Any, ctx: _ActivationContext) -> int:
    """Multi-head latent attention (DeepSeek-V2/V3)."""
    heads = config.num_attention_heads
    query = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)  # queries, and keys the same
    values = heads * (config.qk_nope_head_dim + config.v_head_dim)  # kv_b output; values are a view of it
    first_query = attn.q_a_proj if attn.q_a_proj is not None else attn.q_proj
    total = _saved_input_bytes([first_query, attn.kv_a_proj_with_mqa], config.hidden_size, ctx)
    if attn.q_a_proj is not None:
        rank = config.q_lora_rank
        total += _norm_bytes(attn.q_a_layernorm, rank, ctx) + _saved_input_bytes([attn.q_b_proj], rank, ctx)
    rank = config.kv_lora_rank
    total += _norm_bytes(attn.kv_a_layernorm, rank, ctx) + _saved_input_bytes([attn.kv_b_proj], rank, ctx)
    return total + _attention_core_bytes(heads, query, values, attn.o_proj, ctx)


def _gqa_bytes(attn: nn.Module, config: Any, ctx: _ActivationContext) -> int:
    """Grouped-query attention (Llama, Qwen2): keys and values are not repeated (SDPA's enable_gqa)."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    total = _saved_input_bytes([q, k, v], config.hidden_size, ctx)
    total += ctx.act_bytes * (k.out_features - q.out_features)  # keys are G*d wide, queries H*d
    return total + _attention_core_bytes(
        config.num_attention_heads, q.out_features, v.out_features, attn.o_proj, ctx
    )


def _gated_mlp_bytes(mlp: nn.Module, ctx: _ActivationContext, extra_readers: list[nn.Module]) -> int:
    """gate/up/down MLP; `extra_readers` also read its input (the MoE router)."""
    width = mlp.gate_proj.out_features
    total = _saved_input_bytes([mlp.gate_proj, mlp.up_proj, *extra_readers], mlp.gate_proj.in_features, ctx)
    return total + 3 * ctx.act_bytes * width + _saved_input_bytes([mlp.down_proj], width, ctx)


def _moe_bytes(moe: nn.Module, config: Any, ctx: _ActivationContext) -> int:
    hidden, a = config.hidden_size, ctx.act_bytes
    experts = getattr(config, "n_routed_experts", None) or config.num_local_experts
    router_reads = [moe.gate] if a == 4 else []  # in 16 bit the router keeps an fp32 copy instead
    total = 4 * experts + (4 * hidden if a < 4 and _trains(moe.gate) else 0)
    if getattr(moe, "shared_experts", None) is not None:
        total += _gated_mlp_bytes(moe.shared_experts, ctx, router_reads)
    else:
        total += _saved_input_bytes(router_reads, hidden, ctx)
    width = config.moe_intermediate_size
    per_expert = a * (3 * width + hidden) + 8 + (a * (hidden + width) if _trains(moe.experts) else 0)
    return total + config.num_experts_per_tok * per_expert


def _block_bytes(block: nn.Module, config: Any, ctx: _ActivationContext, grad_from_below: bool) -> int:
    """Activations one decoder block keeps per token. Without gradient from below (the lowest block that
    trains), its attention keeps nothing unless something in it trains."""
    from seektune.models.adapters import BottleneckAdapter

    hidden = config.hidden_size
    total = 0
    if grad_from_below or _trains(block.input_layernorm) or _trains(block.self_attn):
        attention = _mla_bytes if hasattr(block.self_attn, "kv_b_proj") else _gqa_bytes
        total += _norm_bytes(block.input_layernorm, hidden, ctx) + attention(block.self_attn, config, ctx)
    total += _norm_bytes(block.post_attention_layernorm, hidden, ctx)
    if hasattr(block.mlp, "experts"):
        total += _moe_bytes(block.mlp, config, ctx)
    else:
        total += _gated_mlp_bytes(block.mlp, ctx, [])
    for adapter in block.children():
        if isinstance(adapter, BottleneckAdapter):
            bottleneck = adapter.down.out_features
            dropout_copy = (
                (ctx.act_bytes + ctx.dropout_mask_bytes) * bottleneck if adapter.dropout.p > 0 else 0
            )
            total += ctx.act_bytes * (hidden + 2 * bottleneck) + dropout_copy
    return total


def activation_bytes_per_token(facts: _ModelFacts, ctx: _ActivationContext, checkpointing: bool) -> int:
    """Bytes of activations per token of a micro-batch at the peak of the backward pass."""
    from seektune.models.methods import find_decoder_blocks

    model, config = facts.model, facts.config
    _, blocks = find_decoder_blocks(model)
    blocks = list(blocks or [])
    decoder_norm, head = model.get_decoder().norm, model.get_output_embeddings()
    if _feeds_every_block(model, blocks, [decoder_norm, head]):
        first, fed = 0, True
    else:  # gradients reach the lowest block that trains, and every block above it
        first, fed = next((i for i, block in enumerate(blocks) if _trains(block)), len(blocks)), False
    per_block = [
        _block_bytes(block, config, ctx, grad_from_below=fed or index > first)
        for index, block in enumerate(blocks[first:], start=first)
    ]
    if checkpointing and per_block:
        layers = len(per_block) * ctx.act_bytes * config.hidden_size + max(per_block)
    else:
        layers = sum(per_block)
    loss = LOGITS_BYTES_PER_VOCAB * config.vocab_size
    loss += _saved_input_bytes([head], config.hidden_size, ctx)
    if per_block or _trains(decoder_norm):
        loss += _norm_bytes(decoder_norm, config.hidden_size, ctx)
    return layers + loss


def _feeds_every_block(model: nn.Module, blocks: list[nn.Module], head: list[nn.Module | None]) -> bool:
    """Whether a trainable parameter sits before every decoder block: the input embedding (also when tied
    to lm_head), or one outside the blocks and the head (a prefix that every attention layer reads)."""
    if _trains(model.get_input_embeddings()):
        return True
    placed = {id(p) for module in [*blocks, *head] if module is not None for p in module.parameters()}
    return any(p.requires_grad and id(p) not in placed for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Bytes of weights, gradients and optimizer states


@dataclass(frozen=True)
class _Setup:
    """The settings memory depends on, with every 'auto' resolved."""

    method: str
    device: str  # 'cuda' or 'cpu'
    weight_dtype: str  # float32 / bfloat16 / float16
    precision: str  # fp32 / bf16 / fp16
    optimizer: str
    sequence_length: int
    gradient_checkpointing: bool
    attn_implementation: str | None

    @property
    def act_bytes(self) -> int:
        half = self.weight_dtype != "float32" or self.precision != "fp32"
        return 2 if half else 4

    @property
    def trainable_bytes(self) -> int:
        """Bytes per trainable parameter: PEFT keeps LoRA/DoRA weights in fp32."""
        return 4 if self.method in ("lora", "dora", "qlora") else _DTYPE_BYTES[self.weight_dtype]


def _setup(cfg: SeektuneConfig) -> _Setup:
    device = _target_device(cfg.model.device)
    bf16 = device == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    weight_dtype = cfg.model.dtype
    if weight_dtype == "auto":
        weight_dtype = "bfloat16" if bf16 else "float32"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if bf16 else "fp16")
    data = cfg.data
    sequence = (data.pack_length or data.max_length) if data.packing else data.max_length
    return _Setup(
        method=cfg.method.name,
        device=device,
        weight_dtype=weight_dtype,
        precision=precision,
        optimizer=cfg.train.optimizer,
        sequence_length=sequence,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        attn_implementation=cfg.model.attn_implementation,
    )


def _target_device(device: str) -> str:
    """'cuda' or 'cpu': where the run trains ('auto' is CUDA when this machine has it)."""
    if device.startswith("cuda"):
        return "cuda"
    if device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights_bytes(facts: _ModelFacts, setup: _Setup) -> int:
    frozen = facts.total - facts.trainable
    trained = facts.trainable * setup.trainable_bytes
    if setup.method == "qlora":
        quantised = min(facts.quantisable, frozen)
        # PEFT's prepare_model_for_kbit_training casts every parameter left in 16 bit to fp32.
        return round(quantised * NF4_BYTES_PER_WEIGHT) + (frozen - quantised) * 4 + trained
    return frozen * _DTYPE_BYTES[setup.weight_dtype] + trained


def _optimizer_bytes(facts: _ModelFacts, setup: _Setup) -> int:
    if setup.optimizer == "adamw":
        return 2 * facts.trainable * setup.trainable_bytes
    if setup.optimizer == "adamw_8bit":  # bitsandbytes: 8-bit states from 4096 elements, 256-element blocks
        return sum(
            round(n * (2 + 8 / 256)) if n >= 4096 else 8 * n for n in map(math.prod, facts.trainable_shapes)
        )
    if setup.optimizer == "adafactor":  # transformers' Adafactor: no first moment, factored second moment
        return 4 * sum(_adafactor_elements(shape) for shape in facts.trainable_shapes)
    return 0  # sgd without momentum keeps no state


def _adafactor_elements(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def _scores_length(facts: _ModelFacts, setup: _Setup) -> int:
    """Keys per query whose attention probabilities are stored (0 where a fused kernel is used)."""
    implementation = setup.attn_implementation or "sdpa"
    config = facts.config
    v_head = getattr(config, "v_head_dim", None)
    qk_head = (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
    math_fallback = (
        setup.device == "cpu" and implementation == "sdpa" and v_head is not None and v_head != qk_head
    )
    return setup.sequence_length if implementation == "eager" or math_fallback else 0


def _memory_parts(facts: _ModelFacts, setup: _Setup) -> dict[str, int]:
    half_compute = setup.precision in ("bf16", "fp16") and setup.weight_dtype == "float32"
    scratch = (
        facts.trainable * setup.trainable_bytes
        if setup.device == "cuda" and setup.optimizer == "adamw"
        else 0
    )
    mask = 1 if setup.device == "cuda" else setup.act_bytes
    ctx = _ActivationContext(setup.act_bytes, _scores_length(facts, setup), mask)
    return {
        "weights_bytes": _weights_bytes(facts, setup),
        "gradients_bytes": facts.trainable * setup.trainable_bytes,
        "optimizer_bytes": _optimizer_bytes(facts, setup),
        "autocast_copies_bytes": 2 * facts.matmul_weights if half_compute and setup.method != "qlora" else 0,
        "optimizer_step_bytes": scratch,
        "activation_bytes_per_token": activation_bytes_per_token(facts, ctx, setup.gradient_checkpointing),
    }


# ---------------------------------------------------------------------------------------------------------
# The plan, the recommendation and the check


def estimate_plan(cfg: SeektuneConfig, device_memory: int | None = None) -> MemoryPlan:
    """Parameters and memory of training `cfg`, and the micro-batch that fits `device_memory` bytes (default:
    the CUDA device's total memory, else this machine's available RAM). Nothing is downloaded or built."""
    config, source = load_model_config(cfg)
    facts = _model_facts(cfg, config)
    setup = _setup(cfg)
    memory, memory_source = _device_memory(setup.device, device_memory)
    plan = _plan(cfg, facts, setup, source, memory, memory_source)
    recommended = recommend_micro_batch(plan)
    if recommended is not None:
        plan.recommended_micro_batch, plan.recommended_accumulation = recommended
    else:
        plan.suggestions = _suggestions(cfg, facts, setup, plan)
    plan.notes = _notes(cfg, facts, setup, source)
    return plan


def check_fits(cfg: SeektuneConfig, device_memory: int | None = None) -> None:
    """Raise a `UserError` when the configured train.batch_size does not fit in `device_memory` bytes
    (default: the CUDA device's total memory, or this machine's available RAM),
    naming the micro-batch and accumulation that would. A hub model whose config.json is not available
    offline is not checked (a warning says so): loading it downloads the config anyway."""
    try:
        plan = estimate_plan(cfg, device_memory)
    except ModelConfigNotFound:
        logger.warning("no config.json of %s available offline: memory not checked", cfg.model.name_or_path)
        return
    batch = plan.configured_micro_batch
    if plan.fits(batch):
        return
    what = (
        f"train.batch_size {batch} at sequence length {plan.sequence_length} needs about "
        f"{format_bytes(plan.total_bytes(batch))} ({_breakdown(plan, batch)}), but only "
        f"{format_bytes(plan.usable_memory)} of the device's {format_bytes(plan.device_memory)} is usable"
    )
    if plan.recommended_micro_batch is not None:
        raise UserError(
            f"{what}: set train.batch_size: {plan.recommended_micro_batch} and "
            f"train.gradient_accumulation_steps: {plan.recommended_accumulation}"
        )
    raise UserError(f"{what}, and not even train.batch_size 1 fits: " + "; or ".join(plan.suggestions))


def _plan(
    cfg: SeektuneConfig, facts: _ModelFacts, setup: _Setup, source: str, memory: int, memory_source: str
) -> MemoryPlan:
    return MemoryPlan(
        model=cfg.model.name_or_path,
        config_source=source,
        family=facts.family,
        method=setup.method,
        device=setup.device,
        weight_dtype=setup.weight_dtype,
        precision=setup.precision,
        optimizer=setup.optimizer,
        sequence_length=setup.sequence_length,
        gradient_checkpointing=setup.gradient_checkpointing,
        total_params=facts.total,
        trainable_params=facts.trainable,
        configured_micro_batch=cfg.train.batch_size,
        configured_accumulation=cfg.train.gradient_accumulation_steps,
        device_memory=memory,
        device_memory_source=memory_source,
        **_memory_parts(facts, setup),
    )


def _device_memory(device: str, given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, "given"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                "model.device is cuda but this machine has no CUDA GPU: give the GPU's memory "
                "(seektune plan --device-memory-gb N) to plan for it"
            )
        index = torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return properties.total_memory, f"CUDA device {index} ({properties.name})"
    import psutil

    return psutil.virtual_memory().available, "available RAM"


def _micro_batch_candidates(target: int) -> list[int]:
    """Powers of two from min(64, target) down to 1."""
    largest = 1 << (min(MAX_MICRO_BATCH, max(target, 1)).bit_length() - 1)
    return [largest >> shift for shift in range(largest.bit_length())]


def recommend_micro_batch(plan: MemoryPlan) -> tuple[int, int] | None:
    """(micro-batch, accumulation): the largest fitting power-of-two micro-batch up to the configured
    examples per optimiser step, and the accumulation that reaches them (rounded up)."""
    target = plan.target_batch
    for micro_batch in _micro_batch_candidates(target):
        if plan.fits(micro_batch):
            return micro_batch, math.ceil(target / micro_batch)
    return None


def _suggestions(cfg: SeektuneConfig, facts: _ModelFacts, setup: _Setup, plan: MemoryPlan) -> list[str]:
    """Changes that would make micro-batch 1 fit, each with the micro-batch it allows."""
    found: list[str] = []
    fitting_changes: list[str] = []
    for change, variant_facts, variant in _alternatives(cfg, facts, setup):
        if any(change.startswith(earlier) for earlier in fitting_changes):
            continue  # 'lora' fits already: no need to also offer 'lora and checkpointing'
        fitting = recommend_micro_batch(_plan(cfg, variant_facts, variant, "", plan.device_memory, ""))
        if fitting is not None:
            fitting_changes.append(change)
            found.append(f"{change} (train.batch_size {fitting[0]} fits)")
    found.extend(_shorter_sequence(cfg, facts, setup, plan))
    if not found:
        static = plan.weights_bytes + plan.gradients_bytes + plan.optimizer_bytes
        found.append(
            f"even weights, gradients and optimizer states need {format_bytes(static)} of the "
            f"{format_bytes(plan.usable_memory)} usable: use a device with more memory, or shard the model "
            "across several GPUs (not planned here)"
        )
    return found


def _alternatives(
    cfg: SeektuneConfig, facts: _ModelFacts, setup: _Setup
) -> list[tuple[str, _ModelFacts, _Setup]]:
    """(config change, model facts, setup) of the lighter set-ups to try: gradient checkpointing, LoRA,
    QLoRA (on CUDA), each method also with checkpointing."""
    checkpointing = dataclasses.replace(setup, gradient_checkpointing=True)
    options = []
    if not setup.gradient_checkpointing:
        options.append(("set train.gradient_checkpointing: true", facts, checkpointing))
    methods = {"qlora": [], "lora": ["qlora"], "dora": ["qlora"]}.get(setup.method, ["lora", "qlora"])
    methods = [m for m in methods if m != "qlora" or setup.device == "cuda"]
    if not methods:
        return options
    lora_facts = facts
    if setup.method not in ("lora", "qlora"):
        lora_cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "lora"})})
        lora_facts = _model_facts(lora_cfg, facts.config)
    for method in methods:
        change = f"set method.name: {method}"
        options.append((change, lora_facts, dataclasses.replace(setup, method=method)))
        if not setup.gradient_checkpointing:
            with_checkpointing = dataclasses.replace(checkpointing, method=method)
            options.append(
                (f"{change} and train.gradient_checkpointing: true", lora_facts, with_checkpointing)
            )
    return options


def _shorter_sequence(cfg: SeektuneConfig, facts: _ModelFacts, setup: _Setup, plan: MemoryPlan) -> list[str]:
    key = "data.pack_length" if cfg.data.packing else "data.max_length"
    length = 1 << (setup.sequence_length - 1).bit_length() - 1
    while length >= 16:
        shorter = dataclasses.replace(setup, sequence_length=length)
        if _plan(cfg, facts, shorter, "", plan.device_memory, "").fits(1):
            return [
                f"set {key}: {length} (train.batch_size 1 fits; longer examples are dropped or truncated)"
            ]
        length //= 2
    return []


def _notes(cfg: SeektuneConfig, facts: _ModelFacts, setup: _Setup, source: str) -> list[str]:
    notes = [f"model config: {source}"]
    if setup.device == "cpu" and not torch.cuda.is_available():
        notes.append(
            "planned for this machine's CPU; to plan for a GPU set model.device: cuda and give "
            "--device-memory-gb"
        )
    if setup.device == "cpu" and (setup.method == "qlora" or setup.optimizer == "adamw_8bit"):
        notes.append("qlora and adamw_8bit (bitsandbytes) need a CUDA GPU")
    moe = getattr(facts.config, "n_routed_experts", None)
    if setup.method == "qlora" and moe:
        notes.append(
            "bitsandbytes quantises nn.Linear layers only: the fused routed experts are not quantised (and "
            "prepare_model_for_kbit_training casts them to fp32): on a mixture-of-experts model QLoRA can "
            "need more memory than LoRA"
        )
    if setup.method == "dora":
        notes.append("DoRA also forms each adapted layer's full weight for its norm (transient, not counted)")
    return notes


# ---------------------------------------------------------------------------------------------------------
# Display


def format_bytes(count: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def _format_count(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def _breakdown(plan: MemoryPlan, micro_batch: int) -> str:
    parts = {
        "weights": plan.weights_bytes,
        "gradients": plan.gradients_bytes,
        "optimizer states": plan.optimizer_bytes,
        "activations": plan.activation_bytes(micro_batch) + plan.autocast_copies_bytes,
    }
    return ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)


def recommendation_line(plan: MemoryPlan) -> str:
    """One line: the micro-batch and accumulation to use, or that nothing fits."""
    usable = format_bytes(plan.usable_memory)
    if plan.recommended_micro_batch is None:
        needed = format_bytes(plan.total_bytes(1))
        return (
            f"does not fit: even train.batch_size 1 needs about {needed} of {usable} usable; what would fit:"
        )
    micro, accumulation = plan.recommended_micro_batch, plan.recommended_accumulation
    return (
        f"recommended: train.batch_size: {micro} and train.gradient_accumulation_steps: {accumulation} "
        f"({micro} x {accumulation} = {micro * accumulation} examples per optimiser step, configured "
        f"{plan.target_batch}); peak about {format_bytes(plan.total_bytes(micro))} of {usable} usable"
    )


def print_plan(plan: MemoryPlan, console: Console) -> None:
    """Print the plan as a table, then the recommendation, suggestions and notes."""
    from rich.table import Table

    table = Table(title=f"seektune plan: {plan.model}", title_justify="left")
    table.add_column("")
    table.add_column("estimate", justify="right")
    table.add_column("")
    batch = plan.configured_micro_batch
    rows = [
        ("family / method", f"{plan.family} / {plan.method}", ""),
        ("device", plan.device, f"{plan.weight_dtype} weights, {plan.precision} compute, {plan.optimizer}"),
        ("parameters", f"{plan.total_params:,}", _format_count(plan.total_params)),
        ("trainable", f"{plan.trainable_params:,}", f"{plan.trainable_ratio:.2%}"),
        ("weights", format_bytes(plan.weights_bytes), ""),
        ("gradients", format_bytes(plan.gradients_bytes), ""),
        ("optimizer states", format_bytes(plan.optimizer_bytes), plan.optimizer),
        ("autocast copies", format_bytes(plan.autocast_copies_bytes), "16-bit casts of fp32 weights"),
        (
            "optimizer step scratch",
            format_bytes(plan.optimizer_step_bytes),
            "during step(), not with activations",
        ),
        (
            "activations per token",
            format_bytes(plan.activation_bytes_per_token),
            f"sequence {plan.sequence_length}, gradient checkpointing "
            + ("on" if plan.gradient_checkpointing else "off"),
        ),
        (
            "activations per micro-batch",
            format_bytes(plan.activation_bytes(batch)),
            f"train.batch_size {batch}",
        ),
        (
            "total (peak)",
            format_bytes(plan.total_bytes(batch)),
            "fits" if plan.fits(batch) else "does not fit",
        ),
        (
            "device memory",
            format_bytes(plan.device_memory),
            f"{plan.device_memory_source}; {format_bytes(plan.usable_memory)} usable",
        ),
    ]
    for name, value, detail in rows:
        if name in ("autocast copies", "optimizer step scratch") and value == "0 B":
            continue
        table.add_row(name, value, detail)
    console.print(table)
    console.print(recommendation_line(plan), soft_wrap=True)  # one line, to copy into the config
    for suggestion in plan.suggestions:
        console.print(f"  - {suggestion}", soft_wrap=True)
    for note in plan.notes:
        console.print(f"[dim]{note}[/dim]", soft_wrap=True)
