"""Detection and masking of personal and secret data (seektune.data.privacy)."""

from __future__ import annotations

import itertools

import pytest

from seektune.config import PII_KINDS, PrivacyConfig
from seektune.data.privacy import (
    PII_MASKS,
    PiiMatch,
    find_pii,
    is_bank_card,
    is_valid_id_card,
    luhn_valid,
    mask_pii,
    privacy_batch,
)
from seektune.data.records import COLUMNS, make_record, rows_batch


def found(text: str, kind: str) -> list[str]:
    """What `find_pii` finds in `text` with every detector on, for one kind."""
    return [match.text for match in find_pii(text, PII_KINDS) if match.kind == kind]


def test_masks_cover_every_kind() -> None:
    assert set(PII_MASKS) == set(PII_KINDS)
    assert PII_MASKS["id_card"] == "<ID_CARD>" and PII_MASKS["secret"] == "<SECRET>"


# ---------------------------------------------------------------------------------------------------------
# E-mail


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at john.doe@example.com.", ["john.doe@example.com"]),
        ("邮箱是zhang.san@example.com请联系", ["zhang.san@example.com"]),
        ("a+tag@sub.example.co.uk, b_c@x.io", ["a+tag@sub.example.co.uk", "b_c@x.io"]),
        ("13812345678@qq.com", ["13812345678@qq.com"]),  # one e-mail, not a phone number
    ],
)
def test_email_found(text: str, expected: list[str]) -> None:
    assert found(text, "email") == expected
    assert not found(text, "phone")


@pytest.mark.parametrize(
    "text", ["@property\ndef f(self): ...", "ssh user@localhost", "pkg@1.2.3", "a @ b.com", "price: 5@3.00"]
)
def test_email_not_found(text: str) -> None:
    assert found(text, "email") == []


# ---------------------------------------------------------------------------------------------------------
# Phone


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我的手机号是13812345678，请联系", "13812345678"),
        ("电话：+86 138 1234 5678。", "+86 138 1234 5678"),
        ("call +86-138-1234-5678 now", "+86-138-1234-5678"),
        ("拨打008613912345678", "008613912345678"),
        ("US office: +1 (415) 555-2671.", "+1 (415) 555-2671"),
        ("London +44 20 7946 0958", "+44 20 7946 0958"),
        ("tel:19912345678", "19912345678"),
    ],
)
def test_phone_found(text: str, expected: str) -> None:
    assert found(text, "phone") == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "订单号138123456789012已发货",  # a longer digit run (order number)
        "timestamp 1700000000 and 1700000000123",
        "released 2023-06-25 12:30:45, build 20230625",
        "Python 3.11.4 and version 1.13.8",
        "12345678901",  # 12 is no Chinese mobile prefix
        "138 1234 5678 9012",  # part of a longer group of digits
        "UTC+8 12:00",
        "hash a13812345678b",
    ],
)
def test_phone_not_found(text: str) -> None:
    assert found(text, "phone") == []


# ---------------------------------------------------------------------------------------------------------
# Chinese resident ID number


def test_id_card_checksum_and_date() -> None:
    assert is_valid_id_card("11010519491231002X")
    assert is_valid_id_card("11010519491231002x")
    assert is_valid_id_card("44030419900307123X")
    assert not is_valid_id_card("110105194912310021")  # wrong check character
    assert not is_valid_id_card("110105194902300020")  # right check character, but 30 February
    assert not is_valid_id_card("1101051949123100")  # too short


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("身份证号11010519491231002X，请核对", "11010519491231002X"),
        ("ID: 44030419900307123X.", "44030419900307123X"),
        ("id 440304199003071256 end", "440304199003071256"),
    ],
)
def test_id_card_found(text: str, expected: str) -> None:
    assert found(text, "id_card") == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "bad checksum 110105194912310021",
        "no such date 110105194902300020",
        "longer run 11010519491231002X7",
        "trace id 98765432101234567890",
    ],
)
def test_id_card_not_found(text: str) -> None:
    assert found(text, "id_card") == []


# ---------------------------------------------------------------------------------------------------------
# Bank card


