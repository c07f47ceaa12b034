"""Cleaning of record text: rules that rewrite the text, then filters that remove whole records.

Rules, in this order, each switched by `data.clean.<rule>` and counted in the data report (`CLEAN_RULES`):
unicode_nfkc (`unicodedata`; see below), strip_html (tags of known HTML elements, comments, script/style
blocks; entities through `html.unescape`), remove_control (control, zero-width and bidi-override
characters, BOM, soft hyphen), fold_whitespace (runs of spaces inside a line, trailing spaces, 3+
newlines; the indentation at the start of a line is kept so that code stays valid), allowed_chars (a regex
character class of what to keep). Filters, the first that applies names the removal (`CLEAN_FILTERS`):
empty, same_answers (a preference pair whose chosen and rejected answers are the same once cleaned),
min_chars, max_chars, language (lingua). A preference pair's rejected answer is cleaned like its chosen one.

unicode_nfkc in Chinese (and Japanese) text: NFKC would turn the full-width punctuation '，！：（）？；'
into ASCII ',!:()?;', and a fine-tune would learn mixed punctuation. So in a text that holds a Han
character, the full-width forms of ASCII punctuation (U+FF01-U+FF5E but the digits and letters) are kept as
they are, as Chinese data pipelines do; full-width letters and digits ('ＡＢＣ１２３' -> 'ABC123') and
everything else are still NFKC-normalised, and so is the ideographic space U+3000 (it becomes a plain
space, always: it is whitespace, not punctuation). Text without Han characters gets plain NFKC. The
comparison keys of deduplication are normalised on their own, so copies that differ only in the width of
their punctuation are still duplicates.

Why our own code for HTML: an HTML parser (BeautifulSoup, lxml, `html.parser`) reads every `<...>` as
markup, so `List<String>`, `<class 'int'>` and our own `<EMAIL>` masks would be eaten, and it costs tens of
microseconds per record. Here only known HTML element names are tags; an opening tag glued to an
identifier (`Optional<Map>`) stays unless the text also holds closing tags or comments (then it is
markup); code in Markdown backticks is never touched; and only entities closed by ';' are unescaped, so
URL queries like `?a=1&copy=2` survive (`html.unescape` alone would make that '©=2').

Speed: a record is cleaned in microseconds. Each rule has a pre-check made of `in` tests and `str`
predicates (`isascii`: NFKC leaves ASCII alone; no '<' or '&': no HTML; `isprintable`: no control
characters), so the regexes run only on text that needs them. Chinese text out of NFKC costs one search
for a character outside the ranges that NFKC leaves alone (most of it has none: it is kept as it is);
only the runs of such characters are normalised.

Language detection is lingua's, from all its languages in low-accuracy mode (built once per process, on
first use; a forked worker builds its own): a process needed about 70 MB for it, where high-accuracy mode
took about 0.9 GB and was about 4x slower. It still costs 0.1 ms (Chinese) to 0.8 ms (Latin-script text)
per record on this machine, by far the slowest step, so only the first `LANGUAGE_SAMPLE_CHARS` characters
are read. Below about 100 characters low-accuracy mode is unreliable (lingua's documentation says so
too): a short record may be kept or dropped wrongly.
"""

from __future__ import annotations

import functools
import html
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from seektune.config import CleanConfig
from seektune.data.records import record_text
from seektune.errors import UserError

CLEAN_RULES = ("unicode_nfkc", "strip_html", "remove_control", "fold_whitespace", "allowed_chars")
# Cheapest and most specific first; the language filter, the one slow step, runs on what is left.
CLEAN_FILTERS = ("empty", "same_answers", "min_chars", "max_chars", "language")
LANGUAGE_SAMPLE_CHARS = 400

_RULE_BIT = {name: 1 << index for index, name in enumerate(CLEAN_RULES)}
_RULE_NAMES_BY_MASK = tuple(
    ",".join(name for name in CLEAN_RULES if mask & _RULE_BIT[name]) for mask in range(1 << len(CLEAN_RULES))
)

