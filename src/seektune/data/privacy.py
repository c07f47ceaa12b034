"""Detection and masking of personal and secret data: e-mail addresses, phone numbers, Chinese resident ID
numbers, bank card numbers, IP addresses, and API keys, tokens and passwords.

Each find is replaced by its mask (`<EMAIL>`, `<PHONE>`, ...), or, with `data.privacy.action: drop`, the
record is marked for removal. A record's message contents, `text`, `label` and the values of its
`metadata` JSON are searched (all of them end up in the prepared data).

Why our own code: the libraries that do this (Presidio, scrubadub) need a spaCy model, are English-centred
(no Chinese ID or mobile numbers) and cost milliseconds per record; this step runs over millions of
records at a few microseconds each. Every detector is a precompiled regex plus a validator where the shape
alone says too little (ID birth date and ISO 7064 checksum, Luhn and issuer prefix of cards, `ipaddress`
for IPv6), behind cheap pre-checks that skip it when the characters it needs are absent (no '@': no
e-mail; no 7 digits in a row, no two groups of 4 digits and no '+' before a digit: no phone, ID or card
number; ...). The Python regex engine costs tens of nanoseconds per character it scans, so a record
without PII is only looked at by `in` tests on its text and on a one-pass byte-level sketch of it, once
for the whole record (its messages, text, label and metadata JSON joined).

Overlaps: detectors run in the order secret, email, id_card, bank_card, phone, ip, and a find that
overlaps an earlier one is dropped: '13812345678@qq.com' is one e-mail, a valid 18-digit ID number is an
ID and not a card, digits inside a token belong to the token.

Judgement calls (each has a test):
- `key = value` secrets keep the key name and mask the value (8+ characters). An unquoted value that reads
  as code, not as a literal - a call or subscript (`form.get("password")`, `os.environ["KEY"]`), a dotted
  name (`settings.SECRET_KEY`), a `${VAR}` reference or a `<placeholder>` - is left alone; names that only
  contain a key word (`password_field`, `max_tokens`) are not keys.
- Bank cards must pass Luhn and start with a card issuer prefix (2221-2720, 3, 4, 5, 6, 81): Luhn alone
  passes one random number in ten, e.g. millisecond timestamps (they start with 1) and date-led order
  numbers (20xx...).
- Phone numbers: Chinese mobiles with or without +86/0086/86, and '+' international numbers of 7-15
  digits. Numbers without '+' that are not Chinese mobiles are not masked (they cannot be told apart from
  order numbers and counts).
- Metadata: a whole string value of 8+ characters under a secret key name (`{"api_key": "..."}`) is a
  secret, as `api_key = ...` is in text; an integer value with a find (`{"phone": 13812345678}`) becomes
  the masked text.
- IPv6 needs at least three groups or a group of 3-4 hex digits, so that Python slices (`x[1::2]`) and
  `a::b` are not addresses (the loopback '::1' is not masked).
"""

from __future__ import annotations

import calendar
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from seektune.config import PII_KINDS, PrivacyConfig