def test_luhn_and_issuer_prefix() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert luhn_valid("1700000000004") and not is_bank_card("1700000000004")  # Luhn-valid timestamp
    assert luhn_valid("2023062512345678") and not is_bank_card("2023062512345678")  # date-led order no.
    assert is_bank_card("5500 0055 5555 5559") and is_bank_card("378282246310005")
    # A valid 18-digit ID number that also passes Luhn is an ID number, not a card.
    assert luhn_valid("440304199003071256") and not is_bank_card("440304199003071256")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111 1111 1111 1111 expires", "4111 1111 1111 1111"),
        ("卡号4111-1111-1111-1111，", "4111-1111-1111-1111"),
        ("Amex 3782 822463 10005", "3782 822463 10005"),
        ("银联卡6212345678901232", "6212345678901232"),
        ("18 digits 622202123456789012", "622202123456789012"),
    ],
)
def test_bank_card_found(text: str, expected: str) -> None:
    assert found(text, "bank_card") == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "not Luhn 4111111111111112",
        "timestamp 1700000000004",
        "order 2023062512345678",
        "part of a longer run 41111111111111110",
        "grouped run 4111 1111 1111 1111 2222",
        "hex 4111111111111111abc",
    ],
)
def test_bank_card_not_found(text: str) -> None:
    assert found(text, "bank_card") == []


def test_id_number_is_never_a_card_even_when_ids_are_not_searched() -> None:
    assert find_pii("id 440304199003071256", ["bank_card"]) == []
    assert [m.kind for m in find_pii("id 440304199003071256", PII_KINDS)] == ["id_card"]


# ---------------------------------------------------------------------------------------------------------
# IP address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server 192.168.1.100.", ["192.168.1.100"]),
        ("服务器IP是10.0.0.255，端口22", ["10.0.0.255"]),
        ("from 0.0.0.0 to 255.255.255.255", ["0.0.0.0", "255.255.255.255"]),
        ("v6 2001:db8::8a2e:370:7334 here", ["2001:db8::8a2e:370:7334"]),
        ("link fe80::1ff:fe23:4567:890a.", ["fe80::1ff:fe23:4567:890a"]),
        ("mapped ::ffff:10.0.0.1", ["10.0.0.1"]),
    ],
)
def test_ip_found(text: str, expected: list[str]) -> None:
    assert found(text, "ip") == expected


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1 and 256.1.1.1",
        "version 1.2.3.4.5",
        "v1.2.3.4 and 01.02.03.04",
        "Python 3.11.4 on 2023.06.25",
        "at 12:30:45 and 10:00",
        "std::vector<int> and x[1::2] and a::b",
        "mac 00:1a:2b:3c:4d:5e",
    ],
)
def test_ip_not_found(text: str) -> None:
    assert found(text, "ip") == []


# ---------------------------------------------------------------------------------------------------------
# Secrets

_JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)


@pytest.mark.parametrize(
    "token",
    [
        "sk-proj-abcDEF1234567890abcdefGHIJ",
        "sk-ant-api03-abcdef1234567890ABCDEFGH",
        "sk-abcdefghijklmnop1234567890",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
        "AKIAIOSFODNN7EXAMPLE",
        "ASIAY34FZKBOKMUTVV7A",
        "xoxb-123456789012-abcdefghijkl",
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "hf_abcdefghijklmnopqrstuvwxyz123456",
        "sk_live_51H8abcdefghijklmnop",
        "rk_live_51H8abcdefghijklmnop",
        _JWT,
    ],
)
def test_token_shapes_found(token: str) -> None:
    assert found(f"use {token} here", "secret") == [token]
    assert found(f"密钥是{token}，不要外传", "secret") == [token]


def test_pem_private_key_masked_whole() -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234\nabcd==\n-----END RSA PRIVATE KEY-----"
    assert mask_pii(f"key:\n{pem}\ndone") == ("key:\n<SECRET>\ndone", {"secret": 1})
    cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\nAAAABG5vbmU=\n\nThe rest."
    assert mask_pii(cut) == ("<SECRET>\n\nThe rest.", {"secret": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abcdef1234567890abcdef", "Authorization: Bearer <SECRET>"),
        ('api_key = "abcdef123456"', 'api_key = "<SECRET>"'),
        ("password: hunter2hunter2.", "password: <SECRET>."),
        ("DB_PASSWORD=supersecret1", "DB_PASSWORD=<SECRET>"),
        ('{"apiKey": "abcdefgh12", "n": 1}', '{"apiKey": "<SECRET>", "n": 1}'),
        ("secret='correct horse battery'", "secret='<SECRET>'"),
        ("?token=abcdef0123456789&x=1", "?token=<SECRET>&x=1"),
        ("client_secret: 0123456789abcdef", "client_secret: <SECRET>"),
        ("密码：abc12345，请保密", "密码：<SECRET>，请保密"),
    ],
)
def test_assigned_secrets_keep_the_key_name(text: str, expected: str) -> None:
    masked, counts = mask_pii(text)
    assert masked == expected
    assert counts == {"secret": 1}


