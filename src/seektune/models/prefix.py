"""Prefix tuning (method 'prefix'): trained states that every attention layer sees before the real tokens.

Only the prefix trains; the base stays frozen. A prefix is, per decoder layer, a (keys, values) pair in
exactly the shape that layer keeps in transformers' key-value cache, as if `num_virtual_tokens` tokens had
been read before the input:
- Llama, Qwen2: keys and values (kv_heads, n, head_dim);
- DeepSeek-V2/V3 (MLA, transformers 5.2x): the cache holds the compressed latent, not per-head states:
  "keys" are the normalised latent (1, n, kv_lora_rank) and "values" the shared rotary key
  (1, n, qk_rope_head_dim); after the cache read `kv_b_proj` expands the latent into per-head k_nope and
  values (v_head_dim wide), and the rotary key joins every head's key. A per-head MLA prefix would need a
  rewritten attention forward; the latent prefix is what MLA itself keeps of past tokens, 576 numbers
  per token and layer in V3 instead of 128 x (192 + 128).

Why our own code: PEFT 0.21.2's `PrefixTuningConfig` views one tensor per layer as (heads, n,
token_dim // heads) for keys and values alike, so no `token_dim` / `num_attention_heads` choice gives the
two MLA widths (its per-layer slicing only exists for configs with `layer_types`, and slices keys and
values to one shape); on DeepSeek-V3 the cache concatenation fails with "Sizes of tensors must match except
in dimension 2". PEFT also moves the real tokens to positions n..n+L-1 (measured on Llama in transformers
5.23): the model counts cached tokens as past positions. Here the real tokens keep the positions the model
without prefix gives them.

How it attaches: the prefix module is `model.seektune_prefix`; a forward pre-hook on the decoder
(`model.model`) hands the prefix to the layers through the cache mechanism. The decoder takes and returns the
cache as `cache` from transformers 5.24 on, as `past_key_values` before (5.24 still accepts that name alone,
but ignores it when `cache` is set too); the hook uses the name the decoder's forward declares:
- a forward that builds no cache to keep (training with gradients, or `use_cache=False`) gets a read-only
  `PrefixCache` whose layers return prefix + new states and store nothing. Under gradient checkpointing the
  decoder layers would drop a cache (a cache that stores would be written again when the backward pass
  replays the layer); this one can be replayed, so the layers are told to keep it
  (`_can_checkpoint_with_cache`);
- a forward that keeps a cache (`generate`, `use_cache=True` at inference) gets the empty `DynamicCache`
  it passed (or a new one) filled with the prefix; later decoding steps find the prefix in it;
- a 2-D attention mask gets n ones in front, so padding stays masked and the prefix is seen by every
  token; missing `position_ids` are set to what the model without prefix would use.
Packed rows (`data.packing`) are refused: transformers reads example boundaries from restarting
`position_ids` only when no cache is passed, so packed examples would see each other.

Initialisation: without projection the prefix starts as the model's own cached states for n random tokens
(the "real word activations" of Li & Liang, 2021), so it starts in the range each layer expects; with
`method.prefix.projection` it is PEFT's reparameterisation, a random embedding (n, hidden_size) through a
two-layer tanh MLP. Either way the saved prefix is the final per-layer states.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from seektune.config import DataConfig, PrefixConfig
from seektune.errors import UserError
from seektune.rundir import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

PREFIX_WEIGHTS_FILE = "prefix.safetensors"
PREFIX_CONFIG_FILE = "adapter_config.json"  # the file `load_model` looks for in a folder of weights on a base
CONFIG_KEY = "seektune_prefix"
PREFIX_MODULE = "seektune_prefix"
PACKING_ERROR = (
    "method.name 'prefix' does not work with packed rows (data.packing: true): transformers separates packed "
    "examples only when no key-value cache is passed, and the prefix comes as one; set data.packing to false"
)

LayerStates = tuple[torch.Tensor, torch.Tensor]


class PrefixEncoder(nn.Module):
    """Per-layer prefix states (keys, values), trained directly or produced by a two-layer MLP.

    `shapes` holds one (keys shape, values shape) per layer, each (heads, n, width) as the layer caches.
    `projection` is (embedding size, MLP hidden size) for PEFT's reparameterisation, None for direct states.
    """

    def __init__(
        self, shapes: list[tuple[torch.Size, torch.Size]], projection: tuple[int, int] | None = None
    ):
        super().__init__()
        self.shapes = [(torch.Size(keys), torch.Size(values)) for keys, values in shapes]
        self.num_virtual_tokens = self.shapes[0][0][1]
        self.keys: nn.ParameterList | None = None
        self.values: nn.ParameterList | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if projection is None:
            self.keys = nn.ParameterList(nn.Parameter(torch.zeros(keys)) for keys, _ in self.shapes)
            self.values = nn.ParameterList(nn.Parameter(torch.zeros(values)) for _, values in self.shapes)
            return
        embedding_size, hidden_size = projection
        width = sum(keys[0] * keys[2] + values[0] * values[2] for keys, values in self.shapes)
        self.embedding = nn.Parameter(torch.randn(self.num_virtual_tokens, embedding_size))
        self.mlp = nn.Sequential(
            nn.Linear(embedding_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, width)
        )

    def forward(self) -> list[LayerStates]:
        if self.mlp is None:
            return list(zip(self.keys, self.values, strict=True))
        flat = self.mlp(self.embedding)  # (n, sum over layers of keys + values widths)
        shapes = [shape for pair in self.shapes for shape in pair]
        pieces = flat.split([shape[0] * shape[2] for shape in shapes], dim=-1)
        # (n, heads * width) -> (heads, n, width)
        states = [
            piece.view(self.num_virtual_tokens, shape[0], shape[2]).transpose(0, 1)
            for piece, shape in zip(pieces, shapes, strict=True)
        ]
        return list(zip(states[0::2], states[1::2], strict=True))

    def set_states(self, states: list[LayerStates]) -> None:
        """Copy fixed per-layer states into a direct (non-projected) prefix."""
        if self.mlp is not None:
            raise ValueError("set_states needs a direct prefix; this one is produced by an MLP")
        with torch.no_grad():
            for index, (keys, values) in enumerate(states):
                self.keys[index].copy_(keys)
                self.values[index].copy_(values)


class _PrefixLayer(DynamicLayer):
    """A cache layer holding only the prefix: `update` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> LayerStates:
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values