PII_MASKS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "id_card": "<ID_CARD>",
    "bank_card": "<BANK_CARD>",
    "ip": "<IP>",
    "secret": "<SECRET>",
}
# The order in which overlapping finds are resolved: an earlier kind wins.
DETECTION_ORDER = ("secret", "email", "id_card", "bank_card", "phone", "ip")


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One find: its kind, where it is in the text (`text[start:end]`) and what it is."""

    kind: str
    start: int
    end: int
    text: str


Span = tuple[int, int]

# ---------------------------------------------------------------------------------------------------------
# Cheap pre-checks. Python's regex engine skips quickly only to the first character of a pattern that
# starts with a character class or a literal; patterns that start with a look-behind try every position.
# So scans start with a class, and the look-arounds run only inside the short spans found first.

# A sketch of the text's ASCII characters: digits become '0', spaces, dashes and parentheses 's', '+' and
# '.' stay, everything else becomes 'x'. One `bytes.translate` makes it; `in` tests on it are pre-checks.
_SHAPE = bytes(
    ord("0")
    if "0" <= char <= "9"
    else ord("s")
    if char in " -()"
    else ord(char)
    if char in "+."
    else ord("x")
    for char in map(chr, range(256))
)
# Runs of digits, spaces, dashes and parentheses (and an ID number's final X), 7 characters or more: the
# only places where a phone, ID or card number can be.
_NUMBER_RUN = re.compile(r"[+0-9][0-9 \-()]{5,}[0-9Xx]")  # one class repeated: the fastest scan
_DIGITS = frozenset("0123456789")
_ASCII_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def _shape(text: str) -> str:
    # Only the ASCII characters: what the pre-checks look for is ASCII, and it stays together when the
    # others are dropped (they can only join more digits: a false "maybe"). As str: `in` on str is
    # several times faster than on bytes.
    return text.encode("ascii", "ignore").translate(_SHAPE).decode("ascii")


def _may_hold_number(shape: str) -> bool:
    """7 digits in a row, two groups of 4 (1234 5678, 138-1234-5678) or '+' and a digit (+1 ...)."""
    return "0000000" in shape or "0000s0000" in shape or "+0" in shape


def _number_runs(text: str) -> list[Span]:
    """Spans of digit runs long enough to hold a phone number (7 digits), with 2 characters of context."""
    limit = len(text)
    return [(m.start(), min(limit, m.end() + 2)) for m in _NUMBER_RUN.finditer(text)]


def _glued(text: str, start: int, end: int, also: str) -> bool:
    """Whether text[start:end] continues an identifier, or a longer number joined by a character of `also`."""
    before = text[start - 1] if start else ""
    after = text[end : end + 2]
    return (
        before in _ASCII_WORD
        or (before != "" and before in also)
        or after[:1] in _ASCII_WORD
        or (after[:1] != "" and after[:1] in also and after[1:2] in _ASCII_WORD)
    )


# ---------------------------------------------------------------------------------------------------------
# Detectors: each yields (start, end) spans of what to mask

_EMAIL = re.compile(
    r"[A-Za-z0-9_%+\-](?:[A-Za-z0-9._%+\-]*[A-Za-z0-9_%+\-])?"
    r"@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9\-])"
)


def _find_email(text: str) -> Iterator[Span]:
    for match in _EMAIL.finditer(text):
        yield match.span()


_ID_CARD = re.compile(
    r"(?<![0-9A-Za-z_])[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
    r"[0-9]{3}[0-9Xx](?![0-9A-Za-z_])"
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def is_valid_id_card(number: str) -> bool:
    """A Chinese resident ID number: 18 characters, a real birth date, the ISO 7064 MOD 11-2 check."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1800 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number, _ID_WEIGHTS, strict=False))
    return _ID_CHECK[total % 11] == number[17].upper()


def _find_id_card(text: str, runs: list[Span]) -> Iterator[Span]:
    for start, end in runs:
        for match in _ID_CARD.finditer(text, start, end):
            if is_valid_id_card(match.group()):
                yield match.span()


