"""Reproducible augmentation of training records: word edits (EDA), paragraph reordering, back-translation.

`augment_dataset` takes the TRAINING split only and returns only the new records; the caller appends them
to the training split, so an augmented copy can never reach validation or test. A share `cfg.share` of the
records (chosen with NumPy's generator from the seed) gets `cfg.copies` copies each, the method of each copy
taken in turn from `cfg.methods`. Every copy draws its random choices from its own `random.Random` keyed by
(seed, record index, copy number), so the result does not depend on batch sizes or worker processes. A copy
that comes out identical to its original is not emitted.

Word operations follow EDA (Wei & Zou, 2019: synonym replacement, random insertion, swap and deletion). No
library covers them for mixed Chinese/English chat data (nlpaug and textattack are English-only, heavy and
not installed), hence our own code. Words are found by a regex for English and by jieba for runs of Chinese
characters. Everything between two words (spaces, punctuation, newlines) is kept where it was, which is
what "rejoin with spaces for English, without for Chinese" means here: an inserted word gets a space next
to an English word and none between two Chinese words. Code is protected: fenced blocks, `inline code` and
URLs are never edited, tokens such as `os.path`, `snake_case` or `f(x)` are not words, and a message that
still looks like code (a high share of code symbols) is skipped entirely.

Back-translation uses encoder-decoder translation models only (AutoModelForSeq2SeqLM, e.g. the Marian
`Helsinki-NLP/opus-mt-*` pairs), batched greedy decoding, line by line. A decoder-only model would need a
prompt naming the pivot language, which the config does not have; such a model is refused with a UserError.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jieba
import numpy as np
from datasets import Dataset, concatenate_datasets

from seektune.config import AugmentConfig
from seektune.data.records import COLUMNS, RECORD_FEATURES, batch_rows, rows_batch
from seektune.errors import UserError
from seektune.logs import log_event

logger = logging.getLogger(__name__)
jieba.setLogLevel(logging.WARNING)  # jieba logs "Building prefix dict ..." at DEBUG through its own handler

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_CODE_NEIGHBOUR = r"A-Za-z0-9_\-/\\@#$%&*+=<>`"  # a word touching one of these is part of code or a name
_ENGLISH_WORD = (
    rf"(?<![{_CODE_NEIGHBOUR}.])(?<![A-Za-z0-9_]\()"  # not after code, a dot or a call's "name("
    rf"[A-Za-z]+(?:'[A-Za-z]+)*"
    rf"(?![{_CODE_NEIGHBOUR}(\[]|\.[A-Za-z0-9_])"  # not before code, a call, an index or ".attr"
)
# fenced and inline code, URLs, calls and indexing with their arguments: "f(a, b)", "d[key]"
_CODE_SPAN = (
    r"```.*?(?:```|\Z)|`[^`\n]*`|[A-Za-z][A-Za-z0-9+.-]*://\S+"
    r"|[A-Za-z_][A-Za-z0-9_.]*(?:\([^()\n]*\)|\[[^\[\]\n]*\])"
)
_TOKEN_RE = re.compile(rf"(?P<code>{_CODE_SPAN})|(?P<en>{_ENGLISH_WORD})|(?P<zh>[{_CJK}]+)", re.S)
_CODE_SPAN_RE = re.compile(_CODE_SPAN, re.S)
_CODE_SYMBOLS = "{}[]();=<>_\\|&$^~"  # not * # / + -, which Markdown and prose use
_SYMBOL_RUN_RE = re.compile(r"([^\w\s])\1+")  # "=====" under a heading counts once
_CODE_SYMBOL_SHARE = 0.1  # prose stays well below (a few brackets); code lines are usually above
_PARAGRAPH_SPLIT = re.compile(r"(\n[ \t]*\n\s*)")
_SENTENCE_SPLIT = re.compile(r"((?<=[.!?])\s+|(?<=[。！？])\s*)")
_SYNONYMS_HELP = "give a JSON file {word: [synonyms]} or a text file of lines 'word syn1 syn2'"


# ---------------------------------------------------------------------------------------------------------
# Words of a text


def _split_words(text: str) -> tuple[list[str], list[str]]:
    """(gaps, words) with text == gaps[0] + words[0] + gaps[1] + ... + words[-1] + gaps[-1]."""
    gaps: list[str] = []
    words: list[str] = []
    last = 0
    for match in _TOKEN_RE.finditer(text):
        if match.lastgroup == "code":
            continue  # stays inside the gap before the next word
        pieces = [match.group()] if match.lastgroup == "en" else jieba.lcut(match.group())
        gaps.append(text[last : match.start()])
        gaps.extend([""] * (len(pieces) - 1))
        words.extend(pieces)
        last = match.end()
    gaps.append(text[last:])
    return gaps, words


def _join_words(gaps: list[str], words: list[str]) -> str:
    return "".join(gap + word for gap, word in zip(gaps, words, strict=False)) + gaps[-1]


def _n_changes(n_words: int, rate: float) -> int:
    return max(1, int(rate * n_words))


def _is_cjk(char: str) -> bool:
    return bool(_CJK_RE.match(char))


def _separator(left: str, right: str) -> str:
    """What goes between two adjacent words: nothing between Chinese words, else a space."""
    return "" if _is_cjk(left[-1]) and _is_cjk(right[0]) else " "


def _match_case(new: str, old: str) -> str:
    if len(old) > 1 and old.isupper() and new.islower():
        return new.upper()
    if old[:1].isupper() and new[:1].islower():
        return new[:1].upper() + new[1:]
    return new


def _synonyms_of(word: str, synonyms: Mapping[str, Sequence[str]]) -> list[str]:
    options = synonyms.get(word.lower(), ())
    return [s for s in options if s.lower() != word.lower()]


def looks_like_code(text: str) -> bool:
    """True when `text` outside fenced/inline code has a high share of code symbols ({}();= ...)."""
    prose = _CODE_SPAN_RE.sub("", text) if "`" in text else text
    prose = _SYMBOL_RUN_RE.sub(r"\1", prose)
    visible = len(prose) - prose.count(" ") - prose.count("\n")
    if visible == 0:
        return False
    symbols = sum(prose.count(symbol) for symbol in _CODE_SYMBOLS)
    return symbols / visible >= _CODE_SYMBOL_SHARE


# ---------------------------------------------------------------------------------------------------------
# Single-text operations


def synonym_replace(text: str, synonyms: Mapping[str, Sequence[str]], rate: float, rng: random.Random) -> str:
    """Replace max(1, int(rate * words)) words that have synonyms by a random synonym (case kept)."""
    gaps, words = _split_words(text)
    candidates = [i for i, word in enumerate(words) if _synonyms_of(word, synonyms)]
    if not candidates:
        return text
    for i in rng.sample(candidates, min(len(candidates), _n_changes(len(words), rate))):
        words[i] = _match_case(rng.choice(_synonyms_of(words[i], synonyms)), words[i])
    return _join_words(gaps, words)


def random_swap(text: str, rate: float, rng: random.Random) -> str:
    """Swap two random words, max(1, int(rate * words)) times; punctuation stays in place."""
    gaps, words = _split_words(text)
    if len(words) < 2:
        return text
    for _ in range(_n_changes(len(words), rate)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return _join_words(gaps, words)


def random_delete(text: str, rate: float, rng: random.Random) -> str:
    """Delete each word with probability `rate` (at least one word stays; a one-word text is kept)."""
    gaps, words = _split_words(text)
    if len(words) < 2:
        return text
    keep = [rng.random() >= rate for _ in words]
    if not any(keep):
        keep[rng.randrange(len(words))] = True
    new_gaps, new_words = [gaps[0]], []
    for word, gap_after, kept in zip(words, gaps[1:], keep, strict=True):
        if kept:
            new_words.append(word)
            new_gaps.append(gap_after)
        else:
            new_gaps[-1] = _merge_gaps(new_gaps[-1], gap_after)
    return _join_words(new_gaps, new_words)


def _merge_gaps(before: str, after: str) -> str:
    """The gap left where a word was deleted between `before` and `after`."""
    before_blank, after_blank = not before.strip(), not after.strip()
    if before_blank and after_blank:  # keep the line break if there is one, else the shorter space
        if "\n" in before + after:
            return before if before.count("\n") >= after.count("\n") else after
        return before if len(before) <= len(after) else after
    if after_blank:  # "Hello, big world" -> "Hello, world"
        return before if after else before.rstrip(" ")
    if before_blank:  # "a big." -> "a."
        return after
    return before.rstrip(" ") + after


def random_insert(
    text: str,
    synonyms_or_vocab: Mapping[str, Sequence[str]] | Sequence[str] | None,
    rate: float,
    rng: random.Random,
) -> str:
    """Insert max(1, int(rate * words)) words at random positions.

    With a synonym dictionary the inserted word is a synonym of a word of the text (EDA); with a list, a
    word of that vocabulary; with neither (or no word of the text in the dictionary), a word of the text.
    """
    gaps, words = _split_words(text)
    if not words:
        return text
    for _ in range(_n_changes(len(words), rate)):
        new = _word_to_insert(words, synonyms_or_vocab, rng)
        position = rng.randint(0, len(words))
        if position < len(words):
            sep = _separator(new, words[position])
            words.insert(position, new)
            gaps.insert(position + 1, sep)
        else:
            sep = _separator(words[-1], new)
            words.append(new)
            gaps.insert(len(gaps) - 1, sep)
    return _join_words(gaps, words)


def _word_to_insert(
    words: list[str],
    synonyms_or_vocab: Mapping[str, Sequence[str]] | Sequence[str] | None,
    rng: random.Random,
) -> str:
    if isinstance(synonyms_or_vocab, Mapping):
        candidates = [word for word in words if _synonyms_of(word, synonyms_or_vocab)]
        if candidates:
            return rng.choice(_synonyms_of(rng.choice(candidates), synonyms_or_vocab))
    elif synonyms_or_vocab:
        return rng.choice(list(synonyms_or_vocab))
    return rng.choice(words)


def reorder_paragraphs(text: str, rng: random.Random) -> str:
    """Shuffle blank-line-separated paragraphs (2+), else sentences; separators stay where they were.

    A text with a code fence, or with a single sentence, is returned unchanged.
    """
    if "```" in text:
        return text
    core = text.strip()
    if not core:
        return text
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    for splitter in (_PARAGRAPH_SPLIT, _SENTENCE_SPLIT):
        reordered = _shuffle_units(splitter.split(core), rng)
        if reordered is not None:
            return lead + reordered + trail
    return text


def _shuffle_units(parts: list[str], rng: random.Random) -> str | None:
    """`parts` = unit, separator, unit, ...: the units in a new order, or None for fewer than two."""
    units, seps = parts[0::2], parts[1::2]
    tail = ""
    if len(units) > 1 and not units[-1]:  # a split right at the end ("A。B。")
        units.pop()
        tail = seps.pop()
    if len(units) < 2:
        return None
    order = list(range(len(units)))
    rng.shuffle(order)
    if order == sorted(order):  # never hand back the original order
        order = order[1:] + order[:1]
    return "".join(units[i] + sep for i, sep in zip(order, [*seps, tail], strict=True))


# ---------------------------------------------------------------------------------------------------------
# Back-translation


@dataclass
class Translator:
    """A loaded encoder-decoder translation model, its tokenizer and the longest input it takes."""

    model: Any
    tokenizer: Any
    max_input_tokens: int


def load_translator(name_or_path: str, config_key: str = "data.augment.translation_model") -> Translator:
    """Load a seq2seq translation model (Hub id or local directory) on the GPU if there is one, else CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        if not getattr(config, "is_encoder_decoder", False):
            raise UserError(
                f"{config_key}: {name_or_path!r} is not an encoder-decoder model; back-translation needs a "
                "translation model such as Helsinki-NLP/opus-mt-zh-en"
            )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{config_key}: cannot load {name_or_path!r} ({reason}): give a Hub id of a translation model "
            "or a local directory holding its config, weights and tokenizer"
        ) from None
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length, 512]
    return Translator(
        model, tokenizer, min(limit for limit in limits if isinstance(limit, int) and limit > 0)
    )


