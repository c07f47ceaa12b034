"""The check after every compression step: the new model against the one before, on a fixed prompt set.

Four figures, each with a limit in the step's `check` section (None: shown, never failing):
- the largest absolute difference of any next-token logit over the last `LOGIT_POSITIONS` positions of
  every prompt (kept per prompt: positions × vocabulary floats, 150k wide for the R1 distills);
- the relative change of perplexity on the first test rows;
- greedy agreement, teacher-forced: the new model reads the prompt plus the old model's greedy answer, and
  we count the answer positions where its argmax is the old model's token (one early difference then
  counts once, not for every token after it); the share of identical free-running answers is shown too;
- the fall of the share of greedy answers that end at EOS.
Limits are for float32. A 16-bit model rounds every logit by about its dtype's relative precision, so
for bf16/fp16 the logit and perplexity limits are at least torch.testing's relative tolerance of that
dtype (bf16 1.6e-2, fp16 1e-3; the logit one times the largest |logit|): a bf16 merge is not a failure
for rounding that bf16 base + adapter shows as much. The figures say which limits applied.
No library compares two checkpoints like this (lm-eval scores one model at a time), hence our own code;
prompts are rendered with the data stage's `prompt_text` and perplexity is the evaluation's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from seektune.config import StepCheckConfig
from seektune.data.prepare import PreparedData, prompt_text
from seektune.errors import UserError
from seektune.evaluate.generate import GREEDY, eval_mode, stop_ids
from seektune.evaluate.metrics import perplexity

PERPLEXITY_ROWS = 64
LOGIT_POSITIONS = 32
# torch.testing.assert_close's default relative tolerances of the 16-bit dtypes
_RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 1e-3}


@dataclass
class ProbeSet:
    """The fixed set: token ids of the rendered prompts, and tokenised test rows for perplexity."""

    prompt_ids: list[list[int]]
    rows: list[dict[str, list[int]]]


@dataclass
class Probe:
    """What one model did on the set."""

    logits: list[torch.Tensor]  # per prompt: (last positions, vocab) next-token logits, float32 on CPU
    answers: list[list[int]]  # greedy continuation per prompt, EOS excluded
    ended_with_eos: list[bool]
    perplexity: float


@dataclass
class CheckResult:
    """One step's check: its figures, and a line per limit it broke."""

    step: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_probe_set(
    data: PreparedData, tokenizer: Any, n_prompts: int, system_prompt: str | None
) -> ProbeSet:
    """The first `n_prompts` test conversations (rendered for generation) and the first test rows."""
    test = data.records["test"]
    prompts = []
    for record in test:
        if record["messages"]:
            prompts.append(prompt_text(record["messages"], tokenizer, system_prompt))
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise UserError(
            "the test split has no conversation, so the compression steps cannot be checked: add "
            "question/answer data or raise data.test_ratio"
        )
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokenized = data.tokenized["test"]
    rows = [
        {"input_ids": r["input_ids"], "labels": r["labels"]}
        for r in tokenized.select(range(min(PERPLEXITY_ROWS, len(tokenized))))
    ]
    return ProbeSet(prompt_ids=ids, rows=rows)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: Any) -> torch.dtype:
    """The compute dtype: the float parameters' (int8 weights compute in their scales' float dtype)."""
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, torch.float32)


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    tensor = torch.tensor([ids], device=_device(model))
    return model(input_ids=tensor).logits[0].float().cpu()


@torch.no_grad()
def _greedy(model: Any, tokenizer: Any, ids: list[int], new_tokens: int) -> tuple[list[int], bool]:
    stops = stop_ids(model, tokenizer)
    tensor = torch.tensor([ids], device=_device(model))
    out = model.generate(
        input_ids=tensor,
        attention_mask=torch.ones_like(tensor),
        max_new_tokens=new_tokens,
        eos_token_id=stops or None,
        pad_token_id=tokenizer.pad_token_id,
        **GREEDY,
    )[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(out) if t in stops), None)
    return (out if end is None else out[:end]), end is not None


def probe_model(model: Any, tokenizer: Any, probes: ProbeSet, new_tokens: int, batch_size: int = 8) -> Probe:
    """Logits, greedy answers, EOS endings and perplexity of `model` on the set (one prompt at a time, so
    no padding enters the comparison)."""
    with eval_mode(model):
        logits = [_logits(model, ids)[-LOGIT_POSITIONS:] for ids in probes.prompt_ids]
        greedy = [_greedy(model, tokenizer, ids, new_tokens) for ids in probes.prompt_ids]
        ppl = (
            perplexity(model, probes.rows, batch_size, tokenizer.pad_token_id)
            if probes.rows
            else float("nan")
        )
    return Probe(
        logits=logits, answers=[a for a, _ in greedy], ended_with_eos=[e for _, e in greedy], perplexity=ppl
    )


