"""Compression step 'qat': quantisation-aware fine-tuning for the int8 scheme the chain applies next.

The model trains a few steps while its Linear layers compute with fake-quantised numbers (rounded to the
int8 grid, kept in float), so training sees what the int8 model computes at inference and the weights
settle where rounding costs least. Then the fake quantisers are removed again: the step writes a plain
float model with QAT-trained weights, which the chain's 'quantize' step (`quantize_model`) turns into int8.

torchao does the work: `quantize_(model, QATConfig(..., step="prepare"))` swaps every Linear for a
`FakeQuantizedLinear` (its rounding passes gradients straight through, so the run's Trainer trains it
like any Linear), and `QATConfig(step="convert")` without a base config swaps them back. What is ours:
- the fake quantisation configs. torchao 0.18's QATConfig infers them only from int4, float8, MX/NVFP4
  and intx base configs, not from the two int8 configs `quantize_model` applies (Int8WeightOnlyConfig,
  Int8DynamicActivationInt8WeightConfig: `_infer_fake_quantize_configs` raises "Unexpected base
  config"), so they are built explicitly with IntxFakeQuantizeConfig to match those configs' Int8Tensor:
  weights symmetric int8 per output channel over [-128, 127] with float32 eps, and for int8_dynamic the
  activations symmetric int8 per token;
- `SymmetricPerTokenFakeQuantizer`: torchao's IntxFakeQuantizer raises "Symmetric per token is not
  supported yet", and Int8DynamicActivationInt8WeightConfig quantises activations symmetrically, so this
  small quantiser does it with torchao's own primitives (`choose_qparams_affine`, `_fake_quantize_affine`,
  whose rounding is straight-through);
- which Linears are fake-quantised: those transformers' TorchAoConfig quantises when `quantize_model`
  loads the folder (not the output embedding, the tied weights or the last module: `quantized_linears`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import prune as torch_prune

from seektune.compress.finetune import short_finetune
from seektune.compress.steps import StepOutput, load_step_model, save_step_model
from seektune.config import CPU_QUANTIZE_METHODS, ModelConfig, QatConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError

logger = logging.getLogger(__name__)

INT8_MIN, INT8_MAX = -128, 127
# The eps of torchao's Int8Tensor.from_hp (float32's, whatever the model's dtype): the same scales.
INT8_EPS = torch.finfo(torch.float32).eps
SCHEMES = {
    "int8_weight_only": "int8 weights (symmetric, per output channel)",
    "int8_dynamic": "int8 weights (symmetric, per output channel), int8 activations (symmetric, per token)",
}


def _fake_quantizer_base() -> type:
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return FakeQuantizerBase


class SymmetricPerTokenFakeQuantizer(_fake_quantizer_base()):  # type: ignore[misc]
    """Fake-quantise activations to symmetric int8 with one scale per token (the last dimension), as
    torchao's Int8DynamicActivationInt8WeightConfig quantises them at inference."""

    def __init__(self) -> None:
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        super().__init__()
        self.config = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=True, eps=INT8_EPS)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import (
            MappingType,
            _fake_quantize_affine,
            choose_qparams_affine,
        )

        if not self.enabled:
            return x
        block = (*([1] * (x.dim() - 1)), x.shape[-1])  # one scale per token
        scale, zero_point = choose_qparams_affine(
            x,
            MappingType.SYMMETRIC,
            block,
            torch.int8,
            INT8_MIN,
            INT8_MAX,
            eps=INT8_EPS,
            scale_dtype=torch.float32,
            zero_point_dtype=torch.int8,
        )
        fake = _fake_quantize_affine(x, block, scale, zero_point, torch.int32, INT8_MIN, INT8_MAX)
        return fake.to(x.dtype)


def weight_fake_quantize_config() -> Any:
    """Symmetric int8 per output channel: what Int8Tensor.from_hp(weight, PerRow()) computes."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True, eps=INT8_EPS)


def quantized_linears(model: Any) -> list[str]:
    """Names of the Linear layers that quantising this model with transformers' TorchAoConfig converts:
    all but the output embedding, tied weights and the module of the last parameter."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skip)
    ]


