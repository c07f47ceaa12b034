"""Compression step 'export': a GGUF file for the llama.cpp family, and the check that a saved folder has the
layout vLLM loads.

The `gguf` package (llama.cpp's own Python writer) writes the file and quantises Q8_0, transformers reads it
back for the chain's check (`load_gguf`). What is ours is the conversion, because `gguf` does not ship
llama.cpp's `convert_hf_to_gguf.py`; it follows that script's `LlamaModel` and `Qwen2Model` (the
architectures of the DeepSeek-R1 distills), whose choices are repeated here:
- metadata: block count, context/embedding/feed-forward length, head counts, rope base, RMS-norm epsilon,
  file type; Llama also the vocabulary size and the rope dimension count;
- Llama's query and key rows are permuted for llama.cpp's rotary layout (`_permute`, undone by transformers'
  GGUF reader); Qwen2 is written as it is. Llama-3 rope scaling becomes the `rope_freqs` tensor;
- 1-D tensors and norms stay F32, the rest is `cfg.gguf_type` (Q8_0 falls back to F16 for rows that are not
  a multiple of its 32-value block);
- the vocabulary: byte-level BPE as tokenizer model "gpt2" (tokens, types, merges, special ids and the
  chat template through `gguf.SpecialVocab`) and the pre-tokenizer name llama.cpp splits text by.
Tensors are read one at a time from the safetensors files and written straight to the file, so a model
never sits in memory twice. `export_gguf` then reads the tokenizer back the way transformers does and
records whether it encodes like the source (`details["tokenizer_round_trip"]`); `load_gguf` applies
`rope_freqs`, which that reader ignores, as llama.cpp does. DeepSeek-V2/V3 (MLA), other architectures and
other tokenizer kinds are refused before anything is written (`gguf_unsupported`).

`vllm_layout_problems` inspects a saved folder (config, safetensors headers, index, tokenizer files) for
what vLLM would not load; vLLM is not imported (it is not a dependency).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seektune.compress.steps import StepOutput, written_whole
from seektune.config import ExportConfig, ModelConfig
from seektune.errors import UserError

if TYPE_CHECKING:
    from seektune.models.load import LoadedModel

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# The files a tokenizer's vocabulary is in (tokenizer_config.json alone holds none).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def gguf_file_name(gguf_type: str) -> str:
    """The name of the GGUF file `export_gguf` writes for a tensor type."""
    return f"model-{gguf_type}.gguf"


# -- what can be exported -----------------------------------------------------------------------------


def gguf_unsupported(folder: Path, heads_pruned: bool = False) -> str | None:
    """Why the model in `folder` (a model folder, a seektune run directory, or a LoRA adapter folder, whose
    base is checked) cannot become a GGUF file, as the line to show the user; None when it can.
    `heads_pruned`: the chain prunes attention heads first (head_dim then is no hidden_size / heads)."""
    from seektune.compress.merge import model_folder

    folder = model_folder(Path(folder))
    config_dir, config = _model_config(folder)
    if config is None:
        return (
            f"compress.export.gguf needs the model's config.json, and {config_dir} has none: give a folder "
            "written by save_pretrained, or turn compress.export.gguf off"
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            "compress.export.gguf supports llama and qwen2 models (the R1 distills); "
            f"{config_dir} is {model_type}: turn compress.export.gguf off"
        )
    problem = _architecture_problem(config)
    if not problem and heads_pruned and model_type == "qwen2":
        problem = (
            "after head pruning its head size is no longer hidden_size / heads, which transformers' GGUF "
            "reader (the export's check) cannot read for qwen2; prune channels instead"
        )
    elif not problem and model_type == "qwen2" and _explicit_head_dim(config):
        problem = (
            "its head_dim is not hidden_size / heads, which transformers' GGUF reader cannot read for qwen2"
        )
    if problem:
        return f"compress.export.gguf cannot convert {config_dir}: {problem}; turn compress.export.gguf off"
    tokenizer_dir = folder if _has_vocabulary(folder) else config_dir
    problem = _tokenizer_problem(tokenizer_dir)
    if problem:
        return f"compress.export.gguf cannot convert the tokenizer of {tokenizer_dir}: {problem}"
    return None


def _has_vocabulary(folder: Path) -> bool:
    return any((folder / name).is_file() for name in VOCABULARY_FILES)


def _model_config(folder: Path) -> tuple[Path, dict[str, Any] | None]:
    """Where the model's config lives (an adapter's base, maybe a hub id) and that config, None if missing."""
    from transformers import AutoConfig

    from seektune.models.load import adapter_base

    base = adapter_base(str(folder)) if folder.is_dir() else None
    config_dir = Path(base) if base else folder
    config_file = config_dir / "config.json"
    if config_file.is_file():
        try:
            return config_dir, json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{config_file} is no valid JSON ({exc}): save the model again") from exc
    if config_dir.exists():
        return config_dir, None
    try:  # a hub id (an adapter's base): its config from the local Hugging Face cache
        return config_dir, AutoConfig.from_pretrained(str(config_dir)).to_dict()
    except (OSError, ValueError):
        return config_dir, None


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope type and values: transformers 5's `rope_parameters`, or the older `rope_theta`/`rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _explicit_head_dim(config: dict[str, Any]) -> bool:
    """head_dim set and not hidden_size / heads (after head pruning): GGUF must then say it."""
    head_dim = config.get("head_dim")
    return bool(head_dim) and head_dim != config["hidden_size"] // config["num_attention_heads"]


def _architecture_problem(config: dict[str, Any]) -> str | None:
    """What of this llama/qwen2 config neither llama.cpp's converter nor transformers' GGUF reader keeps."""
    if config.get("quantization_config"):
        return "its weights are quantised; export the float model it was made from"
    rope_type = _rope_parameters(config)["rope_type"]
    if config["model_type"] == "llama":
        if config.get("attention_bias") or config.get("mlp_bias"):
            return (
                "it has attention or MLP biases, which transformers' GGUF reader (the export's check) drops"
            )
        if rope_type not in ("default", "llama3"):
            return f"its rope scaling {rope_type!r} is not written (only Llama-3's is)"
    else:
        if config.get("use_sliding_window"):
            return "it uses sliding-window attention, which llama.cpp's qwen2 does not"
        if rope_type != "default":
            return f"its rope scaling {rope_type!r} is not written"
    return None


def _source_tokenizer(folder: Path) -> Any:
    """The tokenizer transformers loads from `folder` (the one the run uses), None when it cannot."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        return None


