"""Compression step 'prune': remove weights gradually, optionally fine-tune between steps, and save a plain
model (no masks, no hooks: what `from_pretrained` loads).

Three modes (`compress.prune.mode`), each reached over `compress.prune.steps` steps on the cubic schedule
of Zhu & Gupta (2017): after step t of T the model has lost s * (1 - (1 - t/T)**3) of the weights (or
channels, or heads), with `compress.prune.recovery_steps` of fine-tuning after each step.

- unstructured: global L1 magnitude pruning over one pool: the weight of every nn.Linear except the
  output head (and MoE routers), plus DeepSeek's fused routed experts (3-D parameters in transformers 5,
  no nn.Linear: torch's pruning takes any module + parameter name, so they join the pool). torch does
  the masking (`torch.nn.utils.prune.custom_from_mask`, which composes with the masks of earlier steps
  and keeps pruned weights at zero while recovery trains) and makes it permanent (`prune.remove`).
  What is ours: the threshold of the cumulative target over the whole pool (torch's `global_unstructured`
  takes an amount relative to what is still unpruned, per PruningContainer, which a cumulative schedule
  would have to convert step by step), and for pools too large to sort at once, a threshold estimated
  from a seeded sample (`EXACT_THRESHOLD_LIMIT`).
- channels: whole hidden channels of the dense MLPs (gate_proj/up_proj rows, down_proj columns), the same
  number in every dense block (the config has one intermediate_size), physically removed.
- heads: whole attention heads, physically removed: for Llama/Qwen2 (grouped-query attention) whole
  key-value groups (a key-value head with its query heads); for DeepSeek-V2/V3 (MLA) single heads.

No library prunes transformers' modules structurally and keeps them loadable by `from_pretrained` (torch's
structured pruning only zeroes rows), so the surgery of the two structured modes is ours, written against
the modelling code of transformers 5.23 (`modeling_llama.py`, `modeling_qwen2.py`,
`modeling_deepseek_v2.py`, `modeling_deepseek_v3.py`): the attention modules reshape with -1 heads, so
only the Linear shapes, the `num_heads` attribute of MLA and the config change.

Importance is computed from the weights, not from activations: pruning then needs no data when there
is no recovery (the chain's data has no training split then), and is deterministic. Each score is the
Cauchy-Schwarz bound of what the unit can add to the residual stream:
- channel j of a SwiGLU MLP adds silu(g_j.x)(u_j.x) d_j, bounded by ||g_j|| ||u_j|| ||d_j|| ||x||^2:
  score = ||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]|| (a channel with any zero factor adds nothing);
- a head adds O_h V a, with attention weights a summing to 1 (queries and keys only decide where it
  looks): score = ||V_h||_F * ||O_h||_F, with V_h the rows producing its values (v_proj, or kv_b_proj's
  value rows in MLA) and O_h its o_proj columns; a key-value group scores the sum over its query heads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from seektune.compress.finetune import short_finetune
from seektune.compress.steps import StepOutput, load_step_model, save_step_model
from seektune.config import ModelConfig, PruneConfig, TrainConfig
from seektune.data.prepare import PreparedData
from seektune.errors import UserError

logger = logging.getLogger(__name__)

GQA_FAMILIES = ("llama", "qwen2")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
STRUCTURED_FAMILIES = (*GQA_FAMILIES, *MLA_FAMILIES)
# Pools larger than this many weights get their threshold from a sample of SAMPLE_SIZE weights: an exact
# k-th value needs a float32 copy of the whole pool (28 GB for a 7B model).
EXACT_THRESHOLD_LIMIT = 2**26
SAMPLE_SIZE = 2**24


def sparsity_schedule(sparsity: float, steps: int) -> list[float]:
    """The cumulative share pruned after each of `steps` steps: s * (1 - (1 - t/T)**3), t = 1..T."""
    return [sparsity * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def prune_model(
    source: Path,
    out_dir: Path,
    work_dir: Path,
    cfg: PruneConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PreparedData,
    seed: int,
) -> StepOutput:
    """Prune the plain model in `source` to `cfg.sparsity` in `cfg.steps` steps (with recovery
    fine-tuning after each when `cfg.recovery_steps` > 0) and write the plain pruned model, tokenizer and
    generation config to `out_dir`, whole or not at all; `source` is only read."""
    _check_request(source, cfg, data)
    loaded = load_step_model(model_cfg, source)
    model, tokenizer = loaded.model, loaded.tokenizer
    if getattr(model, "peft_config", None):
        raise UserError(_MERGE_FIRST.format(source=source))
    if cfg.mode != "unstructured":
        _require_structured_family(model)
    pruner = _PRUNERS[cfg.mode](model, seed)
    per_step = []
    for step, target in enumerate(sparsity_schedule(cfg.sparsity, cfg.steps), start=1):
        reached = pruner.prune_to(target)
        record: dict[str, Any] = {"step": step, "target": target, "sparsity_reached": reached}
        if cfg.recovery_steps > 0:
            record.update(
                _recover(model, tokenizer, data, train_cfg, work_dir / f"recovery-{step}", seed, cfg)
            )
        per_step.append(record)
        logger.info("prune step %d/%d (%s): %.4f of target %.4f", step, cfg.steps, cfg.mode, reached, target)
    model.eval()
    details = {
        "mode": cfg.mode,
        "sparsity": cfg.sparsity,
        "steps": cfg.steps,
        "recovery_steps": cfg.recovery_steps,
        "recovery_learning_rate": cfg.recovery_learning_rate if cfg.recovery_steps else None,
        "per_step": per_step,
        **pruner.finish(),
    }
    _check_plain_state(model)
    save_step_model(model, tokenizer, Path(out_dir))
    logger.info("pruned %s (%s, sparsity %s): %s", source, cfg.mode, cfg.sparsity, out_dir)
    return StepOutput(name="prune", model_dir=Path(out_dir), details=details)


_MERGE_FIRST = (
    "{source} is an adapter, and pruning removes weights of the model itself: merge it first "
    "(compress.merge.enabled: true)"
)


def _check_request(source: Path, cfg: PruneConfig, data: PreparedData) -> None:
    """What can be refused before anything loads."""
    from seektune.models.load import adapter_base

    if adapter_base(str(source)) is not None:
        raise UserError(_MERGE_FIRST.format(source=source))
    if cfg.recovery_steps > 0 and not len(data.tokenized.get("train") or []):
        raise UserError(
            f"compress.prune.recovery_steps {cfg.recovery_steps} fine-tunes on the training split, and the "
            "data has none: give data with a training split or set compress.prune.recovery_steps: 0"
        )


def _require_structured_family(model: Any) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in STRUCTURED_FAMILIES:
        raise UserError(
            "compress.prune.mode channels/heads knows the module layout of "
            f"{', '.join(STRUCTURED_FAMILIES)}, not model_type {model_type!r}: use compress.prune.mode "
            "unstructured"
        )


def _recover(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    train_cfg: TrainConfig,
    work_dir: Path,
    seed: int,
    cfg: PruneConfig,
) -> dict[str, Any]:
    result = short_finetune(
        model, tokenizer, data, train_cfg, work_dir, seed, cfg.recovery_steps, cfg.recovery_learning_rate
    )
    losses = [row["loss"] for row in result.history if "loss" in row]
    return {
        "recovery_first_loss": losses[0] if losses else None,
        "recovery_last_loss": losses[-1] if losses else None,
    }


def _check_plain_state(model: Any) -> None:
    """No mask or reparametrised weight may reach the saved file (a bug if one does)."""
    leftover = [k for k in model.state_dict() if k.endswith(("_orig", "_mask"))]
    if leftover:
        raise RuntimeError(f"pruning left reparametrised tensors in the model: {leftover[:3]}")


def _parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- unstructured ---------------------------------------------------------------------------------------


def unstructured_pool(model: Any) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight global L1 pruning takes: each nn.Linear's weight except
    the output head and MoE routers, and the fused 3-D routed-expert parameters of DeepSeek-V2/V3."""
    head = model.get_output_embeddings()
    pool: list[tuple[nn.Module, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is head or name.endswith(("mlp.gate", ".router")):
                continue
            pool.append((module, "weight"))
        elif type(module).__name__.endswith("Experts"):
            pool += [(module, key) for key, p in module.named_parameters(recurse=False) if p.dim() == 3]
    return pool


def _current_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(module, f"{name}_mask", None)


def _effective(module: nn.Module, name: str) -> torch.Tensor:
    """The weight as the model computes with it: original times mask while a mask is on (the attribute
    torch's hook sets is only refreshed at the next forward pass)."""
    mask = _current_mask(module, name)
    if mask is None:
        return getattr(module, name)
    return getattr(module, f"{name}_orig") * mask


def _scores(module: nn.Module, name: str) -> torch.Tensor:
    """|w| flattened in float32, with the already pruned weights at -1 so they are pruned first again."""
    with torch.no_grad():
        score = _effective(module, name).abs().float().flatten()
        mask = _current_mask(module, name)
        return score if mask is None else score.masked_fill(mask.flatten() == 0, -1.0)


class _UnstructuredPruner:
    """Global L1 pruning of the pool, masks kept (so recovery cannot revive a weight) until `finish`."""

    def __init__(self, model: Any, seed: int) -> None:
        self.model = model
        self.pool = unstructured_pool(model)
        self.size = sum(getattr(m, n).numel() for m, n in self.pool)
        self.generator = torch.Generator().manual_seed(seed)

    def prune_to(self, target: float) -> float:
        count = round(target * self.size)
        if count > 0:
            threshold = self._threshold(count)
            with torch.no_grad():
                for module, name in self.pool:
                    weight = getattr(module, name)
                    mask = (_scores(module, name) > threshold).reshape(weight.shape).to(weight.dtype)
                    torch_prune.custom_from_mask(module, name, mask)
        return self._zero_share()

    def _threshold(self, count: int) -> float:
        """The `count`-th smallest score of the pool: exact when the pool is small enough, else the same
        quantile of a seeded uniform sample (one tensor's scores in memory at a time)."""
        if self.size <= EXACT_THRESHOLD_LIMIT:
            scores = [_scores(module, name) for module, name in self.pool]
            return torch.cat([s.to(scores[0].device) for s in scores]).kthvalue(count).values.item()
        picks = []
        for module, name in self.pool:
            score = _scores(module, name)
            share = max(1, round(SAMPLE_SIZE * score.numel() / self.size))
            index = torch.randint(score.numel(), (share,), generator=self.generator)
            picks.append(score[index.to(score.device)].cpu())
        sample = torch.cat(picks)
        k = min(max(1, round(count / self.size * sample.numel())), sample.numel())
        return sample.kthvalue(k).values.item()

    def _zero_share(self) -> float:
        zeros = sum(int((_effective(m, n) == 0).sum()) for m, n in self.pool)
        return zeros / self.size if self.size else 0.0

    def finish(self) -> dict[str, Any]:
        """Make the masks permanent (plain parameters again) and measure the zeros."""
        for module, name in self.pool:
            if _current_mask(module, name) is not None:
                torch_prune.remove(module, name)
        total = _parameter_count(self.model)
        all_zeros = sum(int((p == 0).sum()) for p in self.model.parameters())
        experts = sum(getattr(m, n).numel() for m, n in self.pool if getattr(m, n).dim() == 3)
        return {
            "pool_parameters": self.size,
            "pool_expert_parameters": experts,
            "parameters_outside_pool": total - self.size,
            "outside_pool": "embeddings, output head, norms, biases and MoE routers are not pruned",
            "pool_zero_share": self._zero_share(),
            "all_zero_share": all_zeros / total,
        }


# -- channels -------------------------------------------------------------------------------------------


def dense_mlps(model: Any) -> list[nn.Module]:
    """The dense gate/up/down MLP of every decoder block that has one (for DeepSeek-V2/V3 the first
    `first_k_dense_replace` blocks; the MoE blocks' experts and shared experts are not among them)."""
    found = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if all(
            isinstance(getattr(mlp, key, None), nn.Linear) for key in ("gate_proj", "up_proj", "down_proj")
        ):
            found.append(mlp)
    return found


def channel_importance(mlp: nn.Module) -> torch.Tensor:
    """Score of each hidden channel: ||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]|| (see the module doc)."""
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    return gate * up * down


def _shrink_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep only the rows (dim 0: outputs, with their bias) or columns (dim 1: inputs) in `keep`."""
    keep = keep.to(linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, keep).clone())
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, keep).clone())
    linear.out_features, linear.in_features = linear.weight.shape


def _keep_most_important(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of all but the `remove` lowest scores."""
    kept = scores.argsort(descending=True, stable=True)[: scores.numel() - remove]
    return kept.sort().values


class _ChannelPruner:
    """Removes the same number of hidden channels, each block's least important, from every dense MLP."""

    def __init__(self, model: Any, seed: int) -> None:
        self.model = model
        self.mlps = dense_mlps(model)
        if not self.mlps:
            raise UserError(
                f"{model.config.model_type} model has no dense MLP block whose channels could be removed: "
                "use compress.prune.mode unstructured or heads"
            )
        self.before = self.mlps[0].gate_proj.out_features
        self.parameters_before = _parameter_count(model)
        self.removed = 0

    def prune_to(self, target: float) -> float:
        wanted = min(round(target * self.before), self.before - 1)  # keep one channel
        more = wanted - self.removed
        if more > 0:
            for mlp in self.mlps:
                keep = _keep_most_important(channel_importance(mlp), more)
                _shrink_linear(mlp.gate_proj, keep, 0)
                _shrink_linear(mlp.up_proj, keep, 0)
                _shrink_linear(mlp.down_proj, keep, 1)
                mlp.intermediate_size = keep.numel()
            self.removed = wanted
            self.model.config.intermediate_size = self.before - wanted
        return self.removed / self.before

    def finish(self) -> dict[str, Any]:
        details = {
            "channels_before": self.before,
            "channels_after": self.before - self.removed,
            "dense_mlps": len(self.mlps),
            "parameters_before": self.parameters_before,
            "parameters_after": _parameter_count(self.model),
        }
        if self.model.config.model_type in MLA_FAMILIES:
            details["left_alone"] = "the MoE blocks' routed and shared experts (moe_intermediate_size)"
        return details


# -- heads ----------------------------------------------------------------------------------------------


def _norms(weight: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Frobenius norm of each of `heads` equal slices of `weight` along `dim`."""
    weight = weight.detach().float()
    slices = (
        weight.reshape(heads, -1, weight.shape[1]) if dim == 0 else weight.reshape(weight.shape[0], heads, -1)
    )
    return slices.pow(2).sum(dim=(1, 2) if dim == 0 else (0, 2)).sqrt()


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """The row (or column) indices of `units`, each `width` wide and laid out one after another."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def head_importance(attention: nn.Module, config: Any) -> torch.Tensor:
    """Score of each removable unit of one attention module: a key-value group (Llama/Qwen2) or a head
    (DeepSeek MLA), as ||V||_F * ||O||_F (see the module doc)."""
    if config.model_type in MLA_FAMILIES:
        heads = attention.num_heads
        kv = attention.kv_b_proj.weight.detach().float().reshape(heads, -1, attention.kv_b_proj.in_features)
        value = kv[:, attention.qk_nope_head_dim :].pow(2).sum(dim=(1, 2)).sqrt()
        return value * _norms(attention.o_proj.weight, heads, 1)
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    value = _norms(attention.v_proj.weight, groups, 0)
    out = _norms(attention.o_proj.weight, groups * per_group, 1).reshape(groups, per_group).sum(dim=1)
    return value * out


class _HeadPruner:
    """Removes the same number of key-value groups (GQA) or heads (MLA) from every attention module."""

    def __init__(self, model: Any, seed: int) -> None:
        self.model = model
        config = model.config
        self.mla = config.model_type in MLA_FAMILIES
        self.attentions = [layer.self_attn for layer in model.model.layers]
        self.heads_before = config.num_attention_heads
        self.kv_heads_before = config.num_key_value_heads
        self.units = self.heads_before if self.mla else self.kv_heads_before
        self.parameters_before = _parameter_count(model)
        self.removed = 0

    def prune_to(self, target: float) -> float:
        wanted = min(round(target * self.units), self.units - 1)  # keep one head or group
        more = wanted - self.removed
        if more > 0:
            config = self.model.config
            for attention in self.attentions:
                keep = _keep_most_important(head_importance(attention, config), more)
                (self._shrink_mla if self.mla else self._shrink_gqa)(attention, keep)
            self.removed = wanted
            self._update_config(self.units - wanted)
        return self.removed / self.units

    def _shrink_gqa(self, attention: nn.Module, groups: torch.Tensor) -> None:
        config, dim = self.model.config, attention.head_dim
        per_group = config.num_attention_heads // config.num_key_value_heads
        query_heads = _rows(groups, per_group)
        _shrink_linear(attention.q_proj, _rows(query_heads, dim), 0)
        _shrink_linear(attention.k_proj, _rows(groups, dim), 0)
        _shrink_linear(attention.v_proj, _rows(groups, dim), 0)
        _shrink_linear(attention.o_proj, _rows(query_heads, dim), 1)

    def _shrink_mla(self, attention: nn.Module, heads: torch.Tensor) -> None:
        query = attention.q_proj if attention.q_proj is not None else attention.q_b_proj
        _shrink_linear(query, _rows(heads, attention.qk_head_dim), 0)
        _shrink_linear(
            attention.kv_b_proj, _rows(heads, attention.qk_nope_head_dim + attention.v_head_dim), 0
        )
        _shrink_linear(attention.o_proj, _rows(heads, attention.v_head_dim), 1)
        attention.num_heads = heads.numel()

    def _update_config(self, units_left: int) -> None:
        config = self.model.config
        if self.mla:
            # MLA expands one key and value per head from the latent: as many key-value heads as heads.
            config.num_attention_heads = config.num_key_value_heads = units_left
            for attention in self.attentions:
                attention.num_key_value_groups = 1
            return
        per_group = config.num_attention_heads // config.num_key_value_heads
        config.head_dim = self.attentions[0].head_dim  # hidden_size // num_attention_heads no longer holds
        config.num_key_value_heads = units_left
        config.num_attention_heads = units_left * per_group

    def finish(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "unit": "head" if self.mla else "key-value group",
            "heads_before": self.heads_before,
            "heads_after": config.num_attention_heads,
            "key_value_heads_before": self.kv_heads_before,
            "key_value_heads_after": config.num_key_value_heads,
            "parameters_before": self.parameters_before,
            "parameters_after": _parameter_count(self.model),
        }


_PRUNERS: dict[str, type] = {
    "unstructured": _UnstructuredPruner,
    "channels": _ChannelPruner,
    "heads": _HeadPruner,
}
