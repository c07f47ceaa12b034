"""Continual learning: a round of training on new data that keeps what the model knew.

Two mechanisms, both measured against plain fine-tuning on the new data alone:

- Replay with rank-based prioritisation (Schaul et al., 2016, "Prioritized Experience Replay", the rank
  variant): every example of the earlier training data (a seeded pool of at most `replay.max_pool`) is
  scored by its mean answer-token loss under the start model; ranked from the highest loss (rank 1) down,
  example i is drawn with p_i ∝ rank_i^-alpha, without replacement, until the replayed examples are
  `replay.share` of the round's training set. alpha 0 is uniform replay; larger alphas favour what the
  model has begun to forget. The rank form is robust to loss outliers, which the proportional form is not.
- Layer freezing: only the top decoder layers (and what sits above them: the final norm and the output
  head) train, taken from the top until they hold `trainable_share` of the model's parameters; the
  embeddings and the lower layers, where general features live, stay as they are. With LoRA and the other
  adapter methods only the adapter weights in those layers train.

Neither library we use offers this (TRL, transformers and PEFT have no replay buffer or layer schedule;
Avalanche's strategies are not built for causal-LM fine-tuning on transformers' Trainer), so the sampling
and the freezing are here; the training is the run's own `seektune.train.trainer.train`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from seektune.errors import UserError
from seektune.logs import log_event

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Parameters above the last decoder layer (the final norm, the output head).
_ABOVE_LAYERS = re.compile(r"(?:^|\.)(norm|lm_head|final_layernorm|ln_f)\.")


def priority_probabilities(losses: np.ndarray, alpha: float) -> np.ndarray:
    """p_i ∝ rank_i^-alpha with rank 1 the highest loss (ties broken by position, stably)."""
    losses = np.asarray(losses, dtype=float)
    order = np.argsort(-losses, kind="stable")
    ranks = np.empty(len(losses))
    ranks[order] = np.arange(1, len(losses) + 1)
    weights = ranks**-alpha
    return weights / weights.sum()


def replay_count(n_new: int, share: float, pool: int) -> int:
    """Replayed examples so that they are `share` of new + replayed (at most the pool)."""
    if share <= 0 or pool == 0:
        return 0
    return min(pool, round(share * n_new / (1 - share)))


def sample_replay(losses: np.ndarray, count: int, alpha: float, seed: int) -> list[int]:
    """Indices of `count` pool examples drawn by priority without replacement (sorted)."""
    if count == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(losses), size=count, replace=False, p=priority_probabilities(losses, alpha))
    return sorted(int(i) for i in chosen)


def example_losses(model: Any, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> np.ndarray:
    """Mean answer-token loss of each tokenised example under `model`."""
    from seektune.evaluate.metrics import perplexity_stats

    stats = perplexity_stats(model, rows, batch_size, pad_id).stats
    return stats[:, 0] / np.maximum(stats[:, 1], 1.0)


def test_perplexity(model: Any, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> float:
    """Perplexity over every answer token of a test set."""
    from seektune.evaluate.metrics import perplexity

    return round(float(perplexity(model, rows, batch_size, pad_id)), 4)


@dataclass
class FrozenLayers:
    """What layer freezing left trainable."""

    layers: list[int]  # decoder layers that train, lowest first
    trainable: int  # parameters that train
    total: int  # parameters of the model

    def to_dict(self) -> dict[str, Any]:
        return {
            "trainable_layers": self.layers,
            "trainable_params": self.trainable,
            "total_params": self.total,
        }


def _depth(name: str, n_layers: int) -> int:
    """-1 below the decoder layers (embeddings), the layer's index, or n_layers above them."""
    found = _LAYER.search(name)
    if found:
        return int(found.group(1))
    return n_layers if _ABOVE_LAYERS.search(name) else -1