def prepare_qat(model: Any, method: str) -> int:
    """Swap the Linears `quantize_model` will quantise for torchao FakeQuantizedLinears with the fake
    quantisation of `method`, in place; return how many were swapped."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    _check_method(method)
    targets = set(quantized_linears(model))
    quantize_(
        model,
        QATConfig(weight_config=weight_fake_quantize_config(), step="prepare"),
        filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name in targets,
    )
    swapped = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    if method == "int8_dynamic":
        for module in swapped:
            module.activation_fake_quantizer = SymmetricPerTokenFakeQuantizer()
    return len(swapped)


def remove_fake_quantization(model: Any) -> int:
    """Swap every FakeQuantizedLinear back to a plain Linear with the same (trained) weights, in place;
    return how many were swapped."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    count = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    quantize_(
        model,
        QATConfig(step="convert"),
        filter_fn=lambda module, name: isinstance(module, FakeQuantizedLinear),
    )
    return count


def qat_finetune(
    source: Path,
    out_dir: Path,
    cfg: QatConfig,
    method: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PreparedData,
    seed: int,
    work_dir: Path,
    keep_zeros: bool = False,
) -> StepOutput:
    """Fine-tune the plain model in `source` for `cfg.max_steps` steps with the fake quantisation of
    `method` (int8_dynamic or int8_weight_only), then write it as a plain float model (weights,
    tokenizer, generation config) to `out_dir`, whole or not at all; `source` is only read. With
    `keep_zeros` (after unstructured pruning) the zero weights of every fake-quantised Linear stay zero
    (torch's pruning masks, removed again before saving), so training does not undo the sparsity."""
    _check_method(method)
    loaded = load_step_model(model_cfg, source)
    model = loaded.model
    _check_plain(model, source)
    swapped = prepare_qat(model, method)
    if swapped == 0:
        raise UserError(
            f"{source} has no Linear layer that {method} quantises, so quantisation-aware training has "
            "nothing to train: set compress.qat.enabled: false"
        )
    logger.info("fake-quantised %d Linear layers of %s for %s", swapped, source, method)
    masked = _mask_zeros(model) if keep_zeros else []
    model.train()
    result = short_finetune(
        model, loaded.tokenizer, data, train_cfg, work_dir, seed, cfg.max_steps, cfg.learning_rate
    )
    for module in masked:
        torch_prune.remove(module, "weight")
    remove_fake_quantization(model)
    model.eval()
    save_step_model(model, loaded.tokenizer, Path(out_dir))
    losses = [row["loss"] for row in result.history if "loss" in row]
    details = {
        "method": method,
        "scheme": SCHEMES[method],
        "fake_quantized_linears": swapped,
        "zeros_kept_in": len(masked),
        "steps": result.steps,
        "learning_rate": cfg.learning_rate,
        "train_loss": result.train_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }
    logger.info(
        "QAT of %s: %d steps, final loss %s: %s", source, result.steps, details["final_loss"], out_dir
    )
    return StepOutput(name="qat", model_dir=Path(out_dir), details=details)


def _mask_zeros(model: Any) -> list[torch.nn.Module]:
    """Hold the zero weights of the fake-quantised Linears at zero while they train."""
    from torchao.quantization.qat import FakeQuantizedLinear

    masked = []
    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear) and not bool(module.weight.all()):
            torch_prune.custom_from_mask(module, "weight", module.weight.detach() != 0)
            masked.append(module)
    return masked


def _check_method(method: str) -> None:
    if method not in CPU_QUANTIZE_METHODS:
        raise UserError(
            f"quantisation-aware training fakes the int8 scheme that compress.quantize.method applies, and "
            f"{method!r} is none of {', '.join(CPU_QUANTIZE_METHODS)}: set compress.quantize.method to one "
            "of them or compress.qat.enabled: false"
        )


def _check_plain(model: Any, source: Path) -> None:
    """QAT trains the model's own weights: a PEFT adapter on top would train only the adapter."""
    if getattr(model, "peft_config", None):
        raise UserError(
            f"{source} loads as a PEFT adapter, and quantisation-aware training trains the weights that get "
            "quantised: merge it first (compress.merge.enabled: true)"
        )