def translate(texts: list[str], translator: Translator, batch_size: int = 16) -> list[str]:
    """Greedy translations of `texts` (empty texts stay empty), batched by length."""
    import torch

    results = [""] * len(texts)
    order = sorted((i for i, text in enumerate(texts) if text.strip()), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        encoded = translator.tokenizer(
            [texts[i] for i in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=translator.max_input_tokens,
            return_token_type_ids=False,
        ).to(translator.model.device)
        longest = encoded["input_ids"].shape[1]
        with torch.inference_mode():
            generated = translator.model.generate(
                **encoded,
                do_sample=False,
                num_beams=1,
                max_new_tokens=min(2 * longest + 8, translator.max_input_tokens),
            )
        decoded = translator.tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, translation in zip(batch, decoded, strict=True):
            results[i] = translation.strip()
    return results


def back_translate(
    texts: list[str],
    forward_model: Translator | str,
    backward_model: Translator | str,
    *,
    batch_size: int = 16,
) -> list[str]:
    """Each text translated to the pivot language and back, line by line (indentation and blank lines kept).

    A text where some line comes back empty is returned unchanged.
    """
    forward = forward_model if isinstance(forward_model, Translator) else load_translator(forward_model)
    backward = (
        backward_model
        if isinstance(backward_model, Translator)
        else load_translator(backward_model, "data.augment.back_translation_model")
    )
    lines_per_text = [text.split("\n") for text in texts]
    units = [line.strip() for lines in lines_per_text for line in lines if line.strip()]
    returned = iter(translate(translate(units, forward, batch_size), backward, batch_size))
    results = []
    for text, lines in zip(texts, lines_per_text, strict=True):
        new_lines = [
            line[: len(line) - len(line.lstrip())] + next(returned) if line.strip() else line
            for line in lines
        ]
        complete = all(new.strip() for new, old in zip(new_lines, lines, strict=True) if old.strip())
        results.append("\n".join(new_lines) if complete else text)
    return results


# ---------------------------------------------------------------------------------------------------------
# Synonym dictionaries


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Read a synonym dictionary: JSON {word: [synonyms]} or text lines 'word syn1 syn2' ('#' comments).

    Keys are lower-cased (English lookups ignore case).
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.augment.synonyms: {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise UserError(
            f"data.augment.synonyms: cannot read {path} ({exc.strerror or exc}): {_SYNONYMS_HELP}"
        ) from None
    if path.suffix.lower() == ".json" or raw.lstrip().startswith("{"):
        table = _json_synonyms(raw, path)
    else:
        table = _line_synonyms(raw, path)
    if not table:
        raise UserError(f"data.augment.synonyms: {path} holds no synonyms: {_SYNONYMS_HELP}")
    return table


def _json_synonyms(raw: str, path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"data.augment.synonyms: {path} is not valid JSON (line {exc.lineno}: {exc.msg}): "
            + _SYNONYMS_HELP
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"data.augment.synonyms: {path} must hold a JSON object: {_SYNONYMS_HELP}")
    table: dict[str, list[str]] = {}
    for word, synonyms in data.items():
        if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
            raise UserError(
                f"data.augment.synonyms: {path}: the synonyms of {word!r} must be a list of strings"
            )
        _add_synonyms(table, word, synonyms)
    return table


def _line_synonyms(raw: str, path: Path) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise UserError(
                f"data.augment.synonyms: {path} line {number} has a word without synonyms: {_SYNONYMS_HELP}"
            )
        _add_synonyms(table, fields[0], fields[1:])
    return table


def _add_synonyms(table: dict[str, list[str]], word: str, synonyms: list[str]) -> None:
    known = table.setdefault(word.lower(), [])
    known.extend(s for s in synonyms if s and s not in known)


# ---------------------------------------------------------------------------------------------------------
# Records and datasets


@dataclass(frozen=True)
class _Plan:
    """What every augmented copy needs to know, handed to the `Dataset.map` workers."""

    seed: int
    copies: int
    methods: tuple[str, ...]
    rate: float
    apply_to: str
    synonyms: dict[str, list[str]] | None


def _change_record(
    row: dict[str, Any], method: str, change: Callable[[str], str], apply_to: str
) -> dict[str, Any] | None:
    """`row` with `change` applied to the chosen messages (or its text), marked; None when nothing changed."""
    if row["messages"]:
        messages = [
            {**message, "content": change(message["content"])}
            if apply_to in ("all", message["role"]) and not looks_like_code(message["content"])
            else message
            for message in row["messages"]
        ]
        if messages == row["messages"]:
            return None
        changed = {**row, "messages": messages}
    else:
        if not row["text"] or looks_like_code(row["text"]):
            return None
        text = change(row["text"])
        if text == row["text"]:
            return None
        changed = {**row, "text": text}
    changed.update(split="train", augmented=method, origin=f"{row['origin']}+{method}")
    return changed


def _word_method(method: str, plan: _Plan, rng: random.Random) -> Callable[[str], str]:
    if method == "synonym":
        if not plan.synonyms:
            raise UserError("method 'synonym' needs data.augment.synonyms: a synonym dictionary file")
        synonyms = plan.synonyms
        return lambda text: synonym_replace(text, synonyms, plan.rate, rng)
    if method == "swap":
        return lambda text: random_swap(text, plan.rate, rng)
    if method == "delete":
        return lambda text: random_delete(text, plan.rate, rng)
    if method == "insert":
        return lambda text: random_insert(text, plan.synonyms, plan.rate, rng)
    if method == "reorder":
        return lambda text: reorder_paragraphs(text, rng)
    raise ValueError(f"unknown word-level augmentation {method!r}")


def _augment_batch(
    batch: dict[str, list], positions: list[int], *, origins: np.ndarray, plan: _Plan
) -> dict[str, list]:
    """Augmented copies of a batch of the repeated selection (back-translation rows are left out)."""
    out: dict[str, list] = {column: [] for column in COLUMNS}
    for row, position in zip(batch_rows(batch), positions, strict=True):
        method = plan.methods[position % len(plan.methods)]
        if method == "back_translation":
            continue
        rng = random.Random(f"{plan.seed}:{int(origins[position])}:{position % plan.copies}")
        changed = _change_record(row, method, _word_method(method, plan, rng), plan.apply_to)
        if changed is not None:
            for column in COLUMNS:
                out[column].append(changed[column])
    return out


def _back_translated(rows: list[dict[str, Any]], cfg: AugmentConfig) -> list[dict[str, Any]]:
    """Back-translated copies of `rows` (texts gathered first so that the models see full batches)."""
    if not (cfg.translation_model and cfg.back_translation_model):
        raise UserError(
            "method 'back_translation' needs data.augment.translation_model and "
            "data.augment.back_translation_model"
        )
    texts: list[str] = []

    def collect(text: str) -> str:
        texts.append(text)
        return text

    for row in rows:
        _change_record(row, "back_translation", collect, cfg.apply_to)
    forward = load_translator(cfg.translation_model)
    backward = load_translator(cfg.back_translation_model, "data.augment.back_translation_model")
    returned = iter(back_translate(texts, forward, backward))
    changed = (
        _change_record(row, "back_translation", lambda _: next(returned), cfg.apply_to) for row in rows
    )
    return [row for row in changed if row is not None]


def augment_dataset(train: Dataset, cfg: AugmentConfig, seed: int, *, num_proc: int | None = None) -> Dataset:
    """Only the new augmented records of the training records `train` (empty when augmentation is off).

    Each copy has `augmented` = its method, `split` = 'train' and `origin` = original origin + '+method'.
    Word methods run in `Dataset.map` (`num_proc` workers for 1000+ copies per worker); back-translation
    runs in this process, batched through the models.
    """
    if not cfg.enabled or len(train) == 0:
        return Dataset.from_dict(rows_batch([], COLUMNS), features=RECORD_FEATURES)
    splits = set(train.with_format("arrow")["split"].unique().to_pylist())
    if not splits <= {"train", ""}:
        raise ValueError(f"augment_dataset takes training records only, got splits {sorted(splits)}")
    size = max(1, round(cfg.share * len(train)))
    chosen = np.sort(np.random.default_rng(seed).choice(len(train), size=size, replace=False))
    origins = np.repeat(chosen, cfg.copies)  # position in the repeated selection -> index in `train`
    selected = train.select(origins)
    plan = _Plan(
        seed=seed,
        copies=cfg.copies,
        methods=tuple(cfg.methods),
        rate=cfg.rate,
        apply_to=cfg.apply_to,
        synonyms=load_synonyms(cfg.synonyms) if cfg.synonyms else None,
    )
    parts = []
    if any(method != "back_translation" for method in plan.methods):
        parts.append(_word_augmented(selected, origins, plan, num_proc))
    if "back_translation" in plan.methods:
        methods = plan.methods
        positions = [j for j in range(len(selected)) if methods[j % len(methods)] == "back_translation"]
        rows = _back_translated(selected.select(positions).to_list(), cfg)
        parts.append(Dataset.from_dict(rows_batch(rows, COLUMNS), features=RECORD_FEATURES))
    augmented = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    counts = augmented.with_format("arrow")["augmented"].value_counts().to_pylist()
    by_method = {entry["values"]: entry["counts"] for entry in counts}
    log_event(logger, "augmented", chosen=len(chosen), added=len(augmented), by_method=by_method)
    return augmented


def _word_augmented(selected: Dataset, origins: np.ndarray, plan: _Plan, num_proc: int | None) -> Dataset:
    return selected.map(
        _augment_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"origins": origins, "plan": plan},
        remove_columns=selected.column_names,
        features=RECORD_FEATURES,
        num_proc=num_proc if num_proc and len(selected) >= 1000 * num_proc else None,
        desc="augmenting",
    )