@pytest.mark.parametrize(
    "text",
    [
        "The skeleton key of the task: learning",
        "sk-learn-the-basics-of-python-fast is a slug",  # 'sk-' word without digits
        "Bearer of bad news, bearer bonds",
        "password = short",  # under 8 characters
        # Decided: code is not a secret. A name that only contains a key word is no key, and an
        # unquoted value that is an expression (call, subscript, dotted name, ${VAR}, <placeholder>)
        # is not a literal secret.
        'password_field = form.get("password")',
        'password = form.get("password")',
        'api_key = os.environ["OPENAI_API_KEY"]',
        "secret = settings.SECRET_KEY",
        "token = tokenizer(text)",
        "max_tokens=100000000",
        "password: ${DB_PASSWORD}",
        "password: <your-password>",
        "key: some_long_value",  # 'key' alone is no secret key name
    ],
)
def test_secret_false_positives(text: str) -> None:
    assert found(text, "secret") == []


def test_masking_twice_changes_nothing() -> None:
    once, counts = mask_pii("password: hunter2hunter2 mail a@b.com")
    assert counts == {"secret": 1, "email": 1}
    assert mask_pii(once) == (once, {})


# ---------------------------------------------------------------------------------------------------------
# find_pii / mask_pii


def test_find_pii_is_ordered_and_non_overlapping() -> None:
    text = "ip 10.0.0.1, mail x@y.com, tel 13812345678, key sk-proj-abcDEF1234567890abcdefGHIJ"
    matches = find_pii(text, PII_KINDS)
    assert [m.kind for m in matches] == ["ip", "email", "phone", "secret"]
    assert matches[1] == PiiMatch("email", 18, 25, "x@y.com")
    assert all(a.end <= b.start for a, b in itertools.pairwise(matches))
    assert all(text[m.start : m.end] == m.text for m in matches)


def test_kinds_select_detectors() -> None:
    text = "mail x@y.com tel 13812345678"
    assert mask_pii(text, ["phone"]) == ("mail x@y.com tel <PHONE>", {"phone": 1})
    assert mask_pii(text, []) == (text, {})
    with pytest.raises(ValueError, match="unknown PII kind"):
        find_pii(text, ["passport"])


def test_mask_counts_per_kind() -> None:
    text = "a@b.com, c@d.org, 13812345678 和 13912345678，卡 4111111111111111"
    masked, counts = mask_pii(text)
    assert masked == "<EMAIL>, <EMAIL>, <PHONE> 和 <PHONE>，卡 <BANK_CARD>"
    assert counts == {"email": 2, "phone": 2, "bank_card": 1}


# ---------------------------------------------------------------------------------------------------------
# privacy_batch