# ---------------------------------------------------------------------------------------------------------
# strip_html

_HTML_ELEMENTS = frozenset((
    "a", "abbr", "acronym", "address", "area", "article", "aside", "audio", "b", "base", "bdi", "bdo",
    "big", "blockquote", "body", "br", "button", "canvas", "caption", "center", "cite", "code", "col",
    "colgroup", "data", "datalist", "dd", "del", "details", "dfn", "dialog", "dir", "div", "dl", "dt",
    "em", "embed", "fieldset", "figcaption", "figure", "font", "footer", "form", "frame", "frameset",
    "h1", "h2", "h3", "h4", "h5", "h6", "head", "header", "hgroup", "hr", "html", "i", "iframe", "img",
    "input", "ins", "kbd", "label", "legend", "li", "link", "main", "map", "mark", "marquee", "menu",
    "meta", "meter", "nav", "nobr", "noscript", "object", "ol", "optgroup", "option", "output", "p",
    "param", "picture", "pre", "progress", "q", "rp", "rt", "ruby", "s", "samp", "script", "search",
    "section", "select", "small", "source", "span", "strike", "strong", "style", "sub", "summary", "sup",
    "svg", "table", "tbody", "td", "template", "textarea", "tfoot", "th", "thead", "time", "title", "tr",
    "track", "tt", "u", "ul", "var", "video", "wbr",
))  # fmt: skip
# Elements that start a new line of text, and table cells (a space between cells).
_BLOCK_ELEMENTS = frozenset((
    "address", "article", "aside", "blockquote", "body", "br", "dd", "details", "dialog", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hgroup", "hr", "html", "li", "main", "nav", "ol", "p", "pre", "section", "summary",
    "table", "tbody", "tfoot", "thead", "title", "tr", "ul",
))  # fmt: skip
_CELL_ELEMENTS = frozenset({"td", "th"})
# Void elements that are tags even when glued to a word ("one<br>two"); no programming language has
# generic types of these names.
_ALWAYS_TAGS = frozenset({"br", "hr", "img", "wbr"})
_NAMES = "|".join(sorted(_HTML_ELEMENTS, key=len, reverse=True))
_MARKUP = re.compile(
    r"<!--.*?(?:-->|\Z)"  # comment (to the end when unclosed)
    r"|<(script|style)(?=[\s>])[^>]*>.*?(?:</\1\s*>|\Z)"  # blocks whose content is not text
    r"|<!doctype(?=[\s>])[^<>]*>|<\?xml(?=\s)[^<>]*\?>"
    rf"|</({_NAMES})\s*>"  # closing tag
    rf"|<({_NAMES})(?:\s[^<>]*)?/?>",  # opening or self-closing tag
    re.IGNORECASE | re.DOTALL,
)
_MARKUP_EVIDENCE = re.compile(rf"</(?:{_NAMES})\s*>|<!--", re.IGNORECASE)
_CODE_SPAN = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]+`)", re.DOTALL)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_ASCII_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def _replace_markup(match: re.Match[str], loose: bool) -> str:
    closing, opening = match.group(2), match.group(3)
    if opening is not None and loose:
        start = match.start()
        glued = start > 0 and match.string[start - 1] in _ASCII_WORD
        if glued and opening.lower() not in _ALWAYS_TAGS and "=" not in match.group():
            return match.group()  # a generic type such as Optional<Map>, not a tag
    name = (closing or opening or "").lower()
    if name in _BLOCK_ELEMENTS:
        return "\n"
    return " " if name in _CELL_ELEMENTS else ""


def _unescape_entity(match: re.Match[str]) -> str:
    return html.unescape(match.group())


def _strip_markup(text: str) -> str:
    if "<" in text:
        loose = _MARKUP_EVIDENCE.search(text) is None
        text = _MARKUP.sub(lambda match: _replace_markup(match, loose), text)
    if "&" in text:
        text = _ENTITY.sub(_unescape_entity, text)
    return text


def _strip_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    if "`" not in text:
        return _strip_markup(text)
    pieces = _CODE_SPAN.split(text)  # odd pieces are code spans: kept as they are
    return "".join(piece if index % 2 else _strip_markup(piece) for index, piece in enumerate(pieces))


