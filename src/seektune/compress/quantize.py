"""Compression step 'quantize': post-training quantisation of the Linear weights.

The libraries do the work: torchao for the CPU methods (through transformers' `TorchAoConfig`, so the
saved folder carries its `quantization_config` and loads with plain `from_pretrained`), bitsandbytes and
torchao's float8 for the GPU methods. What is ours: refusing what cannot work before anything loads (a
GPU method without CUDA, a model that is already quantised), and the facts for the report.

- int8_weight_only: int8 weights, symmetric, one scale per output channel; activations stay float.
- int8_dynamic: the same weights, and activations quantised to int8 per token at run time.
- bnb_int8 / bnb_nf4 (4-bit NormalFloat with double-quantised constants) / fp8: CUDA only.

The output embedding (lm_head) and the input embeddings stay float (TorchAoConfig's default), and so do
DeepSeek-V2/V3's routed experts: transformers 5 fuses them into 3-D parameters, which are no nn.Linear;
`details` counts the parameters quantised and those left float so the report says so.

The saved weights are torchao's; on a CPU, `load_model` runs int8_dynamic ones through PyTorch's fbgemm
int8 matmul (`seektune.models.int8_cpu`, `model.int8_kernel`), because torchao's CPU kernels decode
slower than fp32 on the project's CPU (benchmarks/quantize.py, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from seektune.compress.steps import StepOutput, save_step_model
from seektune.config import CPU_QUANTIZE_METHODS, ModelConfig, QuantizeConfig
from seektune.errors import UserError

logger = logging.getLogger(__name__)

SCHEMES = {
    "int8_weight_only": "int8 weights (symmetric, per output channel), float activations",
    "int8_dynamic": "int8 weights (symmetric, per output channel), int8 activations (per token, at run time)",
    "bnb_int8": "bitsandbytes LLM.int8() weights (outliers in 16-bit)",
    "bnb_nf4": "bitsandbytes 4-bit NF4 weights, double-quantised constants, bf16 compute",
    "fp8": "float8 (e4m3) weights and activations (torchao)",
}


def already_quantized(folder: Path | str) -> str | None:
    """The quantisation method named in `folder/config.json` (quantization_config), or None."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    return str(quantization.get("quant_method") or "unknown method")


def torchao_base_config(method: str) -> Any:
    """torchao's config object of a CPU method (int8_weight_only, int8_dynamic)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ValueError(f"{method} is no torchao CPU method")


def _quantization_config(method: str, model_cfg: ModelConfig) -> Any:
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method in CPU_QUANTIZE_METHODS:
        return TorchAoConfig(torchao_base_config(method))
    require_gpu_method(method, model_cfg)
    if method == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "gate"])
    if method == "bnb_nf4":
        from seektune.models.load import four_bit_config

        return four_bit_config(torch.bfloat16)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())


def require_gpu_method(method: str, model_cfg: ModelConfig) -> None:
    """One line when the GPU method cannot run here: no CUDA GPU (or model.device cpu), no bitsandbytes,
    fp8 on a GPU older than compute capability 8.9."""
    import importlib.util

    if model_cfg.device == "cpu" or not torch.cuda.is_available():
        raise UserError(
            f"compress.quantize.method {method} needs a CUDA GPU and there is none here: use "
            "int8_dynamic or int8_weight_only on a CPU"
        )
    if method.startswith("bnb_") and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"compress.quantize.method {method} needs bitsandbytes: pip install bitsandbytes")
    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise UserError(
            f"compress.quantize.method fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"this one has {'.'.join(map(str, torch.cuda.get_device_capability()))}: use bnb_int8 or bnb_nf4"
        )


def _is_quantized(param: torch.Tensor) -> bool:
    """A torchao tensor subclass, or bitsandbytes' int8/uint8 storage."""
    plain = type(param) in (torch.nn.Parameter, torch.Tensor)
    return not plain or param.dtype in (torch.int8, torch.uint8)


def _parameter_split(model: Any) -> dict[str, int]:
    quantized = kept = 0
    for param in model.parameters():
        if _is_quantized(param):
            quantized += param.numel()
        else:
            kept += param.numel()
    return {"parameters_quantized": quantized, "parameters_left_float": kept}


def quantize_model(source: Path, out_dir: Path, cfg: QuantizeConfig, model_cfg: ModelConfig) -> StepOutput:
    """Load the float model at `source` with the method's quantisation and save it into `out_dir`."""
    from transformers import AutoModelForCausalLM

    from seektune.models.load import load_tokenizer, pick_device, pick_dtype

    method = cfg.method
    done = already_quantized(source)
    if done:
        raise UserError(
            f"{source} is already quantised ({done}): quantise the float model it was made from instead"
        )
    quantization = _quantization_config(method, model_cfg)
    device = pick_device(model_cfg.device)
    dtype = torch.bfloat16 if method == "bnb_nf4" else pick_dtype(model_cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device},
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
    )
    tokenizer = load_tokenizer(model_cfg, str(source))
    split = _parameter_split(model)
    save_step_model(model, tokenizer, out_dir)
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and _is_quantized(m.weight))
    logger.info("quantised %d Linear layers of %s (%s)", linears, source, method)
    return StepOutput(
        "quantize",
        out_dir,
        {"method": method, "scheme": SCHEMES[method], "quantized_linears": linears, **split},
    )