def _backend_spec(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's effective pipeline as tokenizers serialises it: transformers 5 rebuilds some
    (Qwen2Tokenizer) with their own pre-tokenizer, so tokenizer.json alone can say otherwise."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _tokenizer_problem(folder: Path) -> str | None:
    """Why the tokenizer in `folder` is not a byte-level BPE this module writes (None: it is)."""
    tokenizer = _source_tokenizer(folder)
    if tokenizer is None or getattr(tokenizer, "backend_tokenizer", None) is None:
        return (
            "it has no fast tokenizer (tokenizer.json) that transformers loads; save the tokenizer with "
            "save_pretrained next to the model"
        )
    spec = _backend_spec(tokenizer)
    model = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer")
    if model != "BPE" or not _uses_byte_level(pre):
        return (
            f"it is {model} with {_pre_tokenizer_kind(pre)}, and compress.export.gguf writes byte-level BPE "
            "tokenizers (as the R1 distills have): export a model with such a tokenizer, or turn "
            "compress.export.gguf off"
        )
    if _structural_pre(pre) is None and _check_hash(tokenizer) not in _PRE_BY_HASH:
        return (
            "its pre-tokenizer (how text is split before BPE) is not one llama.cpp names "
            f"({_pre_tokenizer_kind(pre)}), so llama.cpp would split text differently: turn "
            "compress.export.gguf off"
        )
    return None


def _uses_byte_level(pre: dict[str, Any] | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(p) for p in pre.get("pretokenizers") or [])


def _pre_tokenizer_kind(pre: dict[str, Any] | None) -> str:
    if not pre:
        return "no pre-tokenizer"
    if pre.get("type") == "Sequence":
        return "pre-tokenizer " + "+".join(p.get("type", "?") for p in pre.get("pretokenizers") or [])
    return f"pre-tokenizer {pre.get('type')}"


# -- the pre-tokenizer name (tokenizer.ggml.pre) -------------------------------------------------------

# llama.cpp names a BPE pre-tokenizer by the hash of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the hashes below are copied from its table for the
# DeepSeek / Llama / Qwen tokenizers seektune's families use (not re-derived here: no such tokenizer is
# available offline). A tokenizer no hash names is named by its shape (`_structural_pre`).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def _check_hash(tokenizer: Any) -> str:
    return sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()


def _structural_pre(pre: dict[str, Any] | None) -> str | None:
    """The llama.cpp name of a pre-tokenizer that is GPT-2's ByteLevel, or one regex split + ByteLevel whose
    regex transformers' GGUF reader also knows (Llama 3's, Qwen2's...); None for anything else."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2:
        return None
    split, byte_level = parts
    regex = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    preferred = ("llama-bpe", "qwen2")  # the names llama.cpp's own hashes give Llama 3 and Qwen2
    names = [name for name, split_regex in GGUF_PRE_TOKENIZER_SPLITS.items() if split_regex == regex]
    return next((name for name in preferred if name in names), names[0] if names else None)


def _pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for how the tokenizer splits text: by hash as llama.cpp finds it, else by shape."""
    name = _PRE_BY_HASH.get(_check_hash(tokenizer)) or _structural_pre(
        _backend_spec(tokenizer).get("pre_tokenizer")
    )
    if name is None:  # gguf_unsupported refuses such a tokenizer before the export starts
        raise ValueError("the tokenizer's pre-tokenizer has no llama.cpp name")
    return name


# -- the vocabulary ------------------------------------------------------------------------------------


def _looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens some models forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))  # DeepSeek's <｜...｜>
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types for every embedding row (llama.cpp's `get_vocab_base`): rows the
    tokenizer has no token for become UNUSED `[PAD<i>]`, added tokens CONTROL or USER_DEFINED."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has token ids up to {max(vocab.values())} but the model only {vocab_size} "
            "embedding rows: save the tokenizer the model was trained with"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[index].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                types.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


# -- tensors -------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    """One tensor of the GGUF file: its name there, where it comes from, its shape and type."""

    name: str
    source: str | None  # the checkpoint's name; None for rope_freqs, which is computed
    shape: tuple[int, ...]
    ggml_type: Any


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{folder} holds no safetensors weights: compress.export.gguf reads the folder save_pretrained "
            "writes (model.safetensors); save the model again"
        )
    return files


