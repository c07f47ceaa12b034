"""Task metrics of one model on the test split: perplexity, ROUGE-L, and whether answers stop by themselves.

Perplexity is the exponent of the mean negative log-likelihood of the answer tokens (the labels that are not
-100, end-of-sentence included), so it measures exactly what training optimises. ROUGE-L comes from
`rouge-score`. Answers are generated in left-padded batches with transformers' `generate`; `eos_rate` is the
share of answers that produced the end-of-sentence token before `max_new_tokens`, the check that a tuned
model has learnt to stop.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from seektune.config import EvalConfig
from seektune.data.prepare import IGNORE_INDEX, PreparedData, last_exchange, prompt_text
from seektune.logs import log_event, progress

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """One generated answer."""

    text: str
    new_tokens: int
    ended_with_eos: bool


@torch.no_grad()
def perplexity(model: Any, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> float:
    """exp(mean NLL) over every label token of `rows` (right-padded batches)."""
    total_nll, total_tokens = 0.0, 0
    with progress("perplexity", total=len(rows)) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            nll, tokens = _batch_nll(model, batch, pad_id)
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
            bar.advance(len(batch))
    return math.exp(total_nll / max(total_tokens, 1))


def _batch_nll(model: Any, batch: list[dict[str, list[int]]], pad_id: int) -> tuple[float, int]:
    """Summed NLL of the label tokens of one batch, and how many there are."""
    device = next(model.parameters()).device
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    targets = labels[:, 1:].to(device)  # position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll.item(), int((targets != IGNORE_INDEX).sum())


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalConfig) -> list[Generation]:
    """Answers to rendered prompts, in left-padded batches."""
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
        if cfg.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    results: list[Generation] = []
    try:
        with progress("generating answers", total=len(prompts)) as bar:
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start : start + cfg.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    results.append(_decode(row, tokenizer, stop_ids))
                bar.advance(len(chunk))
    finally:
        tokenizer.padding_side = previous_side
    return results


def _decode(new_ids: list[int], tokenizer: Any, stop_ids: list[int]) -> Generation:
    end = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generation(text=text, new_tokens=len(kept) + (end is not None), ended_with_eos=end is not None)


# CJK ideographs, kana and hangul: scored one character per token, as Chinese ROUGE usually is.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")


class _MixedTokenizer:
    """rouge-score's own tokenizer (lower case, Porter stemming) for Latin text, one token per CJK character.

    rouge-score's default tokenizer drops every non-ASCII character, which would score Chinese answers 0.
    """

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self._latin = DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for piece in _CJK.split(text):
            if _CJK.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                tokens.extend(self._latin.tokenize(piece))
        return tokens


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score; stemmed English words, single CJK characters)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MixedTokenizer())
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    cfg: EvalConfig,
    system_prompt: str | None = None,
    label: str = "model",
) -> tuple[dict[str, float], list[Generation]]:
    """Scores of `model` on the test split and its generated answers (conversations only).

    Perplexity covers every test row; answers are generated for the conversations among them (documents
    of continued pre-training have no question to answer).
    """
    limit = min(len(data.records["test"]), cfg.max_samples or len(data.records["test"]))
    rows = list(data.tokenized["test"].select(range(limit)))
    records = [r for r in data.records["test"].select(range(limit)) if r["messages"]]
    if not rows:
        return {"n": 0}, []
    model.eval()
    started = time.perf_counter()
    scores: dict[str, float] = {"n": len(rows)}
    if "perplexity" in cfg.metrics:
        scores["perplexity"] = round(perplexity(model, rows, cfg.batch_size, tokenizer.pad_token_id), 4)
    if not records:
        log_event(logger, f"{label} evaluated", **scores, seconds=round(time.perf_counter() - started, 2))
        return scores, []
    prompts = [prompt_text(r["messages"], tokenizer, system_prompt) for r in records]
    generations = generate_answers(model, tokenizer, prompts, cfg)
    if "rouge_l" in cfg.metrics:
        references = [last_exchange(r["messages"])[2] for r in records]
        scores["rouge_l"] = round(rouge_l([g.text for g in generations], references), 4)
    scores["eos_rate"] = round(sum(g.ended_with_eos for g in generations) / len(generations), 4)
    scores["mean_new_tokens"] = round(sum(g.new_tokens for g in generations) / len(generations), 2)
    log_event(logger, f"{label} evaluated", **scores, seconds=round(time.perf_counter() - started, 2))
    return scores, generations