# ---------------------------------------------------------------------------------------------------------
# remove_control, fold_whitespace, allowed_chars

# C0 and C1 controls except \t \n \r (\r is fold_whitespace's: it becomes a line end), soft hyphen,
# Mongolian vowel separator, zero-width space/joiners, LRM/RLM, bidi embeddings and isolates, word joiner
# and invisible operators, BOM.
_CONTROL = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]+"
)
_ODD_SPACE = re.compile(r"[^\S\n ]")  # whitespace other than a space or a newline
_BLANK_LINES = re.compile(r"\n{3,}")


def _remove_control(text: str) -> str:
    return text if text.isprintable() else _CONTROL.sub("", text)


def _needs_fold(text: str) -> bool:
    if "  " in text or text[-1:].isspace() or text[:1] == "\n":
        return True
    if text.isprintable():
        return False  # no whitespace but single spaces
    return " \n" in text or "\n\n\n" in text or _ODD_SPACE.search(text) is not None


def _fold_line(line: str) -> str:
    body = line.lstrip()
    if len(body) == len(line):
        return " ".join(line.split())
    return line[: len(line) - len(body)] + " ".join(body.split()) if body else ""


def _fold_whitespace(text: str) -> str:
    if not _needs_fold(text):
        return text
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join([_fold_line(line) for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


def _nfkc(text: str) -> str:
    """NFKC, computed as NFC of NFKD (the same by definition): for Chinese text CPython's NFKC takes about
    ten times as long as the two steps together."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKD", text))


# Han ideographs: CJK unified (basic, extension A, extensions B and later) and compatibility ideographs.
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
# Kept in text with Han characters: the full-width forms of ASCII punctuation (U+FF01-U+FF5E but the
# digits and letters: ，！：（）？；～ ...) and the ellipsis '…' (NFKC: '...'; Chinese writes '……').
_KEPT_PUNCTUATION_RANGES = (
    (0xFF01, 0xFF0F),
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF5E),
    (0x2026, 0x2026),
)
_KEPT_PUNCTUATION = frozenset(
    chr(code) for low, high in _KEPT_PUNCTUATION_RANGES for code in range(low, high + 1)
)
_KEPT_PUNCTUATION_CLASS = "".join(f"{chr(low)}-{chr(high)}" for low, high in _KEPT_PUNCTUATION_RANGES)
# A character that NFKC may change, outside the kept punctuation. Not one: characters that NFKC leaves as
# they are whatever surrounds them (none decomposes, combines or is combined with): ASCII, Han, kana, CJK
# and general punctuation. Most Chinese text has none: one search finds that. (A search for the class
# alone scans several times faster than for runs of it, `[...]+`: the runs are read only when needed.)
_UNSTABLE_IN_HAN_TEXT = re.compile(
    "[^\x00-\x7f\u00b7\u2010\u2012-\u2016\u2018-\u2023\u2027-\u202e\u2030-\u2032\u2035"
    "\u3001-\u3029\u3030-\u3035\u3037\u303b-\u303f\u3041-\u3096\u30a0-\u30fe\u3400-\u4dbf"
    f"\u4e00-\u9fff{_KEPT_PUNCTUATION_CLASS}]"
)
_UNSTABLE_RUN_IN_HAN_TEXT = re.compile(_UNSTABLE_IN_HAN_TEXT.pattern + "+")


def _normalize_unicode(text: str) -> str:
    """NFKC of a text that is not in NFKC, but for the kept punctuation when the text holds Han
    characters (the text itself when that leaves nothing to change)."""
    if _HAN.search(text) is None:
        return _nfkc(text)
    first = _UNSTABLE_IN_HAN_TEXT.search(text)
    if first is None:
        return text
    pieces, position = [], 0
    for run in _UNSTABLE_RUN_IN_HAN_TEXT.finditer(text, first.start()):
        start, end = run.span()
        if start > position and text[start - 1] not in _KEPT_PUNCTUATION:
            start -= 1  # the character a combining mark of the run may compose with ('e' + U+0301)
        pieces += (text[position:start], _nfkc(text[start:end]))
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


@functools.lru_cache(maxsize=16)
def _disallowed_chars(class_body: str) -> re.Pattern[str]:
    return re.compile(f"[^{class_body}]+")


# ---------------------------------------------------------------------------------------------------------
# The rules together


@dataclass(frozen=True)
class _Plan:
    """The rules of a CleanConfig, resolved once per config."""

    nfkc: bool
    html: bool
    control: bool
    fold: bool
    disallowed: re.Pattern[str] | None


@functools.lru_cache(maxsize=16)
def _make_plan(nfkc: bool, html_: bool, control: bool, fold: bool, allowed_chars: str | None) -> _Plan:
    disallowed = _disallowed_chars(allowed_chars) if allowed_chars is not None else None
    return _Plan(nfkc, html_, control, fold, disallowed)


def _plan(cfg: CleanConfig) -> _Plan:
    return _make_plan(
        cfg.unicode_nfkc, cfg.strip_html, cfg.remove_control, cfg.fold_whitespace, cfg.allowed_chars
    )


def _clean(text: str, plan: _Plan) -> tuple[str, int]:
    """The cleaned text and the bit mask of the rules that changed it."""
    changed = 0
    if plan.nfkc and not text.isascii() and not unicodedata.is_normalized("NFKC", text):
        new = _normalize_unicode(text)
        if new != text:
            text, changed = new, _RULE_BIT["unicode_nfkc"]
    if plan.html:
        new = _strip_html(text)
        if new != text:
            text, changed = new, changed | _RULE_BIT["strip_html"]
    if plan.control:
        new = _remove_control(text)
        if len(new) != len(text):
            text, changed = new, changed | _RULE_BIT["remove_control"]
    if plan.fold:
        new = _fold_whitespace(text)
        if new != text:
            text, changed = new, changed | _RULE_BIT["fold_whitespace"]
    if plan.disallowed is not None:
        new = plan.disallowed.sub("", text)
        if len(new) != len(text):
            text, changed = _fold_whitespace(new) if plan.fold else new, changed | _RULE_BIT["allowed_chars"]
    return text, changed


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, list[str]]:
    """`text` after the cleaning rules of `cfg`, and the names of the rules that changed it."""
    if not cfg.enabled:
        return text, []
    cleaned, mask = _clean(text, _plan(cfg))
    return cleaned, [name for name in CLEAN_RULES if mask & _RULE_BIT[name]]


# ---------------------------------------------------------------------------------------------------------
# Language


@functools.lru_cache(maxsize=8)
def _allowed_languages(codes: tuple[str, ...]) -> frozenset[Any]:
    from lingua import IsoCode639_1, Language

    languages = set()
    for code in codes:
        try:
            languages.add(Language.from_iso_code_639_1(IsoCode639_1.from_str(code.strip().lower())))
        except ValueError:
            raise UserError(
                f"data.clean.languages: {code!r} is not an ISO 639-1 language code that lingua knows; "
                "use two-letter codes such as zh, en, fr, de, ja"
            ) from None
    return frozenset(languages)


_DETECTOR: dict[int, Any] = {}  # process id -> detector (each worker process builds its own)


def _language_detector() -> Any:
    pid = os.getpid()
    if pid not in _DETECTOR:
        from lingua import LanguageDetectorBuilder

        _DETECTOR.clear()
        _DETECTOR[pid] = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()
    return _DETECTOR[pid]


def language_confidence(text: str, languages: frozenset[Any]) -> float:
    """lingua's summed confidence (0..1) that `text` is in one of `languages`."""
    values = _language_detector().compute_language_confidence_values(text[:LANGUAGE_SAMPLE_CHARS])
    return sum(value.value for value in values if value.language in languages)


# ---------------------------------------------------------------------------------------------------------
# Records and batches


def _clean_record(messages: list | None, text: str | None, plan: _Plan) -> tuple[list, str, int]:
    mask = 0
    cleaned_messages = []
    for message in messages or ():
        content = message["content"]
        cleaned, bits = _clean(content, plan) if content else ("", 0)
        mask |= bits
        cleaned_messages.append(message if cleaned is content else {**message, "content": cleaned})
    if text:
        text, bits = _clean(text, plan)
        mask |= bits
    return cleaned_messages, text or "", mask


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _pair_removal_reason(messages: list, rejected: str) -> str:
    """Why a cleaned preference pair goes: its rejected answer is blank, or the same as the chosen one."""
    if _is_blank(rejected):
        return "empty"
    return "same_answers" if rejected.strip() == messages[-1]["content"].strip() else ""


def _removal_reason(messages: list, text: str, cfg: CleanConfig) -> str:
    """The first filter that removes this (cleaned) record, "" when it is kept; the language aside."""
    if messages:
        length = len(messages) - 1  # the newlines record_text puts between the messages
        any_text, answers, blank_answers = False, 0, 0
        for message in messages:
            content = message["content"]
            length += len(content)
            blank = _is_blank(content)
            any_text = any_text or not blank
            if message["role"] == "assistant":
                answers += 1
                blank_answers += blank
        if not any_text or (answers and blank_answers == answers):
            return "empty"
    elif _is_blank(text):
        return "empty"
    else:
        length = len(text)
    if length < cfg.min_chars:
        return "min_chars"
    if cfg.max_chars is not None and length > cfg.max_chars:
        return "max_chars"
    return ""


def _join_names(existing: str, names: str) -> str:
    return f"{existing},{names}" if existing and names else existing or names


def clean_batch(batch: dict[str, list], cfg: CleanConfig) -> dict[str, list]:
    """Clean every message content and `text` of a column batch and mark removed records.

    Adds (or extends) the columns `changed_by` (comma-joined names of the rules that changed the record,
    "" when none) and `removed_by` ("" or the first of CLEAN_FILTERS that removes it). With
    `cfg.enabled` False the batch passes unchanged but for those two columns.
    """
    n_rows = len(next(iter(batch.values()), []))
    changed_by = list(batch.get("changed_by") or [""] * n_rows)
    removed_by = list(batch.get("removed_by") or [""] * n_rows)
    out = dict(batch)
    if cfg.enabled:
        plan = _plan(cfg)
        languages = _allowed_languages(tuple(cfg.languages)) if cfg.languages else None
        all_messages = batch.get("messages") or [None] * n_rows
        texts = batch.get("text") or [""] * n_rows
        all_rejected = batch.get("rejected") or [""] * n_rows
        new_messages, new_texts, new_rejected = [], [], []
        for row in range(n_rows):
            messages, text, mask = _clean_record(all_messages[row], texts[row], plan)
            rejected, rejected_mask = _clean(all_rejected[row], plan) if all_rejected[row] else ("", 0)
            mask |= rejected_mask
            new_messages.append(messages)
            new_texts.append(text)
            new_rejected.append(rejected)
            if mask:
                changed_by[row] = _join_names(changed_by[row], _RULE_NAMES_BY_MASK[mask])
            if not removed_by[row]:
                removed_by[row] = _removal_reason(messages, text, cfg)
            if not removed_by[row] and all_rejected[row]:
                removed_by[row] = _pair_removal_reason(messages, rejected)
            if languages and not removed_by[row]:
                whole = record_text({"messages": messages, "text": text})
                if language_confidence(whole, languages) < cfg.language_min_confidence:
                    removed_by[row] = "language"
        if "messages" in batch:
            out["messages"] = new_messages
        if "text" in batch:
            out["text"] = new_texts
        if "rejected" in batch:
            out["rejected"] = new_rejected
    out.update(changed_by=changed_by, removed_by=removed_by)
    return out
