"""Cleaning rules and record filters (seektune.data.clean)."""

from __future__ import annotations

import ast
import random
import re
import unicodedata
from collections import Counter

import pytest
import yaml
from datasets import Dataset

from seektune.config import CleanConfig, PrivacyConfig
from seektune.data.clean import (
    _KEPT_PUNCTUATION,
    _UNSTABLE_IN_HAN_TEXT,
    CLEAN_FILTERS,
    CLEAN_RULES,
    clean_batch,
    clean_text,
)
from seektune.data.privacy import privacy_batch
from seektune.data.records import COLUMNS, RECORD_FEATURES, make_record, record_text, rows_batch
from seektune.errors import UserError

ALL_OFF = {rule: False for rule in CLEAN_RULES if rule != "allowed_chars"}


def only(rule: str, **extra) -> CleanConfig:
    """A config with every rule off but `rule`."""
    return CleanConfig(**{**ALL_OFF, rule: True, **extra})


def test_rule_and_filter_names_in_order() -> None:
    assert CLEAN_RULES == ("unicode_nfkc", "strip_html", "remove_control", "fold_whitespace", "allowed_chars")
    assert CLEAN_FILTERS == ("empty", "same_answers", "min_chars", "max_chars", "language")


# ---------------------------------------------------------------------------------------------------------
# Each rule on and off


def test_unicode_nfkc() -> None:
    text = "Ｆｕｌｌ　ｗｉｄｔｈ１２３，ｆｉ ① ½"
    assert clean_text(text, only("unicode_nfkc")) == ("Full width123,fi 1 1⁄2", ["unicode_nfkc"])
    assert clean_text(text, CleanConfig(**ALL_OFF)) == (text, [])
    assert clean_text("中文。“引号”", only("unicode_nfkc")) == ("中文。“引号”", [])  # already NFKC
    assert clean_text("안녕하세요 café", only("unicode_nfkc")) == ("안녕하세요 café", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("你好，世界！请问：（测试）？", "你好，世界！请问：（测试）？"),  # Chinese punctuation stays
        ("等等……好吧～", "等等……好吧～"),
        ("型号ＡＢＣ１２３，价格（１００元）！", "型号ABC123，价格（100元）！"),  # letters, digits: ASCII
        ("第一章　开始，ｆｉ①", "第一章 开始，fi1"),  # the ideographic space becomes a space
        ("汉字ｶﾀｶﾅ，", "汉字カタカナ，"),  # half-width katakana
        ("咖啡 cafe\u0301，好", "咖啡 café，好"),  # a combining mark composes with the letter before it
        ("越南 e\u0302\u0323！", "越南 \u1ec7！"),  # marks of a run are reordered together
        ("（\u0301）中", "（\u0301）中"),  # a mark never composes with kept punctuation
    ],
)
def test_unicode_nfkc_keeps_fullwidth_punctuation_in_han_text(text: str, expected: str) -> None:
    changed = ["unicode_nfkc"] if expected != text else []
    assert clean_text(text, only("unicode_nfkc")) == (expected, changed)


def test_unicode_nfkc_without_han_is_plain_nfkc() -> None:
    assert clean_text("Ｗａｉｔ… ｗｈａｔ？（ｏｋ）", only("unicode_nfkc")) == (
        "Wait... what?(ok)",
        ["unicode_nfkc"],
    )
    assert clean_text("にほんご，カナ！", only("unicode_nfkc")) == (
        "にほんご,カナ!",
        ["unicode_nfkc"],
    )  # kana only


def test_unicode_nfkc_in_han_text_equals_nfkc_between_the_kept_punctuation() -> None:
    """Property: whatever the mix, the result is NFKC of the pieces between kept punctuation; checked on
    random strings of characters that decompose, compose, reorder, and of the kept punctuation."""
    kept = "，！：（）？；～＂＇％＃＠＿…"
    others = "中文字ＡＢｚ１９ｶﾞ①½ﬁ\u3000\xa0 ae\u0301\u0302\u0323\u0308ᄀ\u1161\u11a8가。“”—·か\u3099\uf900ﾟ"
    alphabet = kept + others
    rng = random.Random(7)
    pieces_pattern = re.compile(f"([{re.escape(kept)}]+)")
    for _ in range(3000):
        text = "中" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        pieces = pieces_pattern.split(text)
        reference = "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(pieces))
        assert clean_text(text, only("unicode_nfkc"))[0] == reference, ascii(text)