# 13-19 digits in one run, or in groups of 4 (4-4-4-1..4, 4-4-4-4-1..4) or 4-6-5 (American Express), with
# one kind of separator; never part of a longer run of digits or digit groups.
_BANK_CARD = re.compile(
    r"(?<![0-9A-Za-z_])(?<![0-9][ \-])"
    r"(?:[0-9]{13,19}"
    r"|[0-9]{4}([ \-])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}(?:\1[0-9]{1,4})?"
    r"|[0-9]{4}([ \-])[0-9]{6}\2[0-9]{5})"
    r"(?![0-9A-Za-z_])(?![ \-][0-9])"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a card number given as digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _has_card_issuer_prefix(digits: str) -> bool:
    first = digits[0]
    if first in "3456":
        return True
    if first == "2":
        return 2221 <= int(digits[:4]) <= 2720
    return digits.startswith("81")  # UnionPay


def is_bank_card(number: str) -> bool:
    """13-19 digits (separators ignored) with a card issuer prefix and a valid Luhn check, not an ID."""
    digits = number.replace(" ", "").replace("-", "")
    return (
        13 <= len(digits) <= 19
        and digits.isdigit()
        and _has_card_issuer_prefix(digits)
        and luhn_valid(digits)
        and not is_valid_id_card(digits)
    )


def _find_bank_card(text: str, runs: list[Span]) -> Iterator[Span]:
    for start, end in runs:
        for match in _BANK_CARD.finditer(text, start, end):
            if is_bank_card(match.group()):
                yield match.span()


# Chinese mobile: optional +86 / 0086 / 86, then 1[3-9] and 9 digits, either in one run or grouped 3-4-4.
# International: '+', a country code and 7-15 digits in all, spaces, dashes and parentheses between.
_PHONE = re.compile(
    r"(?<![0-9A-Za-z_+])(?:"
    r"(?:(?:\+|00)?86[ \-]?)?1[3-9][0-9]"
    r"(?:[0-9]{8}(?![0-9A-Za-z_])|([ \-])[0-9]{4}\1[0-9]{4}(?![0-9A-Za-z_]|[ \-][0-9]))"
    r"|\+[1-9](?:[ \-()]{0,2}[0-9]){6,14}(?![0-9A-Za-z_]|[ \-][0-9])"
    r")"
)


def _find_phone(text: str, runs: list[Span]) -> Iterator[Span]:
    for start, end in runs:
        for match in _PHONE.finditer(text, start, end):
            yield match.span()


_IPV4 = re.compile(r"[0-9][0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f:][0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]{1,37}")


def _is_ipv4(found: str) -> bool:
    return all(len(octet) == 1 or (octet[0] != "0" and int(octet) <= 255) for octet in found.split("."))


def _is_ipv6(found: str) -> bool:
    groups = [group for group in found.split(":") if group]
    if len(groups) < 3 and not any(len(group) >= 3 for group in groups):
        return False  # slices (x[1::2]) and a::b
    try:
        ipaddress.IPv6Address(found)
    except ValueError:
        return False
    return True


def _ipv4_scan_start(text: str) -> int:
    """Where a scan for IPv4 addresses must start (3 characters before the first of at least three
    digit-dot-digit places), or -1 when there are fewer than three."""
    first, seen = -1, 0
    position = text.find(".")
    while position > 0:
        if text[position - 1] in _DIGITS and text[position + 1 : position + 2] in _DIGITS:
            first = position if first < 0 else first
            seen += 1
            if seen == 3:
                return max(0, first - 3)
        position = text.find(".", position + 1)
    return -1


def _find_ip(text: str) -> Iterator[Span]:
    start = _ipv4_scan_start(text) if text.count(".") >= 3 else -1
    if start >= 0:
        for match in _IPV4.finditer(text, start):
            if not _glued(text, *match.span(), also=".") and _is_ipv4(match.group()):
                yield match.span()
    if "::" in text or text.count(":") >= 6:  # compressed, or 8 groups (6 with an IPv4 tail)
        for match in _IPV6.finditer(text):
            start, end = match.span()
            if text[end - 1] == ":" and text[end - 2] != ":":
                end -= 1  # a colon after the address ("at fe80::1: ...")
            if not _glued(text, start, end, also=":.") and _is_ipv6(text[start:end]):
                yield start, end


# API keys and tokens of well-known shapes.
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    r"sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*"  # JWT
    r")(?![A-Za-z0-9_\-])"
)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|(?:\n[^\n]+)*)",  # a cut-off key: up to a blank line
    re.S,
)
_BEARER = re.compile(
    r"(?<![A-Za-z])(?:Bearer|bearer|BEARER)\s+([A-Za-z0-9\-._~+/]{16,}=*)(?![A-Za-z0-9\-._~+/=])"
)

