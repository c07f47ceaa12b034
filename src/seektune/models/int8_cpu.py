"""Run an int8_dynamic model's torchao int8 weights through PyTorch's fbgemm int8 matmul on a CPU.

The saved format stays torchao's (`seektune.compress.quantize`: int8 weights, symmetric, one scale per
output channel, loaded by plain `from_pretrained`). torchao's CPU path for these weights is slow at
batch 1: every Linear call goes through tensor-subclass dispatch and several small int8/int32 ops, and
here decoded slower than fp32. PyTorch's own dynamic int8 Linear (`torch.ao.nn.quantized.dynamic.Linear`,
fbgemm's packed int8 GEMM, activations quantised inside the kernel) is 2-4x faster than fp32 per Linear at
batch 1 on this machine. What is ours: moving the SAME int8 weights and scales into fbgemm's packed
format (no re-quantisation from float), choosing fbgemm's activation range from the CPU, and deciding
which layers may move. The engine: of torch's quantized engines here (fbgemm, x86, onednn, qnnpack),
'x86' (the default) runs a dynamic Linear on fbgemm too, at the same speed, and onednn was 1.7x slower at
batch 1; weights are packed for fbgemm explicitly.

Numerics against torchao's int8_dynamic path (per-token symmetric int8 activations):
- fbgemm quantises activations per tensor, asymmetrically (uint8 with a zero point). At batch-1 decode
  the tensor is one token, so per tensor is per token; with more tokens at once (prefill, a batch, a
  perplexity pass) one scale covers all of them, which is coarser than torchao's one per token.
- On a CPU without VNNI fbgemm needs `reduce_range` (7-bit activations) to stay clear of int16
  saturation, and torch's module always passes it. With VNNI (`torch.cpu._is_vnni_supported()`) we use the
  full 8 bits: measured here, the error of a Linear's output against fp32 falls from 1.6-2.1x torchao's
  to torchao's, at the same speed.
- Only int8_dynamic layers move. int8_weight_only keeps float activations in torchao; fbgemm would
  quantise them, which changes that method's numerics, so its layers stay torchao's.

A swapped model is for inference on this CPU: it cannot be saved with `save_pretrained` (fbgemm's packed
weights are no safetensors tensors) nor moved to another device. The compression chain saves the torchao
model the quantize step made, never a swapped one.

Deprecation: torch 2.13 deprecates the quantized dtypes (`torch.qint8`, pytorch/pytorch#184982), which
fbgemm's prepack still takes as input; the warning it raises once per packed layer is silenced here. The
kernel itself (`torch.ops.quantized.linear_dynamic`) runs on plain float tensors. When a future torch drops
the ops, `fbgemm_available()` is False and models keep torchao's kernel.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from seektune.errors import UserError

try:  # torch 2.13 deprecates the eager quantized modules: a torch without them keeps torchao's kernel
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
except ImportError:  # pragma: no cover - no such torch yet
    DynamicQuantizedLinear = None

logger = logging.getLogger(__name__)

ENGINE = "fbgemm"


def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's quantized engine and its dynamic int8 Linear op."""
    return (
        DynamicQuantizedLinear is not None
        and ENGINE in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
    )


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI (torch's private probe; False when a build lacks it)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


class FbgemmInt8Linear(DynamicQuantizedLinear or torch.nn.Module):
    """PyTorch's dynamic int8 Linear, with fbgemm's activation range chosen for this CPU.

    `torch.ao.nn.quantized.dynamic.Linear` always passes `reduce_range=True` (7-bit activations), which is
    needed only on CPUs without VNNI; here it is an attribute. Inputs of another float dtype are computed in
    float32 and cast back, as fbgemm takes float32 only.
    """

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, reduce_range: bool = True):
        super().__init__(in_features, out_features, bias_, dtype=torch.qint8)
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At batch 1 a Linear's kernel takes 20-50 us here, so every Python step of this method counts.
        packed = self._packed_params._packed_params
        if x.dtype is torch.float32:
            return torch.ops.quantized.linear_dynamic(x, packed, self.reduce_range)
        return torch.ops.quantized.linear_dynamic(x.float(), packed, self.reduce_range).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduce_range={self.reduce_range}"


def _int8_tensor_type() -> type | None:
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:
        return None
    return Int8Tensor