def test_characters_outside_the_unstable_class_are_left_alone_by_nfkc() -> None:
    """Every BMP character that the fast path of Han text lets through unchanged is one that NFKC keeps
    whatever its neighbours: it does not change alone, is no combining mark, no conjoining jamo, and
    composes with nothing before it."""
    composed_seconds = set()
    for code in range(0x110000):
        decomposition = unicodedata.decomposition(chr(code)).split()
        if len(decomposition) == 2 and not decomposition[0].startswith("<"):
            composed_seconds.add(chr(int(decomposition[1], 16)))
    kept = set("！＂＃＄％＆＇（）＊＋，－．／：；＜＝＞？＠［＼］＾＿｀｛｜｝～…")
    assert kept == _KEPT_PUNCTUATION
    passed = [chr(code) for code in range(0x10000) if _UNSTABLE_IN_HAN_TEXT.match(chr(code)) is None]
    assert len(passed) > 27_500 and kept <= set(passed)  # Han alone: 27,584
    bad = [
        f"U+{ord(char):04X}"
        for char in passed
        if char not in kept
        and (
            unicodedata.normalize("NFKC", char) != char
            or unicodedata.combining(char)
            or char in composed_seconds
            or "\u1100" <= char <= "\u11ff"
        )
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<p>Hello</p><p>World &amp; more</p>", "\nHello\n\nWorld & more\n"),
        ('<div class="x">a<br/>b</div>', "\na\nb\n"),
        ("<b>bold</b> and <I>it</I>", "bold and it"),
        ("x<!-- a comment -->y", "xy"),
        ("<script>var a = 1 < 2;</script>text<style>p {}</style>", "text"),
        ("<!DOCTYPE html><html><body>hi</body></html>", "\n\nhi\n\n"),
        ("<table><tr><td>a</td><td>b</td></tr></table>", "\n\n a  b \n\n"),
        ("one<br>two", "one\ntwo"),
        ("foo<b>bar</b>", "foobar"),  # closing tags make the text markup: the glued tag goes too
        ("&lt;div&gt; &#39;q&#39; &#x4e2d;&nbsp;!", "<div> 'q' 中\xa0!"),
    ],
)
def test_strip_html_removes_markup(text: str, expected: str) -> None:
    assert clean_text(text, only("strip_html")) == (expected, ["strip_html"])
    assert clean_text(text, CleanConfig(**ALL_OFF)) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        "a < b > c",
        "if a<b and c>d: pass",
        "<class 'int'>",
        "List<String> and Map<String, Object>",
        "Optional<Map> or Array<Object>",
        "masked <EMAIL> and <PHONE> and <ID_CARD>",
        "see ?a=1&copy=2&para=3",  # entities without ';' (URL queries) are not entities
        "use `<b>bold</b>` inline",
        "```html\n<div>kept</div>\n```",
        "x &unknown; y && z",
    ],
)
def test_strip_html_keeps_what_is_not_markup(text: str) -> None:
    assert clean_text(text, only("strip_html")) == (text, [])


def test_strip_html_leaves_code_spans_alone() -> None:
    text = "Use `<br>` for breaks: <i>really</i>\n```\n<p>&amp;</p>\n```\n<p>done</p>"
    cleaned, _ = clean_text(text, only("strip_html"))
    assert cleaned == "Use `<br>` for breaks: really\n```\n<p>&amp;</p>\n```\n\ndone\n"


def test_remove_control() -> None:
    text = "zero\u200bwidth\ufeff soft\u00adhyphen\x07bell\x00 rtl\u202eo\u2066k\ttab\nline\x85"
    expected = "zerowidth softhyphenbell rtlok\ttab\nline"
    assert clean_text(text, only("remove_control")) == (expected, ["remove_control"])
    assert clean_text(text, CleanConfig(**ALL_OFF)) == (text, [])
    assert clean_text("tabs\tand\nnewlines\r\n", only("remove_control")) == ("tabs\tand\nnewlines\r\n", [])