# `name = value` / `name: value`: found from the separator, the name read backwards (a reversed match).
_KEY_ANCHORS = ("key", "pass", "pwd", "secret", "token")
_CJK_KEYS = ("密码", "口令", "密钥", "令牌")
# Key names with '_' and '-' removed; a name is a key when its last dotted part ends with one of them.
_KEY_ENDINGS = ("apikey", "secretkey", "accesskey", "accesskeyid", "privatekey", "password", "passwd", "pwd")
_KEY_ENDINGS += ("secret", "token")
_NAME_REVERSED = re.compile(r"[ \t]*[\"']?([A-Za-z0-9_.\-]+|码密|令口|钥密|牌令)")
_ASSIGNED_VALUE = re.compile(r"[ \t]*(?:\"([^\"\n]{8,})\"|'([^'\n]{8,})'|([^\s\"'`,;&，。；、]{8,}))")
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_CODE_CHARS = frozenset("()[]{}<>$")
_MASKS = frozenset(PII_MASKS.values())


def _is_secret_key(name: str) -> bool:
    if name in _CJK_KEYS:
        return True
    last = name.rsplit(".", 1)[-1].lower().replace("_", "").replace("-", "")
    return last.endswith(_KEY_ENDINGS)


def _reads_as_code(value: str) -> bool:
    """An unquoted assigned value that is an expression or a placeholder rather than a literal secret."""
    return not _CODE_CHARS.isdisjoint(value) or _DOTTED_NAME.fullmatch(value) is not None


def _separator_positions(text: str) -> Iterator[int]:
    for separator in ("=", ":", "："):
        position = text.find(separator)
        while position >= 0:
            yield position
            position = text.find(separator, position + 1)


def _find_assigned_secret(text: str) -> Iterator[Span]:
    for position in _separator_positions(text):
        value = _ASSIGNED_VALUE.match(text, position + 1)
        if value is None:
            continue
        name = _NAME_REVERSED.match(text[max(0, position - 64) : position][::-1])
        if name is None or not _is_secret_key(name.group(1)[::-1]):
            continue
        group = next(g for g in (1, 2, 3) if value.group(g) is not None)
        start, end = value.span(group)
        if group == 3:
            while text[end - 1] in ".:!?" and end - start > 8:
                end -= 1  # sentence punctuation after the value
            if _reads_as_code(text[start:end]):
                continue
        if text[start:end] not in _MASKS:  # masking twice changes nothing
            yield start, end


def _may_hold_token(text: str) -> bool:
    if "AKIA" in text or "ASIA" in text or "AIza" in text or "eyJ" in text:
        return True
    if "-" in text and ("sk-" in text or "xox" in text):
        return True
    return "_" in text and any(anchor in text for anchor in ("k_live_", "k_test_", "gh", "_pat_", "hf_"))


def _may_hold_assignment(text: str) -> bool:
    if "=" not in text and ":" not in text and "：" not in text:
        return False
    lowered = text.lower()
    if any(anchor in lowered for anchor in _KEY_ANCHORS):
        return True
    return not text.isascii() and any(key in text for key in _CJK_KEYS)


def _find_secret(text: str) -> list[Span]:
    spans = []
    if _may_hold_token(text):
        for match in _TOKEN_SHAPES.finditer(text):
            if not match.group().startswith("sk-") or any(c.isdigit() for c in match.group()):
                spans.append(match.span())  # 'sk-' words (sk-learn-...) are not keys: a real key has digits
    if "-----BEGIN" in text:
        spans += [match.span() for match in _PEM_PRIVATE_KEY.finditer(text)]
    if "earer" in text or "EARER" in text:
        spans += [m.span(1) for m in _BEARER.finditer(text) if any(c.isdigit() for c in m.group(1))]
    if _may_hold_assignment(text):
        spans += _find_assigned_secret(text)
    return spans


_NUMBER_DETECTORS: dict[str, Callable[[str, list[Span]], Iterable[Span]]] = {
    "id_card": _find_id_card,
    "bank_card": _find_bank_card,
    "phone": _find_phone,
}


