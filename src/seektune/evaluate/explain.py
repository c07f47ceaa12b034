"""Explainability: how much of its attention a model puts on the prompt while it writes its answer.

For each (prompt, generated answer) pair one forward pass runs over the prompt tokens followed by the answer
tokens with `output_attentions=True`. The row of the query at answer position q is the generation step
that wrote the token after it (the next answer token, or the end after the last one), so the rows read are
the answer's own positions, q = P .. L-1 (P the prompt length, L prompt plus answer), one per answer token.
The step that wrote the first answer token, the last prompt token's row, is left out: the causal mask lets
it see nothing but the prompt, so its share is 1 whatever the model does. Each row's
attention weights, averaged over heads (and, for the overall value, over layers too), are split into mass
on prompt positions and mass on everything else the query can see. The first token is left out of both and
the rest renormalised: decoder models park a large, content-free share of attention on the first token
(the BOS "attention sink", Xiao et al. 2023), which would otherwise count as attention on the prompt
whatever the model reads. With W the averaged weights::

    share(q) = sum(W[q, 1:P]) / sum(W[q, 1:q+1])        for q = P .. L-1

The value is the mean over these rows, then over examples; `per_layer` is the
same with W averaged over heads only, one value per layer. Pairs with an empty answer, or a prompt of fewer
than two tokens (nothing left once the first token is dropped), are skipped. With a prompt-learning PEFT
adapter the virtual tokens are not part of the text and are left out like the first token (the last
`len(text)` query and key positions are used).

Attention weights exist only with eager attention (SDPA and flash kernels never materialise them), so the
model is switched to eager for the measurement and back afterwards. Captum and bertviz visualise attention
but compute no such summary statistic; this is ours.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

METHOD = (
    "mean share of attention on prompt tokens (first token excluded) from the answer's positions (the "
    "steps that wrote each answer token after the first, and the end), averaged over heads and layers"
)


class AttentionUnreadable(Exception):
    """The model's attention weights cannot be read; the message says why."""


def attention_on_prompt(
    model: Any, tokenizer: Any, prompts: list[str], answer_ids: list[list[int]], max_samples: int
) -> dict:
    """Share of answer-token attention on the prompt (see the module docstring); the attention
    implementation and train/eval mode of `model` are restored afterwards."""
    pairs = [(prompt, list(answer)) for prompt, answer in zip(prompts, answer_ids, strict=True) if answer]
    encoded = [(tokenizer(p, add_special_tokens=False)["input_ids"], a) for p, a in pairs]
    encoded = [(prompt, answer) for prompt, answer in encoded if len(prompt) >= 2][:max_samples]
    if not encoded:
        return _unreadable("no example has a generated answer (and a prompt of two tokens or more) to read")
    try:
        with _eager_attention(model):
            measured = [_example_shares(model, prompt, answer) for prompt, answer in encoded]
    except AttentionUnreadable as exc:
        logger.warning("attention on the prompt not measured: %s", exc)
        return _unreadable(str(exc))
    overall = [value for value, _ in measured]
    layers = torch.tensor([per_layer for _, per_layer in measured], dtype=torch.float64)
    return {
        "attention_on_prompt": sum(overall) / len(overall),
        "n": len(measured),
        "per_layer": layers.mean(0).tolist(),
        "method": METHOD,
    }


def _unreadable(reason: str) -> dict:
    return {"attention_on_prompt": None, "reason": reason, "n": 0}


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Run the body with eager attention and the model in eval mode; restore both afterwards."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(target, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    training = model.training
    try:
        try:
            target.set_attn_implementation("eager")
        except (AttributeError, ImportError, ValueError, RuntimeError) as exc:
            raise AttentionUnreadable(f"switching to eager attention failed: {exc}") from exc
        if config._attn_implementation != "eager":
            raise AttentionUnreadable(
                f"{type(target).__name__} cannot switch from {previous} to eager attention, which alone "
                "returns attention weights"
            )
        model.eval()
        yield
    finally:
        model.train(training)
        if previous is not None and getattr(config, "_attn_implementation", previous) != previous:
            target.set_attn_implementation(previous)


@torch.no_grad()
def _example_shares(model: Any, prompt: list[int], answer: list[int]) -> tuple[float, list[float]]:
    """(share averaged over heads and layers, share per layer) of one example."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    try:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    except RuntimeError as exc:
        raise AttentionUnreadable(f"the forward pass with eager attention failed: {exc}") from exc
    attentions = getattr(out, "attentions", None)
    if not attentions or any(layer is None for layer in attentions):
        raise AttentionUnreadable("the model returned no attention weights with output_attentions=True")
    length = ids.shape[1]
    # (layers, L, L): each layer's weights of batch row 0, averaged over heads; virtual tokens cut off
    mass = torch.stack([layer[0, :, -length:, -length:].double().mean(0) for layer in attentions])
    per_layer = [_prompt_share(layer_mass, len(prompt)) for layer_mass in mass]
    return _prompt_share(mass.mean(0), len(prompt)), per_layer


def _prompt_share(mass: torch.Tensor, prompt_len: int) -> float:
    """Mean over the answer's rows q = prompt_len .. L-1 (the steps after the first answer token) of
    mass[q, 1:prompt_len] / mass[q, 1:q+1] (mass: (L, L))."""
    # Row q predicts token q+1: the last prompt row writes the first answer token and the last row (the
    # final answer token as query) writes nothing. Every key but the first (causal: later keys hold 0).
    rows = mass[prompt_len:, 1:]
    on_prompt = rows[:, : prompt_len - 1].sum(-1)
    return float((on_prompt / rows.sum(-1).clamp_min(1e-12)).mean())