def movable_weight(weight: Any) -> str | None:
    """Why this Linear weight cannot move to fbgemm, or None when it can.

    It can when it is a torchao `Int8Tensor` of int8_dynamic (activations quantised at run time), 2-D, one
    scale per output channel (or one for the whole tensor), symmetric (zero points 0) and without an
    activation pre-scale (AWQ/SmoothQuant), as `Int8DynamicActivationInt8WeightConfig` makes it.
    """
    int8_tensor = _int8_tensor_type()
    if int8_tensor is None or not isinstance(weight, int8_tensor):
        return "not a torchao Int8Tensor"
    if weight.act_quant_kwargs is None:
        return "weight-only (float activations)"
    if weight.qdata.ndim != 2:
        return f"{weight.qdata.ndim}-D weight"
    out_features, in_features = weight.qdata.shape
    if list(weight.block_size) not in ([1, in_features], [out_features, in_features]):
        return f"block size {list(weight.block_size)} (per-group scales)"
    if weight.zero_point is not None and bool(weight.zero_point.any()):
        return "asymmetric weights"
    if weight.act_pre_scale is not None or weight.act_quant_scale is not None:
        return "static or pre-scaled activations"
    return None


@contextmanager
def _packing_engine() -> Iterator[None]:
    """fbgemm as the quantized engine while weights are packed (the default 'x86' engine packs for
    oneDNN or fbgemm by its own rules); the packed weights keep their kernel whatever the engine later."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def fbgemm_linear(linear: torch.nn.Linear, reduce_range: bool) -> FbgemmInt8Linear:
    """An fbgemm Linear holding `linear`'s torchao int8 weights and scales as they are (`movable_weight`)."""
    weight = linear.weight
    out_features, in_features = weight.qdata.shape
    scales = weight.scale.reshape(-1).to(torch.float64).expand(out_features).contiguous()
    bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
    with _packing_engine():
        module = FbgemmInt8Linear(in_features, out_features, bias is not None, reduce_range)
        quantized = torch._make_per_channel_quantized_tensor(
            weight.qdata.contiguous(), scales, torch.zeros(out_features, dtype=torch.long), 0
        )
        module.set_weight_bias(quantized, bias)
    return module


def use_fbgemm_int8(model: torch.nn.Module, reduce_range: bool | None = None) -> int:
    """Replace every int8_dynamic torchao Linear of `model` (on the CPU) by an `FbgemmInt8Linear` holding the
    same int8 weights and scales; returns how many were replaced. `reduce_range` None: True unless this CPU
    has VNNI. The model is changed in place and is then for inference only (see the module docstring)."""
    if not fbgemm_available():
        raise RuntimeError("this torch build has no fbgemm quantized engine")
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    targets = []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and movable_weight(module.weight) is None:
            if module.weight.device.type != "cpu":
                raise ValueError(f"{name} is on {module.weight.device}: fbgemm's int8 kernel runs on a CPU")
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, fbgemm_linear(getattr(parent, child), reduce_range))
    if targets:
        _refuse_saving(model)
        logger.debug("moved %d int8 Linear layers to fbgemm (reduce_range %s)", len(targets), reduce_range)
    return len(targets)


def _refuse_saving(model: torch.nn.Module) -> None:
    """`save_pretrained` of a swapped model fails deep in safetensors; say why instead."""
    if not hasattr(model, "save_pretrained"):
        return

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "this model runs its int8 layers through fbgemm (seektune.models.int8_cpu) and cannot be saved: "
            "save the torchao model it was loaded from (load with model.int8_kernel torchao)"
        )

    model.save_pretrained = save_pretrained


def is_torchao_quantized(model: Any) -> bool:
    """Whether transformers loaded `model` with a torchao quantization_config."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(getattr(method, "value", method)) == "torchao"


def apply_int8_kernel(model: Any, kernel: str, device: torch.device) -> str | None:
    """Pick the kernel of a torchao-quantised model as `model.int8_kernel` says; returns the kernel its int8
    Linear layers now run on ('fbgemm' or 'torchao'), or None for a model that is not torchao-quantised.

    'auto' is fbgemm on a CPU whose torch has it, else torchao; 'fbgemm' where it cannot run is a UserError.
    Only int8_dynamic layers move (see the module docstring): an int8_weight_only model stays torchao's.
    """
    if not is_torchao_quantized(model):
        return None
    if kernel == "torchao":
        return "torchao"
    if device.type != "cpu":
        if kernel == "fbgemm":
            raise UserError(
                f"model.int8_kernel is fbgemm, a CPU kernel, but the model loads on {device}: "
                "use int8_kernel auto or torchao, or model.device cpu"
            )
        return "torchao"
    if not fbgemm_available():
        if kernel == "fbgemm":
            raise UserError(
                "model.int8_kernel is fbgemm but this PyTorch build has no fbgemm engine (supported: "
                f"{', '.join(torch.backends.quantized.supported_engines)}): use int8_kernel auto or torchao"
            )
        return "torchao"
    return "fbgemm" if use_fbgemm_int8(model) else "torchao"