@torch.no_grad()
def _teacher_forced_agreement(model: Any, probes: ProbeSet, before: Probe) -> float | None:
    """Share of `before`'s answer tokens that `model` predicts (argmax) when it reads the same prefix."""
    agree = total = 0
    with eval_mode(model):
        for ids, answer in zip(probes.prompt_ids, before.answers, strict=True):
            if not answer:
                continue
            logits = _logits(model, ids + answer)
            predicted = logits[len(ids) - 1 : len(ids) - 1 + len(answer)].argmax(-1).tolist()
            agree += sum(p == t for p, t in zip(predicted, answer, strict=True))
            total += len(answer)
    return agree / total if total else None


def _figures(before: Probe, after: Probe, agreement: float | None, rtol: float) -> dict[str, Any]:
    diffs = []
    for a, b in zip(before.logits, after.logits, strict=True):
        width = min(a.shape[-1], b.shape[-1])
        diffs.append((a[:, :width] - b[:, :width]).abs().max().item())
    eos_before = sum(before.ended_with_eos) / len(before.ended_with_eos)
    eos_after = sum(after.ended_with_eos) / len(after.ended_with_eos)
    same = sum(a == b for a, b in zip(before.answers, after.answers, strict=True)) / len(before.answers)
    largest = max(a.abs().max().item() for a in before.logits)
    return {
        "max_logit_diff": max(diffs),
        "max_abs_logit": largest,
        "dtype_rtol": rtol,
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "perplexity_change": after.perplexity / before.perplexity - 1,
        "greedy_agreement": agreement,
        "exact_match": same,
        "eos_rate_before": eos_before,
        "eos_rate_after": eos_after,
        "eos_rate_drop": eos_before - eos_after,
    }


def _failures(step: str, figures: dict[str, Any], check: StepCheckConfig) -> list[str]:
    key = f"compress.{step}.check"
    rtol = figures["dtype_rtol"]
    failures = []
    if check.max_logit_diff is not None:
        limit = max(check.max_logit_diff, rtol * figures["max_abs_logit"])
        figures["max_logit_diff_limit"] = limit
        if figures["max_logit_diff"] > limit:
            failures.append(
                f"logits differ by up to {figures['max_logit_diff']:.3g} (limit {limit:.3g}: "
                f"{key}.max_logit_diff)"
            )
    change = figures["perplexity_change"]
    if check.max_perplexity_increase is not None:
        limit = max(check.max_perplexity_increase, rtol)
        figures["max_perplexity_increase_limit"] = limit
        if change > limit:
            failures.append(
                f"perplexity rose {change:.1%} (limit {limit:.1%}: {key}.max_perplexity_increase)"
            )
    agreement = figures["greedy_agreement"]
    if (
        check.min_greedy_agreement is not None
        and agreement is not None
        and agreement < check.min_greedy_agreement
    ):
        failures.append(
            f"greedy tokens agree {agreement:.0%} (limit {check.min_greedy_agreement:.0%}: "
            f"{key}.min_greedy_agreement)"
        )
    if check.max_eos_rate_drop is not None and figures["eos_rate_drop"] > check.max_eos_rate_drop + 1e-9:
        failures.append(
            f"the share of answers ending at EOS fell by {figures['eos_rate_drop']:.0%} (limit "
            f"{check.max_eos_rate_drop:.0%}: {key}.max_eos_rate_drop)"
        )
    return failures


def check_step(
    step: str,
    before: Probe,
    model: Any,
    tokenizer: Any,
    probes: ProbeSet,
    check: StepCheckConfig,
    new_tokens: int,
) -> tuple[CheckResult, Probe]:
    """Probe `model`, compare it with `before` under `check`'s limits; the result and the new probe."""
    after = probe_model(model, tokenizer, probes, new_tokens)
    rtol = _RTOL.get(_dtype(model), 0.0)
    figures = _figures(before, after, _teacher_forced_agreement(model, probes, before), rtol)
    failures = _failures(step, figures, check)
    return CheckResult(step=step, passed=not failures, figures=figures, failures=failures), after