def test_fold_whitespace() -> None:
    text = "\n\na  b\t\tc   \r\nd\r\n\r\n\r\n\r\ne \u3000 f\xa0g  \n  \n"
    expected = "a b c\nd\n\ne f g"
    assert clean_text(text, only("fold_whitespace")) == (expected, ["fold_whitespace"])
    assert clean_text(text, CleanConfig(**ALL_OFF)) == (text, [])
    assert clean_text("one space only\nand lines", only("fold_whitespace")) == (
        "one space only\nand lines",
        [],
    )


def test_fold_whitespace_keeps_indentation_so_code_stays_valid() -> None:
    code = (
        "def area(w,  h):   \n"
        '    """Area."""\n'
        "    if w  >  0:\t# positive\n"
        "        return w *  h   \n"
        "\n\n\n\n"
        "class  A:\n"
        "    x =  1\n"
    )
    cleaned, rules = clean_text(code, CleanConfig())
    assert rules == ["fold_whitespace"]
    assert cleaned.splitlines()[2] == "    if w > 0: # positive"
    assert cleaned.splitlines()[3] == "        return w * h"
    assert "\n\n\n" not in cleaned
    assert ast.dump(ast.parse(cleaned)) == ast.dump(ast.parse(code))


def test_allowed_chars_keeps_chinese() -> None:
    cfg = only("allowed_chars", allowed_chars="a-zA-Z0-9\u4e00-\u9fa5\\s.,!?")
    assert clean_text("Hello 世界! ★ ok ©", cfg) == ("Hello 世界!  ok ", ["allowed_chars"])
    assert clean_text("plain text.", cfg) == ("plain text.", [])
    # With fold_whitespace on, the spaces the removal leaves behind are folded too.
    cfg = CleanConfig(allowed_chars="a-zA-Z0-9\u4e00-\u9fa5\\s.,!?")
    assert clean_text("Hello 世界! ★ ok ©", cfg) == ("Hello 世界! ok", ["allowed_chars"])


def test_allowed_chars_as_written_in_yaml() -> None:
    # Double-quoted YAML turns \u4e00 into the character; single-quoted keeps the 6-character escape,
    # which the regex engine reads inside a class. Both must keep Chinese.
    double = yaml.safe_load('allowed_chars: "a-z\\u4e00-\\u9fa5 "')["allowed_chars"]
    single = yaml.safe_load("allowed_chars: 'a-z\\u4e00-\\u9fa5 '")["allowed_chars"]
    assert double == "a-z\u4e00-\u9fa5 " and single == "a-z\\u4e00-\\u9fa5 "
    for body in (double, single):
        assert clean_text("abc 中文 XYZ 123", only("allowed_chars", allowed_chars=body))[0] == "abc 中文  "


def test_rules_run_in_order_and_are_all_named() -> None:
    text = "Ｈｉ\u200b <b>there</b>   ★"
    cfg = CleanConfig(allowed_chars="A-Za-z ")
    assert clean_text(text, cfg) == ("Hi there", list(CLEAN_RULES))
    assert clean_text(text, CleanConfig(enabled=False)) == (text, [])


# ---------------------------------------------------------------------------------------------------------
# Batches and filters


def chat(user: str, answer: str) -> dict:
    return make_record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}])


def test_clean_batch_columns() -> None:
    rows = [
        chat("Ｈｉ", "<b>Hello</b>  there"),
        chat("fine", "as is"),
        make_record(text="doc\u200b text"),
    ]
    out = clean_batch(rows_batch(rows, COLUMNS), CleanConfig())
    assert out["messages"][0] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    assert out["text"] == ["", "", "doc text"]
    assert out["changed_by"] == ["unicode_nfkc,strip_html,fold_whitespace", "", "remove_control"]
    assert out["removed_by"] == ["", "", ""]
    assert list(out)[: len(COLUMNS)] == list(COLUMNS)