# ---------------------------------------------------------------------------------------------------------
# Public API


def _ordered_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    wanted = set(kinds)
    unknown = wanted - set(PII_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; known: {', '.join(PII_KINDS)}")
    return tuple(kind for kind in DETECTION_ORDER if kind in wanted)


def _find_spans(text: str, kinds: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) finds in text order; `kinds` is in DETECTION_ORDER.

    The pre-checks are inline: on text without PII no detector (nor generator) is even called."""
    found: list[tuple[int, int, str]] = []
    shape, runs = "", None
    for kind in kinds:
        if kind == "secret":
            spans: Iterable[Span] = _find_secret(text)
        elif kind == "email":
            if "@" not in text:
                continue
            spans = _find_email(text)
        else:
            shape = shape or _shape(text)
            if kind == "ip":
                if shape.count(".0") < 3 and "::" not in text and text.count(":") < 6:
                    continue
                spans = _find_ip(text)
            else:
                if runs is None:
                    runs = _number_runs(text) if _may_hold_number(shape) else []
                if not runs:
                    continue
                spans = _NUMBER_DETECTORS[kind](text, runs)
        for start, end in spans:
            if all(end <= s or start >= e for s, e, _ in found):
                found.append((start, end, kind))
    if len(found) > 1:
        found.sort()
    return found


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[PiiMatch]:
    """Personal and secret data in `text`: non-overlapping finds of the given kinds, in text order."""
    return [
        PiiMatch(kind, start, end, text[start:end])
        for start, end, kind in _find_spans(text, _ordered_kinds(kinds))
    ]


def _mask(text: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    if not text:
        return text, {}
    spans = _find_spans(text, kinds)
    if not spans:
        return text, {}
    pieces, counts, position = [], {}, 0
    for start, end, kind in spans:
        pieces += (text[position:start], PII_MASKS[kind])
        counts[kind] = counts.get(kind, 0) + 1
        position = end
    pieces.append(text[position:])
    return "".join(pieces), counts


def mask_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """`text` with every find replaced by its mask (`<EMAIL>`, ...), and the number of finds per kind."""
    return _mask(text, _ordered_kinds(kinds))


# The columns whose text is masked, in the order privacy_batch unpacks them.
_MASKED_COLUMNS = ("messages", "text", "label", "metadata", "rejected")


def _add_reason(existing: str, reason: str) -> str:
    return f"{existing},{reason}" if existing else reason


def _add_counts(counts: dict[str, int], found: dict[str, int]) -> None:
    for kind, n in found.items():
        counts[kind] = counts.get(kind, 0) + n


def _mask_value(value: object, key: str, kinds: tuple[str, ...], counts: dict[str, int]) -> object:
    """A metadata value (under `key`, "" in a list) with its text masked, walking nested objects and lists.

    A whole string of 8+ characters under a secret key name ("api_key", "password", ...) is a secret, as
    `key = value` in text. An integer with a find (a phone number) becomes the masked text."""
    if isinstance(value, dict):
        return {name: _mask_value(item, name, kinds, counts) for name, item in value.items()}
    if isinstance(value, list):
        return [_mask_value(item, "", kinds, counts) for item in value]
    if isinstance(value, str):
        if "secret" in kinds and len(value) >= 8 and value not in _MASKS and _is_secret_key(key):
            _add_counts(counts, {"secret": 1})
            return PII_MASKS["secret"]
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        return value
    masked, found = _mask(text, kinds)
    if not found:
        return value
    _add_counts(counts, found)
    return masked


def _mask_metadata(metadata: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    """The metadata JSON with its string values masked (re-serialised only when masked), and the finds."""
    try:
        parsed = json.loads(metadata)
    except ValueError:
        return _mask(metadata, kinds)  # not JSON: masked as text, so that nothing leaks
    counts: dict[str, int] = {}
    masked = _mask_value(parsed, "", kinds, counts)
    if not counts:
        return metadata, {}
    return json.dumps(masked, ensure_ascii=False, sort_keys=True), counts


def _mask_record(
    messages: list, text: str, label: str, metadata: str, kinds: tuple[str, ...], rejected: str = ""
) -> tuple[list, str, str, str, str, dict[str, int]]:
    """The record's messages, text, label, metadata and rejected answer masked, and the finds per kind."""
    # One screening of the whole record first: the pre-checks cost per call, and most records hold no
    # PII. Finds never cross the newlines, so no find in the joined text means none in any part. Metadata
    # JSON without a backslash (no escapes) holds its strings as they are, between quotes that no detector
    # reads as part of a find, and its '"api_key": "..."' pairs are `key: value` secrets of the text: it is
    # screened as it is, and parsed only when that finds something.
    parts = [message["content"] or "" for message in messages]
    has_metadata = metadata != "{}" and metadata != ""
    if not has_metadata or "\\" not in metadata:
        screened = [*parts, text, label, rejected, *([metadata] if has_metadata else [])]
        if not _find_spans("\n".join(screened), kinds):
            return messages, text, label, metadata, rejected, {}
    counts: dict[str, int] = {}
    masked_messages = list(messages)
    for index, content in enumerate(parts):
        masked, found = _mask(content, kinds)
        if found:
            masked_messages[index] = {**messages[index], "content": masked}
            _add_counts(counts, found)
    text, found = _mask(text, kinds)
    _add_counts(counts, found)
    label, found = _mask(label, kinds)
    _add_counts(counts, found)
    rejected, found = _mask(rejected, kinds)
    _add_counts(counts, found)
    if has_metadata:
        metadata, found = _mask_metadata(metadata, kinds)
        _add_counts(counts, found)
    return masked_messages, text, label, metadata, rejected, counts


def privacy_batch(batch: dict[str, list], cfg: PrivacyConfig) -> dict[str, list]:
    """Mask personal and secret data in every message, `text`, `label`, `rejected` and `metadata` value
    of a batch.

    Adds the column `pii` ("email:1,phone:2" per record, "" when none) and extends `removed_by` (with
    action 'drop', a record with any find gets "privacy" unless it already has a reason) and `changed_by`
    ("privacy" appended when masked), creating them when the batch lacks them. With action 'drop' the
    records are masked too, so that nothing leaks wherever they are shown. Records that an earlier step
    already removed (the cleaner's `removed_by`) are left as they are: they are dropped anyway, and the
    report's PII counts are about the data that is kept. In `metadata` (a JSON object as text) the string
    and integer values are masked (the key names are not); it is parsed only when a screening of its text
    finds something or it holds escapes, and written again (`json.dumps`, sorted keys) only when masked.
    """
    n_rows = len(next(iter(batch.values()), []))
    removed_by = list(batch.get("removed_by") or [""] * n_rows)
    changed_by = list(batch.get("changed_by") or [""] * n_rows)
    pii = [""] * n_rows
    out = dict(batch)
    if cfg.enabled and cfg.detectors:
        kinds = _ordered_kinds(cfg.detectors)
        columns = {name: list(batch.get(name) or [None] * n_rows) for name in _MASKED_COLUMNS}
        all_messages, texts, labels, metadata, rejected = (columns[name] for name in _MASKED_COLUMNS)
        for row in range(n_rows):
            if removed_by[row]:
                continue
            *masked, counts = _mask_record(
                all_messages[row] or [],
                texts[row] or "",
                labels[row] or "",
                metadata[row] or "",
                kinds,
                rejected[row] or "",
            )
            if not counts:
                continue
            all_messages[row], texts[row], labels[row], metadata[row], rejected[row] = masked
            pii[row] = ",".join(f"{kind}:{counts[kind]}" for kind in PII_KINDS if kind in counts)
            changed_by[row] = _add_reason(changed_by[row], "privacy")
            if cfg.action == "drop":
                removed_by[row] = "privacy"
        out.update({name: values for name, values in columns.items() if name in batch})
    out.update(removed_by=removed_by, changed_by=changed_by, pii=pii)
    return out
