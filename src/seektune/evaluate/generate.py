"""Answers of a model to rendered prompts, generated in left-padded batches with transformers' `generate`.

Each answer is cut at its first end-of-sentence token and says whether it produced one before
`max_new_tokens`: `eos_rate` (in `metrics.py`) is the share of answers that did, the check that a tuned
model has learnt to stop. Decoding is greedy, or temperature and nucleus sampling (`eval.do_sample`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from seektune.config import EvalConfig
from seektune.logs import progress


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """model.eval() for the block, then the mode it had (a training callback calls these mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Generation:
    """One generated answer."""

    text: str
    new_tokens: int  # kept tokens, plus the end-of-sentence token when the answer produced one
    ended_with_eos: bool
    token_ids: list[int] = field(default_factory=list)  # the kept new token ids (end-of-sentence excluded)


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the model's configured end-of-sentence ids and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # generate() kwargs


def _sampling(cfg: EvalConfig) -> dict[str, Any]:
    """generate() settings of cfg: greedy, or temperature and nucleus sampling alone (top_k 0: no top-k)."""
    if cfg.do_sample:
        return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    return dict(GREEDY)


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalConfig) -> list[Generation]:
    """Answers to rendered prompts, in left-padded batches of cfg.batch_size, each cut at its first EOS."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results: list[Generation] = []
    try:
        with eval_mode(model), progress("generating answers", total=len(prompts)) as bar:
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start : start + cfg.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                    **_sampling(cfg),
                )
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    results.append(_decode(row, tokenizer, stops))
                bar.advance(len(chunk))
    finally:
        tokenizer.padding_side = previous_side
    return results


def _decode(new_ids: list[int], tokenizer: Any, stops: list[int]) -> Generation:
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    kept = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generation(
        text=text, new_tokens=len(kept) + (end is not None), ended_with_eos=end is not None, token_ids=kept
    )