def _checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor name of the checkpoint, with its file and shape (headers only, no data read)."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in _safetensors_files(folder):
        if not file.is_file():
            raise UserError(f"{file} is listed in the index but missing: copy the whole model folder")
        with safe_open(str(file), framework="pt") as weights:
            names = weights.keys()  # safe_open's handle is no mapping: it has keys() but no iteration
            for name in names:
                found[name] = (file, tuple(weights.get_slice(name).get_shape()))
    return found


def _ggml_type(name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """llama.cpp's choice: 1-D tensors and norms F32, the rest the file's type (Q8_0 needs 32-value rows)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1 or name.endswith("_norm.weight") or gguf_type == "f32":
        return GGMLQuantizationType.F32
    if gguf_type == "f16":
        return GGMLQuantizationType.F16
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    return GGMLQuantizationType.Q8_0 if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _plan(
    folder: Path, tensors: dict[str, tuple[Path, tuple[int, ...]]], config: dict[str, Any], gguf_type: str
) -> list[_Tensor]:
    """The GGUF tensors, in file order, named as llama.cpp's tensor map names them."""
    import gguf

    arch = gguf.MODEL_ARCH.LLAMA if config["model_type"] == "llama" else gguf.MODEL_ARCH.QWEN2
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for source, (_, shape) in sorted(tensors.items()):
        if source.endswith(".rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
            continue  # recomputed by the runtime / the tied embedding matrix, as llama.cpp skips them
        name = name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(
                f"{folder} has a tensor llama.cpp has no name for ({source}): export a plain saved model "
                "(merged, without pruning masks or adapter weights)"
            )
        plan.append(_Tensor(name, source, shape, _ggml_type(name, shape, gguf_type)))
    rope = _rope_parameters(config)
    if rope["rope_type"] == "llama3":
        freqs_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Tensor(freqs_name, None, (_head_dim(config) // 2,), gguf.GGMLQuantizationType.F32))
    return plan


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, the two rotary halves become interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors of Llama-3 rope scaling (llama.cpp's `generate_extra_tensors`)."""
    rope = _rope_parameters(config)
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _tensor_data(
    entry: _Tensor, files: dict[str, tuple[Path, tuple[int, ...]]], config: dict[str, Any]
) -> Any:
    """The tensor as the file stores it: float32, permuted for Llama's q/k, then cast or quantised."""
    from gguf.quants import quantize
    from safetensors import safe_open

    if entry.source is None:
        data = _llama3_rope_factors(config)
    else:
        with safe_open(str(files[entry.source][0]), framework="pt") as weights:
            data = weights.get_tensor(entry.source).to(torch.float32).numpy()
        if config["model_type"] == "llama":
            if entry.source.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, config["num_attention_heads"])
            elif entry.source.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return quantize(data, entry.ggml_type)


def _nbytes(entry: _Tensor) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[entry.ggml_type]
    return math.prod(entry.shape) // block * size


# -- writing -------------------------------------------------------------------------------------------

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def _add_metadata(writer: Any, config: dict[str, Any], gguf_type: str, name: str) -> None:
    """llama.cpp's `TextModel.set_gguf_parameters` (+ `LlamaModel`'s vocabulary size and rope dimensions)."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    if config.get("max_position_embeddings"):
        writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    if _explicit_head_dim(config):  # llama.cpp would take hidden_size / heads otherwise
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config["model_type"] == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(config))


def _add_vocabulary(writer: Any, tokenizer: Any, folder: Path, vocab_size: int) -> str:
    """Tokenizer model "gpt2", its pre-tokenizer name, tokens, merges, special ids and chat template."""
    import gguf

    pre = _pre_tokenizer_name(tokenizer)
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if tokenizer.chat_template:  # the template the run uses (model.chat_template or the family's)
        special.chat_template = tokenizer.chat_template
    for kind in ("bos", "eos", "unk", "pad"):  # the ids the run's tokenizer uses (pad may be eos)
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and token_id < vocab_size:
            special.special_token_ids[kind] = token_id
    special.add_to_gguf(writer, quiet=True)
    return pre


def _write_gguf(
    path: Path, folder: Path, config: dict[str, Any], tokenizer: Any, gguf_type: str
) -> dict[str, Any]:
    """Write the file: header, metadata and tensor table first, then the tensors one by one."""
    import gguf

    files = _checkpoint_tensors(folder)
    plan = _plan(folder, files, config, gguf_type)
    writer = gguf.GGUFWriter(path, arch=config["model_type"])
    try:
        _add_metadata(writer, config, gguf_type, folder.name)
        pre = _add_vocabulary(writer, tokenizer, folder, config["vocab_size"])
        for entry in plan:
            dtype = np.float16 if entry.ggml_type == gguf.GGMLQuantizationType.F16 else np.float32
            writer.add_tensor_info(
                entry.name, entry.shape, np.dtype(dtype), _nbytes(entry), raw_dtype=entry.ggml_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in plan:
            writer.write_tensor_data(_tensor_data(entry, files, config))
    finally:
        writer.close()
    kinds: dict[str, int] = {}
    for entry in plan:
        kinds[entry.ggml_type.name] = kinds.get(entry.ggml_type.name, 0) + 1
    return {"tensors": len(plan), "tensor_types": kinds, "tokenizer_pre": pre}


# -- the step ------------------------------------------------------------------------------------------

_ROUND_TRIP_TEXTS = ("Hello world! 12 apples, 345 pears.\n  Indented\tline; émoji 🚀 and 中文.",)


def export_gguf(source: Path, out_dir: Path, cfg: ExportConfig, model_cfg: ModelConfig) -> StepOutput:
    """Convert the float model in `source` to `out_dir/model-<cfg.gguf_type>.gguf` (whole or not at all).

    `out_dir` holds only the GGUF file: transformers (`load_gguf`) and llama.cpp read config, weights and
    tokenizer from it. The source folder is only read.
    """
    from seektune.compress.merge import model_folder
    from seektune.models.load import load_tokenizer

    folder = model_folder(Path(source))
    reason = gguf_unsupported(folder)
    if reason:
        raise UserError(reason)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"compress.export.gguf converts a local model folder and {folder} is none: download the model "
            "(huggingface-cli download) and set compress.source to its folder"
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(model_cfg, str(folder))
    name = gguf_file_name(cfg.gguf_type)
    out_dir = Path(out_dir)
    with written_whole(out_dir) as partial:
        facts = _write_gguf(partial / name, folder, config, tokenizer, cfg.gguf_type)
        round_trip = _tokenizer_round_trip(tokenizer, partial, name)
    path = out_dir / name
    if not round_trip:
        logger.warning(
            "transformers' GGUF reader rebuilds the tokenizer of %s differently (pre-tokenizer %s): "
            "llama.cpp splits text its own way; the chain's check compares token ids and is not affected",
            path,
            facts["tokenizer_pre"],
        )
    details = {
        "architecture": config["model_type"],
        "type": cfg.gguf_type,
        **facts,
        "bytes": path.stat().st_size,
        "vocab_size": config["vocab_size"],
        "tokenizer_round_trip": round_trip,
        "file": name,
    }
    logger.info("exported %s to %s (%s, %d tensors)", folder, path, cfg.gguf_type, facts["tensors"])
    return StepOutput(name="export", model_dir=out_dir, details=details, files=[path])


def _tokenizer_round_trip(tokenizer: Any, folder: Path, name: str) -> bool:
    """Whether the tokenizer transformers builds from the file encodes sample texts like the source's."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    texts = [*_ROUND_TRIP_TEXTS, _CHECK_TEXT]
    return all(
        rebuilt.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        for text in texts
    )


def _gguf_path(out_dir: Path) -> Path:
    found = sorted(Path(out_dir).glob("*.gguf"))
    if len(found) != 1:
        raise UserError(
            f"{out_dir} should hold one GGUF file written by compress.export and holds {len(found)}: "
            "run the export again"
        )
    return found[0]


def load_gguf(out_dir: Path, model_cfg: ModelConfig) -> LoadedModel:
    """The exported GGUF loaded back through transformers' GGUF reader, float32 on the CPU, as a
    `LoadedModel`, so the chain can check it against the float model it came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seektune.models.families import detect_family, ensure_chat_template
    from seektune.models.load import LoadedModel

    path = _gguf_path(Path(out_dir))
    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    _apply_rope_freqs(model, path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, model_cfg.chat_template)
    family = detect_family(model.config, model_cfg.family)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        device=torch.device("cpu"),
        dtype=torch.float32,
        path=str(path),
    )


def _apply_rope_freqs(model: Any, path: Path) -> None:
    """Divide the rotary frequencies by the file's `rope_freqs` (Llama-3 scaling), as llama.cpp does;
    transformers' reader ignores that tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return
    factors = torch.from_numpy(np.array(freqs.data, dtype=np.float32))
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            scaled = module.original_inv_freq / factors.to(module.original_inv_freq.device)
            module.inv_freq = scaled.clone()
            module.original_inv_freq = scaled.clone()


# -- the vLLM layout ----------------------------------------------------------------------------------

# Quantisation methods (config.json quantization_config.quant_method) vLLM has a loader for: its
# QUANTIZATION_METHODS (v0.11). "bitsandbytes" yes (bnb_int8/bnb_nf4); "torchao" yes through vLLM's
# TorchAOConfig, reading the torchao config transformers saves as `quant_type` (safetensors checkpoints of
# torchao since vLLM 0.11.1, vllm-project/vllm#25969; older vLLM needs safe_serialization=False); "fp8" yes.
VLLM_QUANT_METHODS = frozenset(
    {
        "awq", "awq_marlin", "auto-round", "bitblas", "bitsandbytes", "compressed-tensors", "experts_int8",
        "fbgemm_fp8", "fp8", "fp_quant", "gguf", "gptq", "gptq_bitblas", "gptq_marlin", "gptq_marlin_24",
        "hqq", "inc", "ipex", "modelopt", "modelopt_fp4", "moe_wna16", "mxfp4", "petit_nvfp4", "ptpc_fp8",
        "quark", "rtn", "torchao", "tpu_int8",
    }
)  # fmt: skip
_LEFTOVERS = ("base_model.model.", "lora_", "weight_orig", "weight_mask", "base_layer")


def vllm_layout_problems(folder: Path) -> list[str]:
    """What vLLM would not load in the saved model `folder`, one line each; empty when it loads.

    Pure file inspection: config.json and its `architectures`, safetensors weights (and the index of
    sharded ones), tensor names left by PEFT or pruning, the quantisation method, the tokenizer files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = _config_problems(folder)
    problems += _weight_problems(folder)
    if not _has_vocabulary(folder):
        problems.append(
            f"{folder} has no tokenizer files ({', '.join(VOCABULARY_FILES)}): vLLM loads the tokenizer "
            "from the model folder; save it there with tokenizer.save_pretrained"
        )
    return problems


def _config_problems(folder: Path) -> list[str]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / "adapter_config.json").is_file():
            return [f"{folder} is a PEFT adapter, not a model: merge it (compress.merge) for vLLM"]
        return [f"{folder} has no config.json: vLLM needs the model config that save_pretrained writes"]
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"{config_file} is no valid JSON ({exc})"]
    problems = []
    if not config.get("architectures"):
        problems.append(
            f"{config_file} names no `architectures`: vLLM picks its model class from it; save the model "
            "with save_pretrained"
        )
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method and method not in VLLM_QUANT_METHODS:
        problems.append(f"{config_file} is quantised with {method!r}, a method vLLM has no loader for")
    return problems


def _weight_problems(folder: Path) -> list[str]:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in (*folder.glob("*.bin"), *folder.glob("*.pt")))
        if pickles:
            return [
                f"{folder} has weights only as PyTorch pickles ({', '.join(pickles[:3])}): the layout vLLM "
                "loads is safetensors; save with save_pretrained (safe_serialization, the default)"
            ]
        return [f"{folder} has no weight files (*.safetensors)"]
    problems = []
    index = folder / "model.safetensors.index.json"
    if len(shards) > 1 and not index.is_file():
        problems.append(
            f"{folder} has {len(shards)} safetensors files and no model.safetensors.index.json: vLLM "
            "needs the index to find the shards"
        )
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except ValueError as exc:
            return [*problems, f"{index} is no valid JSON ({exc})"]
        missing = sorted(set(weight_map.values()) - {p.name for p in shards})
        if missing:
            problems.append(f"{index} lists shards that are missing: {', '.join(missing[:3])}")
    leftovers = [name for name in _tensor_names(shards) if any(mark in name for mark in _LEFTOVERS)]
    if leftovers:
        problems.append(
            f"{folder} has {len(leftovers)} tensors left by PEFT or pruning ({', '.join(leftovers[:3])}), "
            "which vLLM's model classes do not know: merge the adapter and make pruning permanent before "
            "saving"
        )
    return problems


def _tensor_names(shards: list[Path]) -> Iterator[str]:
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            yield from weights.keys()