def test_filters_with_counts() -> None:
    rows = [
        chat("question", "a" * 20),  # kept: 8 + 1 + 20 = 29 characters
        chat("q", ""),  # every answer empty
        chat("<br>", "  "),  # everything empty after cleaning
        make_record(text="tiny"),  # 4 < min_chars
        make_record(text="x" * 41),  # 41 > max_chars
        make_record(text="x" * 40),  # kept (max_chars is inclusive)
        make_record(text=""),
    ]
    cfg = CleanConfig(min_chars=5, max_chars=40)
    out = clean_batch(rows_batch(rows, COLUMNS), cfg)
    assert out["removed_by"] == ["", "empty", "empty", "min_chars", "max_chars", "", "empty"]
    assert Counter(r for r in out["removed_by"] if r) == {"empty": 3, "min_chars": 1, "max_chars": 1}


def test_min_chars_counts_the_record_text() -> None:
    row = chat("abcd", "efgh")  # record_text: "abcd\nefgh", 9 characters
    assert len(record_text(row)) == 9
    assert clean_batch(rows_batch([row], COLUMNS), CleanConfig(min_chars=9))["removed_by"] == [""]
    assert clean_batch(rows_batch([row], COLUMNS), CleanConfig(min_chars=10))["removed_by"] == ["min_chars"]


def test_disabled_passes_batch_unchanged() -> None:
    rows = [chat("Ｈｉ", "<b>x</b>"), make_record(text="")]
    batch = rows_batch(rows, COLUMNS)
    out = clean_batch(batch, CleanConfig(enabled=False))
    assert out["messages"] == batch["messages"] and out["text"] == batch["text"]
    assert out["changed_by"] == ["", ""] and out["removed_by"] == ["", ""]


def test_existing_marks_are_extended() -> None:
    batch = rows_batch([chat("a  b", "c"), chat("x", "y")], COLUMNS)
    batch["changed_by"], batch["removed_by"] = ["loader", ""], ["", "source"]
    out = clean_batch(batch, CleanConfig())
    assert out["changed_by"] == ["loader,fold_whitespace", ""]
    assert out["removed_by"] == ["", "source"]


_ENGLISH = "The weather is lovely today, so we are going for a long walk in the park after lunch."
_CHINESE = "今天天气很好，我们吃完午饭以后打算去公园里散步，顺便买一些新鲜的水果回家。"
_FRENCH = "Le chat dort sur le canapé pendant que nous préparons le dîner pour toute la famille ce soir."
_GERMAN = "Der Hund schläft im Garten, während die Kinder in der Schule sind und Mathematik lernen."


def test_language_filter_keeps_zh_and_en() -> None:
    rows = [
        make_record(text=_ENGLISH),
        make_record(text=_CHINESE),
        make_record(text=_FRENCH),
        make_record(text=_GERMAN),
        chat(_CHINESE, _ENGLISH),  # a mixed record: the summed confidence of zh and en counts
        make_record(text=""),  # empty is reported as empty, before any language check
    ]
    out = clean_batch(rows_batch(rows, COLUMNS), CleanConfig(languages=["zh", "en"]))
    assert out["removed_by"] == ["", "", "language", "language", "", "empty"]
    out = clean_batch(rows_batch(rows, COLUMNS), CleanConfig(languages=["fr"]))
    assert out["removed_by"] == ["language", "language", "", "language", "language", "empty"]


def test_unknown_language_code_is_a_user_error() -> None:
    batch = rows_batch([make_record(text=_ENGLISH)], COLUMNS)
    with pytest.raises(UserError, match=r"data\.clean\.languages: 'xx'"):
        clean_batch(batch, CleanConfig(languages=["en", "xx"]))


def test_runs_in_dataset_map_with_privacy() -> None:
    rows = [chat("mail me: a@b.com", "<p>sure</p>"), make_record(text="  ")]
    dataset = Dataset.from_list(rows, features=RECORD_FEATURES)

    def clean_and_mask(batch: dict[str, list]) -> dict[str, list]:
        return privacy_batch(clean_batch(batch, CleanConfig()), PrivacyConfig())

    out = dataset.map(clean_and_mask, batched=True, batch_size=10)
    assert out["removed_by"] == ["", "empty"]
    assert out["changed_by"] == ["strip_html,fold_whitespace,privacy", "fold_whitespace"]
    assert out["pii"] == ["email:1", ""]
    assert out[0]["messages"] == [
        {"role": "user", "content": "mail me: <EMAIL>"},
        {"role": "assistant", "content": "sure"},
    ]