def freeze_below_top_layers(model: Any, share: float) -> FrozenLayers:
    """Keep trainable only what the method made trainable in the top layers holding `share` of the model's
    parameters (counted whole, adapters or not, as a share of the base), and above them; freeze the rest."""
    named = list(model.named_parameters())
    depths = [_depth(name, 0) for name, _ in named]
    n_layers = max((d for d in depths if d >= 0), default=-1) + 1
    if n_layers == 0:
        raise ValueError("the model has no `layers.<i>.` parameters to freeze by depth")
    depths = [_depth(name, n_layers) for name, _ in named]
    sizes = np.zeros(n_layers + 2)  # index depth + 1: embeddings, layers, above
    for depth, (_, param) in zip(depths, named, strict=True):
        sizes[depth + 1] += param.numel()
    total = int(sizes.sum())
    kept_from, held = n_layers, sizes[n_layers + 1]  # what is above the layers always trains
    while kept_from > 0 and (kept_from == n_layers or held < share * total):  # at least one layer
        kept_from -= 1
        held += sizes[kept_from + 1]
    trainable = 0
    for depth, (_, param) in zip(depths, named, strict=True):
        if depth < kept_from:
            param.requires_grad_(False)
        elif param.requires_grad:
            trainable += param.numel()
    frozen = FrozenLayers(list(range(kept_from, n_layers)), trainable, total)
    if trainable == 0:
        raise UserError(
            f"continual.trainable_share {share} leaves nothing trainable: the method trains no parameter in "
            f"layers {kept_from}-{n_layers - 1}; raise continual.trainable_share or set it to null"
        )
    log_event(logger, "layer freezing", share=share, **frozen.to_dict())
    return frozen


# ---------------------------------------------------------------------------------------------------------
# One round: score and sample the replay, train with freezing, measure against plain fine-tuning


def _rows(tokenized: Any) -> list[dict[str, list[int]]]:
    return tokenized.select_columns(["input_ids", "labels"]).to_list()


def _mixed(data: Any, replay_rows: Any) -> Any:
    from datasets import concatenate_datasets

    from seektune.data.prepare import PreparedData

    train = data.tokenized["train"]
    columns = [c for c in train.column_names if c in replay_rows.column_names]
    mixed = concatenate_datasets([train.select_columns(columns), replay_rows.select_columns(columns)])
    return PreparedData(
        records=data.records, tokenized={**data.tokenized, "train": mixed}, report=data.report
    )


def continual_round(cfg: Any, run: Any, loaded: Any, data: Any, old: Any, identity: dict[str, Any]) -> tuple:
    """Train `loaded.model` on `data` with replay from `old` and layer freezing; with
    `continual.compare_plain`, also plain fine-tuning of the same start. Returns (trained model, its
    `TrainResult`, the round's summary)."""
    import copy

    from seektune.models.methods import make_trainable
    from seektune.rundir import RunDir
    from seektune.train.trainer import train

    settings, tokenizer = cfg.continual, loaded.tokenizer
    pad, batch = tokenizer.pad_token_id, cfg.eval.batch_size
    tests = {"old_test": _rows(old.tokenized["test"]), "new_test": _rows(data.tokenized["test"])}

    def measure(model: Any) -> dict[str, float]:
        return {name: test_perplexity(model, rows, batch, pad) for name, rows in tests.items()}

    summary: dict[str, Any] = {"perplexity": {"start": measure(loaded.model)}}
    plain_start = copy.deepcopy(loaded.model) if settings.compare_plain else None
    pool = old.tokenized["train"]
    losses = example_losses(loaded.model, _rows(pool), batch, pad) if len(pool) else np.zeros(0)
    n_new = len(data.tokenized["train"])
    count = replay_count(n_new, settings.replay.share, len(pool))
    picked = sample_replay(losses, count, settings.replay.alpha, cfg.seed)
    summary["replay"] = {
        "pool": len(pool),
        "new_examples": n_new,
        "replayed": len(picked),
        "share": round(len(picked) / (n_new + len(picked)), 4) if picked else 0.0,
        "alpha": settings.replay.alpha,
        "pool_mean_loss": round(float(losses.mean()), 4) if len(losses) else None,
        "replayed_mean_loss": round(float(losses[picked].mean()), 4) if picked else None,
    }
    log_event(logger, "replay sampled", **summary["replay"])
    model, _ = make_trainable(loaded.model, cfg.method, loaded.family, cfg.train.gradient_checkpointing)
    if settings.trainable_share is not None:
        summary["freezing"] = freeze_below_top_layers(model, settings.trainable_share).to_dict()
    mixed = _mixed(data, pool.select(picked)) if picked else data
    result = train(cfg.train, model, tokenizer, mixed, run, cfg.seed, checkpoint_identity=identity,
                   eval_cfg=cfg.eval, system_prompt=cfg.data.system_prompt)  # fmt: skip
    summary["perplexity"]["continual"] = measure(model)
    if plain_start is not None:
        plain, _ = make_trainable(plain_start, cfg.method, loaded.family, cfg.train.gradient_checkpointing)
        plain_run = RunDir.create_at(run.path / "continual" / "plain")
        train(cfg.train, plain, tokenizer, data, plain_run, cfg.seed, eval_cfg=cfg.eval, save=False,
              system_prompt=cfg.data.system_prompt)  # fmt: skip
        summary["perplexity"]["plain"] = measure(plain)
        del plain, plain_start
        import shutil

        shutil.rmtree(plain_run.checkpoints_dir, ignore_errors=True)  # its figures are what is kept
    summary.update(_changes(summary["perplexity"]))
    return model, result, summary