class PrefixCache(Cache):
    """A read-only cache of the prefix states, (batch, heads, n, width) per layer, for forwards that keep
    no cache (training); safe to replay under gradient checkpointing."""

    def __init__(self, states: list[LayerStates]) -> None:
        super().__init__(layers=[_PrefixLayer(keys, values) for keys, values in states])


class _PrefixInjector:
    """Forward pre-hook and hook on the decoder that put the prefix before every layer's cached states.

    A callable object rather than a closure so that `copy.deepcopy` of the model maps it onto the copied
    encoder (as the bottleneck adapters' hooks do)."""

    def __init__(self, encoder: PrefixEncoder, devices: list[torch.device], cache_name: str) -> None:
        self.encoder = encoder
        self.devices = devices  # the device of each decoder layer (a model may be split across GPUs)
        self.cache_name = cache_name  # the decoder's cache argument and output field (`_cache_name`)

    def before(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = _as_keywords(decoder, args, kwargs)
        inputs = kwargs.get("inputs_embeds")
        inputs = kwargs["input_ids"] if inputs is None else inputs
        batch_size, query_length = inputs.shape[:2]
        prefix_length = self.encoder.num_virtual_tokens
        if self.cache_name != "past_key_values" and "past_key_values" in kwargs:  # the deprecated name
            kwargs.setdefault(self.cache_name, kwargs.pop("past_key_values"))
        cache = kwargs.get(self.cache_name)
        if cache is None or isinstance(cache, PrefixCache) or _is_fresh(cache):
            given = None if isinstance(cache, PrefixCache) else cache
            cache = self._new_cache(decoder, given, kwargs.get("use_cache"), batch_size)
        elif getattr(cache, "seektune_prefix_length", None) != prefix_length:
            raise ValueError(
                f"{self.cache_name} holds states computed without this model's prefix: pass an empty cache "
                f"or the cache a previous call of this model returned"
            )
        past_length = cache.get_seq_length() - prefix_length  # real tokens already in the cache
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            kwargs["attention_mask"] = _mask_over_prefix(mask, prefix_length, past_length + query_length)
        elif position_ids is not None and _restarts(position_ids):
            raise UserError(PACKING_ERROR)
        if position_ids is None:  # what the model without prefix would use: the prefix is no past token
            positions = torch.arange(past_length, past_length + query_length, device=inputs.device)
            kwargs["position_ids"] = positions.unsqueeze(0)
        kwargs[self.cache_name] = cache
        return (), kwargs

    def after(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if isinstance(kwargs.get(self.cache_name), PrefixCache) and hasattr(output, self.cache_name):
            setattr(output, self.cache_name, None)  # nothing was cached: do not hand the read-only prefix on
        return output

    def _new_cache(
        self, decoder: nn.Module, given: Cache | None, use_cache: bool | None, batch_size: int
    ) -> Cache:
        """A read-only prefix cache when nothing is kept (training), else `given` or a new DynamicCache
        holding the prefix."""
        keeps_cache = decoder.config.use_cache if use_cache is None else use_cache
        states = [
            (keys.to(device).expand(batch_size, -1, -1, -1), values.to(device).expand(batch_size, -1, -1, -1))
            for (keys, values), device in zip(self.encoder(), self.devices, strict=True)
        ]
        if not keeps_cache or (decoder.training and torch.is_grad_enabled()):
            return PrefixCache(states)
        if given is not None and type(given) is not DynamicCache:
            raise UserError(
                f"method.name 'prefix' needs transformers' dynamic key-value cache, but generation used "
                f"{type(given).__name__}: leave the generation config's cache_implementation unset"
            )
        cache = given if given is not None else DynamicCache(config=decoder.config)
        for index, (keys, values) in enumerate(states):
            cache.update(keys, values, index)
        cache.seektune_prefix_length = self.encoder.num_virtual_tokens
        return cache


def _as_keywords(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with the positional `args` of `module.forward` added under their names."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(module.forward).parameters)
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _cache_name(decoder: nn.Module) -> str:
    """The name under which `decoder.forward` takes the key-value cache, and its output holds it: `cache`
    from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _is_fresh(cache: Cache) -> bool:
    """An empty cache (as `generate` passes on its first step) that does not hold the prefix yet."""
    return getattr(cache, "seektune_prefix_length", None) is None and cache.get_seq_length() == 0


def _mask_over_prefix(mask: torch.Tensor, prefix_length: int, real_length: int) -> torch.Tensor:
    """The 2-D padding mask (batch, real tokens) with the prefix in front, visible to every token."""
    if mask.dim() != 2:
        raise ValueError(
            f"method 'prefix' needs a 2-D attention_mask (batch, tokens), got {tuple(mask.shape)}"
        )
    if mask.shape[-1] == prefix_length + real_length:
        return mask  # already covers the prefix
    if mask.shape[-1] != real_length:
        raise ValueError(
            f"attention_mask covers {mask.shape[-1]} tokens, but the cache and input hold {real_length}"
        )
    return torch.cat([mask.new_ones(mask.shape[0], prefix_length), mask], dim=-1)


def _restarts(position_ids: torch.Tensor) -> bool:
    """True when positions do not count up by one along a row: packed examples."""
    return position_ids.shape[-1] > 1 and bool((torch.diff(position_ids, dim=-1) != 1).any())


def check_prefix_compatible(data_cfg: DataConfig) -> None:
    """Raise a `UserError` when the data settings cannot train method 'prefix' (packed rows)."""
    if data_cfg.packing:
        raise UserError(PACKING_ERROR)


def apply_prefix(model: nn.Module, cfg: PrefixConfig) -> nn.Module:
    """Freeze `model` and give every attention layer `cfg.num_virtual_tokens` trained prefix states;
    returns the same model object."""
    _ensure_no_prefix(model)
    tokens = torch.randint(_config_value(model, "vocab_size"), (1, cfg.num_virtual_tokens))
    initial = cached_states(model, tokens)
    shapes = [(keys.shape, values.shape) for keys, values in initial]
    if cfg.projection:
        projection = (_config_value(model, "hidden_size"), cfg.projection_hidden_size)
        encoder = PrefixEncoder(shapes, projection)
        _attach(model, encoder, initial[0][0])
    else:
        encoder = PrefixEncoder(shapes)
        _attach(model, encoder, initial[0][0])
        encoder.set_states(initial)
    model.seektune_prefix_config = cfg  # read back by `save_prefix` callers (the trainer)
    logger.info(
        "prefix: %d virtual tokens in %d layers (%s per layer)%s",
        cfg.num_virtual_tokens,
        len(shapes),
        " + ".join(f"{tuple(shape)}" for shape in shapes[0]),
        f", trained through an MLP of width {cfg.projection_hidden_size}" if cfg.projection else "",
    )
    return model


def _ensure_no_prefix(model: nn.Module) -> None:
    if hasattr(model, PREFIX_MODULE):
        raise ValueError("the model already has a prefix")


def cached_states(model: nn.Module, token_ids: torch.Tensor) -> list[LayerStates]:
    """What `model` caches in each layer after reading `token_ids` (1, n): [(keys, values)], each
    (heads, n, width); a `UserError` for a model whose cache is not one growing (keys, values) per layer."""
    decoder, blocks = _decoder(model)
    cache = DynamicCache(config=model.config)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            token_ids = token_ids.to(model.get_input_embeddings().weight.device)
            decoder(input_ids=token_ids, use_cache=True, **{_cache_name(decoder): cache})
    finally:
        model.train(was_training)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"} or len(cache.layers) != len(blocks):
        raise UserError(
            f"method.name 'prefix' needs a model whose every layer caches full-attention keys and values; "
            f"{type(model).__name__} caches {', '.join(sorted(kinds))}: choose another method.name"
        )
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _attach(model: nn.Module, encoder: PrefixEncoder, like: torch.Tensor) -> None:
    """Freeze the base, register `encoder` as `model.seektune_prefix` and hook it into the decoder."""
    decoder, blocks = _decoder(model)
    model.requires_grad_(False)
    encoder.to(device=like.device, dtype=like.dtype)
    encoder.train(model.training)
    model.add_module(PREFIX_MODULE, encoder)
    injector = _PrefixInjector(encoder, [_device(block) for block in blocks], _cache_name(decoder))
    decoder.register_forward_pre_hook(injector.before, with_kwargs=True)
    decoder.register_forward_hook(injector.after, with_kwargs=True)
    for block in blocks:  # keep the read-only prefix cache under gradient checkpointing (module docstring)
        block._can_checkpoint_with_cache = True


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder (`model.model`) of a causal LM and its blocks (`model.model.layers`)."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UserError(
            f"method.name 'prefix' needs a model with decoder blocks at model.model.layers (Llama, Qwen2, "
            f"DeepSeek-V2/V3); {type(model).__name__} has none: choose another method.name"
        )
    return decoder, layers


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _config_value(model: nn.Module, name: str) -> int:
    value = getattr(getattr(model, "config", None), name, None)
    if not isinstance(value, int):
        raise UserError(
            f"method.name 'prefix' needs config.{name}, which {type(model).__name__} does not have: "
            f"choose another method.name"
        )
    return value


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The prefix attached by `apply_prefix` or `load_prefix`."""
    encoder = getattr(model, PREFIX_MODULE, None)
    if not isinstance(encoder, PrefixEncoder):
        raise ValueError("the model has no prefix; call apply_prefix or load_prefix first")
    return encoder


def save_prefix(model: nn.Module, folder: Path) -> None:
    """Write the final per-layer prefix states (`prefix.safetensors`) and a config naming the base model
    (`adapter_config.json`) into `folder`, atomically."""
    encoder = prefix_encoder(model)
    with torch.no_grad():
        states = encoder()
    tensors = {}
    for index, (keys, values) in enumerate(states):
        tensors[f"layers.{index}.keys"] = keys.detach().contiguous().cpu()
        tensors[f"layers.{index}.values"] = values.detach().contiguous().cpu()
    folder = Path(folder)
    atomic_write_bytes(folder / PREFIX_WEIGHTS_FILE, save(tensors))
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = model.seektune_prefix_config
    atomic_write_json(
        folder / PREFIX_CONFIG_FILE, {CONFIG_KEY: cfg.model_dump(), "base_model_name_or_path": base}
    )


def is_prefix_folder(folder: Path) -> bool:
    """True when `folder` holds a prefix saved by `save_prefix`."""
    config_file = Path(folder) / PREFIX_CONFIG_FILE
    if not config_file.is_file() or not (Path(folder) / PREFIX_WEIGHTS_FILE).is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_prefix(model: nn.Module, folder: Path, is_trainable: bool = False) -> nn.Module:
    """Attach the prefix saved in `folder` (by `save_prefix`) to the base `model`; returns the same model."""
    _ensure_no_prefix(model)
    folder = Path(folder)
    cfg = _read_prefix_config(folder)
    saved = load_file(folder / PREFIX_WEIGHTS_FILE)
    probe = cached_states(model, torch.zeros((1, cfg.num_virtual_tokens), dtype=torch.long))
    expected = {
        f"layers.{index}.{kind}": state.shape
        for index, pair in enumerate(probe)
        for kind, state in zip(("keys", "values"), pair, strict=True)
    }
    found = {name: tensor.shape for name, tensor in saved.items()}
    if found != expected:
        wrong = sorted(
            name for name in expected.keys() | found.keys() if found.get(name) != expected.get(name)
        )
        raise UserError(
            f"the prefix in {folder} does not fit this base model ({wrong[0]}: saved "
            f"{_shape(found.get(wrong[0]))}, the model caches {_shape(expected.get(wrong[0]))}): "
            f"load it onto the base it was trained on"
        )
    states = [(saved[f"layers.{index}.keys"], saved[f"layers.{index}.values"]) for index in range(len(probe))]
    encoder = PrefixEncoder([(keys.shape, values.shape) for keys, values in states])
    _attach(model, encoder, probe[0][0])
    encoder.set_states(states)
    encoder.requires_grad_(is_trainable)
    model.seektune_prefix_config = cfg
    return model


def _shape(shape: torch.Size | None) -> str:
    return "nothing" if shape is None else str(tuple(shape))


def _read_prefix_config(folder: Path) -> PrefixConfig:
    config_file, weights_file = folder / PREFIX_CONFIG_FILE, folder / PREFIX_WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"{folder} is not a seektune prefix folder: it needs {PREFIX_CONFIG_FILE} and "
            f"{PREFIX_WEIGHTS_FILE} (written by save_prefix); point at the folder a method 'prefix' run saved"
        )
    try:
        return PrefixConfig(**json.loads(config_file.read_text(encoding="utf-8"))[CONFIG_KEY])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(
            f"{config_file} is not a valid seektune prefix config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}): save the prefix again with save_prefix"
        ) from exc