def _batch() -> dict[str, list]:
    rows = [
        make_record(
            messages=[
                {"role": "user", "content": "my mail is a@b.com and phone 13812345678"},
                {"role": "assistant", "content": "Noted: a@b.com"},
            ]
        ),
        make_record(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
        make_record(text="server 192.168.0.1 down"),
        make_record(text="nothing here"),
    ]
    return rows_batch(rows, COLUMNS)


def test_privacy_batch_masks_and_marks() -> None:
    out = privacy_batch(_batch(), PrivacyConfig())
    assert out["messages"][0][0]["content"] == "my mail is <EMAIL> and phone <PHONE>"
    assert out["messages"][0][1] == {"role": "assistant", "content": "Noted: <EMAIL>"}
    assert out["messages"][1][1]["content"] == "hello"
    assert out["text"][2:] == ["server <IP> down", "nothing here"]
    assert out["pii"] == ["email:2,phone:1", "", "ip:1", ""]
    assert out["changed_by"] == ["privacy", "", "privacy", ""]
    assert out["removed_by"] == ["", "", "", ""]
    assert out["source"] == [""] * 4  # other columns pass through


def test_privacy_batch_drop_keeps_an_earlier_reason() -> None:
    batch = _batch()
    batch["removed_by"] = ["", "", "min_chars", ""]
    batch["changed_by"] = ["fold_whitespace", "", "", "strip_html"]
    out = privacy_batch(batch, PrivacyConfig(action="drop"))
    assert out["removed_by"] == ["privacy", "", "min_chars", ""]
    assert out["changed_by"] == ["fold_whitespace,privacy", "", "", "strip_html"]
    assert out["messages"][0][1]["content"] == "Noted: <EMAIL>"  # masked under 'drop' too
    # A record the cleaner already removed is neither masked nor counted.
    assert out["text"][2] == "server 192.168.0.1 down" and out["pii"][2] == ""


def test_privacy_batch_disabled_or_limited() -> None:
    out = privacy_batch(_batch(), PrivacyConfig(enabled=False))
    assert out["messages"] == _batch()["messages"]
    assert out["pii"] == ["", "", "", ""] and out["changed_by"] == ["", "", "", ""]
    out = privacy_batch(_batch(), PrivacyConfig(detectors=["ip"]))
    assert out["pii"] == ["", "", "ip:1", ""]
    assert out["messages"][0][0]["content"] == "my mail is a@b.com and phone 13812345678"


def _metadata_batch(metadata: list[str], labels: list[str] | None = None) -> dict[str, list]:
    rows = [make_record(text="nothing here") for _ in metadata]
    batch = rows_batch(rows, COLUMNS)
    batch["metadata"] = list(metadata)
    batch["label"] = list(labels or [""] * len(metadata))
    return batch


def test_privacy_batch_masks_metadata_values_and_label() -> None:
    batch = _metadata_batch(
        ['{"customer_email": "alice@example.com", "phone": "13812345678"}', "{}"],
        ["", "bob@example.org"],
    )
    out = privacy_batch(batch, PrivacyConfig())
    assert out["metadata"] == ['{"customer_email": "<EMAIL>", "phone": "<PHONE>"}', "{}"]
    assert out["label"] == ["", "<EMAIL>"]
    assert out["pii"] == ["email:1,phone:1", "email:1"]
    assert out["changed_by"] == ["privacy", "privacy"]
    assert out["text"] == ["nothing here", "nothing here"]


def test_privacy_batch_masks_nested_integer_and_secret_metadata() -> None:
    metadata = (
        '{"contact": {"tel": 13812345678, "name": "Li"}, "api_key": "abcd1234efgh5678", '
        '"tags": ["a@b.com", "vip"], "score": 0.5, "ok": true, "n": 7, "password_hint": "my dog\'s name"}'
    )
    out = privacy_batch(_metadata_batch([metadata]), PrivacyConfig())
    assert out["metadata"] == [
        '{"api_key": "<SECRET>", "contact": {"name": "Li", "tel": "<PHONE>"}, "n": 7, "ok": true, '
        '"password_hint": "my dog\'s name", "score": 0.5, "tags": ["<EMAIL>", "vip"]}'
    ]
    assert out["pii"] == ["email:1,phone:1,secret:1"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        # Escapes: in the JSON text the number follows 'n' (of '\n') and the '@' is '\u0040'.
        ('{"note": "call\\n13812345678"}', '{"note": "call\\n<PHONE>"}'),
        ('{"email": "alice\\u0040example.com"}', '{"email": "<EMAIL>"}'),
        ('{"user": "\\u5f20\\u4e09", "mail": "zs@example.cn"}', '{"mail": "<EMAIL>", "user": "张三"}'),
        ("not json: alice@example.com", "not json: <EMAIL>"),  # masked as text, nothing leaks
    ],
)
def test_privacy_batch_metadata_with_escapes_or_not_json(metadata: str, expected: str) -> None:
    out = privacy_batch(_metadata_batch([metadata]), PrivacyConfig())
    assert out["metadata"] == [expected]
    assert out["pii"][0] in ("phone:1", "email:1")


def test_privacy_batch_metadata_without_pii_is_left_as_written() -> None:
    metadata = ['{"z": 1, "a": "https://example.com/a?b=1", "id": "20240101123456"}', "", "{}"]
    out = privacy_batch(_metadata_batch(metadata, ["positive", "", "负面"]), PrivacyConfig())
    assert out["metadata"] == metadata  # not re-serialised (the keys stay unsorted)
    assert out["label"] == ["positive", "", "负面"]
    assert out["pii"] == ["", "", ""] and out["changed_by"] == ["", "", ""]


def test_privacy_batch_drop_on_a_find_in_metadata_or_label() -> None:
    batch = _metadata_batch(['{"ip": "10.1.2.3"}', "{}", '{"ip": "10.1.2.3"}'], ["", "13812345678", ""])
    batch["removed_by"] = ["", "", "max_chars"]
    out = privacy_batch(batch, PrivacyConfig(action="drop"))
    assert out["removed_by"] == ["privacy", "privacy", "max_chars"]
    assert out["metadata"] == ['{"ip": "<IP>"}', "{}", '{"ip": "10.1.2.3"}']  # removed earlier: untouched
    assert out["label"] == ["", "<PHONE>", ""]
    out = privacy_batch(batch, PrivacyConfig(detectors=["email"]))
    assert out["pii"] == ["", "", ""] and out["metadata"] == batch["metadata"]