def _changes(perplexity: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Forgetting (old-test perplexity gained) and learning (new-test perplexity lost) of each model."""
    start = perplexity["start"]
    trained = [name for name in ("continual", "plain") if name in perplexity]
    return {
        "forgetting": {n: round(perplexity[n]["old_test"] - start["old_test"], 4) for n in trained},
        "learning": {n: round(start["new_test"] - perplexity[n]["new_test"], 4) for n in trained},
    }


def continual_markdown_section(summary: dict[str, Any]) -> list[str]:
    """The report's "Continual learning" section."""
    replay, perplexity = summary["replay"], summary["perplexity"]
    lines = ["## Continual learning", ""]
    lines.append(
        f"- Replay: {replay['replayed']} of {replay['pool']} earlier examples mixed into "
        f"{replay['new_examples']} new ones (share {replay['share']:.0%}), drawn by loss rank with "
        f"alpha {replay['alpha']}"
        + (
            f"; their mean loss {replay['replayed_mean_loss']} against the pool's {replay['pool_mean_loss']}"
            if replay["replayed_mean_loss"] is not None
            else ""
        )
    )
    freezing = summary.get("freezing")
    if freezing:
        layers = freezing["trainable_layers"]
        lines.append(
            f"- Layer freezing: layers {layers[0]}-{layers[-1]} and the head train, "
            f"{freezing['trainable_params']:,} of {freezing['total_params']:,} parameters"
        )
    lines += [
        "",
        "| Model | Old test perplexity | Forgetting | New test perplexity | Learning |",
        "|---|--:|--:|--:|--:|",
    ]
    names = {
        "start": "start model",
        "continual": "continual (replay + freezing)",
        "plain": "plain fine-tuning",
    }
    for key, label in names.items():
        if key not in perplexity:
            continue
        row = perplexity[key]
        forgetting = summary["forgetting"].get(key)
        learning = summary["learning"].get(key)
        lines.append(
            f"| {label} | {row['old_test']:.3f} | {'' if forgetting is None else f'{forgetting:+.3f}'} | "
            f"{row['new_test']:.3f} | {'' if learning is None else f'{learning:+.3f}'} |"
        )
    lines += [
        "",
        "Forgetting is how much the perplexity on the earlier data's test set rose from the start model "
        "(lower is better); learning is how much it fell on the new test set (higher is better).",
        "",
    ]
    return lines
