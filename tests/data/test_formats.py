"""Record shapes: each one becomes the record schema's messages / text / metadata / label."""

import json
import re

import pytest

from seektune.data.formats import InvalidRecord, MissingField, has_answer, to_messages, to_record_fields

QA = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Q", "input": "", "output": "A"},
        {"context": "Q", "response": "A"},
        {"prompt": "Q", "completion": "A"},
        {"question": "Q", "answer": "A"},
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, QA[1]]},
    ],
)
def test_every_conversation_shape_becomes_the_same_chat(row):
    assert to_messages(row) == QA
    assert to_record_fields(row, {}) == (QA, "", {}, "", "")


def test_alpaca_input_is_appended_and_unknown_shapes_are_none():
    assert to_messages({"instruction": "Do", "input": "this", "output": "ok"})[0]["content"] == "Do\n\nthis"
    assert (
        to_messages({"instruction": "", "input": "only input", "output": "ok"})[0]["content"] == "only input"
    )
    assert to_messages({"text": "raw"}) is None  # a document is no conversation
    assert to_messages({"messages": [{"role": "wizard", "content": "x"}]}) is None
    assert to_record_fields({"foo": 1, "bar": "x"}, {}) is None


def test_alpaca_with_system_and_history_in_order():
    row = {
        "system": "Be brief.",
        "history": [["1+1?", "2"], ["2+2?", "4"]],
        "instruction": "3+3?",
        "output": "6",
    }
    messages, text, _, _, _ = to_record_fields(row, {})
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "1+1?"),
        ("assistant", "2"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "3+3?"),
        ("assistant", "6"),
    ]
    assert text == ""


def test_system_column_goes_first_once():
    row = {"system": "S", "messages": QA}
    assert to_record_fields(row, {})[0] == [{"role": "system", "content": "S"}, *QA]
    already = {"system": "other", "messages": [{"role": "system", "content": "S"}, *QA]}
    assert to_record_fields(already, {})[0][0] == {"role": "system", "content": "S"}
    assert len(to_record_fields(already, {})[0]) == 3


def test_sharegpt_roles_system_column_and_chinese_text():
    row = {
        "system": "你是一个助手。",
        "conversations": [
            {"from": "human", "value": "北京是哪个国家的首都？"},
            {"from": "gpt", "value": "中国。"},
            {"from": "user", "value": "上海呢？"},
            {"from": "bot", "value": "上海不是首都。"},
        ],
    }
    messages = to_record_fields(row, {})[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "你是一个助手。" and messages[2]["content"] == "中国。"


def test_context_response_keeps_metadata_object_and_scalar_columns():
    row = {
        "context": "合同无效的情形有哪些？",
        "response": "依照民法典……",
        "metadata": {"domain": "legal", "difficulty": "hard"},
        "category": "law",
        "id": 7,
        "score": float("nan"),  # a pandas null: not a tag
        "tags": ["a", "b"],  # not a scalar
        "notes": "x" * 201,  # content, not a tag
        "empty": "",
        "label": 1,
    }
    _, _, metadata, label, _ = to_record_fields(row, {})
    assert metadata == {"domain": "legal", "difficulty": "hard", "category": "law", "id": 7}
    assert label == "1"


def test_metadata_object_wins_over_a_column_of_the_same_name_and_json_text_is_read():
    row = {"question": "Q", "answer": "A", "domain": "column", "metadata": '{"domain": "object"}'}
    assert to_record_fields(row, {})[2] == {"domain": "object"}
    assert to_record_fields({"question": "Q", "answer": "A", "metadata": "free"}, {})[2] == {
        "metadata": "free"
    }


def test_messages_as_json_text_from_a_csv_cell():
    row = {"messages": '[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]'}
    assert to_record_fields(row, {})[0] == QA
    with pytest.raises(InvalidRecord, match="not valid JSON"):
        to_record_fields({"messages": "[{oops"}, {})


def test_text_is_a_document_with_its_columns_as_metadata():
    assert to_record_fields({"text": "长文本。", "url": "https://x", "label": "news"}, {}) == (
        [],
        "长文本。",
        {"url": "https://x"},
        "news",
        "",
    )
    # A seektune record of a document (empty messages) stays a document.
    assert to_record_fields({"messages": [], "text": "doc"}, {})[:2] == ([], "doc")


def test_fields_map_the_users_columns_before_the_shape_is_recognised():
    row = {"q": "Q", "a": "A", "topic": "math", "cls": "easy"}
    fields = {"instruction": "q", "output": "a", "label": "cls"}
    assert to_record_fields(row, fields) == (QA, "", {"topic": "math"}, "easy", "")
    with pytest.raises(MissingField) as caught:
        to_record_fields({"q": "Q"}, {"instruction": "q", "output": "a"})
    assert (caught.value.field, caught.value.column, caught.value.keys) == ("output", "a", ["q"])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "turn 1 of 'messages' is dict, not text"),
        ({"messages": ["hello"]}, "turn 1 of 'messages' is not an object"),
        ({"instruction": "Q", "output": "A", "history": [["only question"]]}, "history entry 1"),
        ({"prompt": [QA[0]], "completion": "A"}, "both be text or both lists"),
        ({"messages": []}, "no turns"),
    ],
)
def test_recognised_shapes_with_bad_content_say_why(row, message):
    with pytest.raises(InvalidRecord, match=message):
        to_record_fields(row, {})


def test_numbers_become_text_and_answerless_conversations_are_kept():
    assert to_record_fields({"question": "2+2?", "answer": 4}, {})[0][1] == {
        "role": "assistant",
        "content": "4",
    }
    messages = to_record_fields({"messages": [{"role": "user", "content": "hi"}]}, {})[0]
    assert messages == [{"role": "user", "content": "hi"}]  # kept: the tokeniser counts it as no_answer
    assert not has_answer(messages)
    assert not has_answer([*messages, {"role": "assistant", "content": "  "}])
    assert has_answer(QA)


def test_column_wise_structs_from_a_classic_sequence_feature_are_lists_of_objects():
    sharegpt = {"conversations": {"from": ["human", "gpt"], "value": ["Q", "A"]}}
    assert to_record_fields(sharegpt, {}) == (QA, "", {}, "", "")
    openai = {"messages": {"role": ["user", "assistant"], "content": ["Q", "A"]}}
    assert to_messages(openai) == QA
    trl = {
        "prompt": {"role": ["user"], "content": ["Q"]},
        "completion": {"role": ["assistant"], "content": ["A"]},
    }
    assert to_messages(trl) == QA
    with pytest.raises(InvalidRecord, match="no turns"):
        to_record_fields({"conversations": {"from": [], "value": []}}, {})
    assert to_record_fields({"messages": {"role": ["user"], "content": []}}, {}) is None  # unequal: no list


def test_metadata_and_labels_that_json_cannot_hold_become_text():
    import datetime
    import decimal
    import json

    attached = {
        "day": datetime.date(2024, 5, 6),
        "at": datetime.datetime(2024, 5, 6, 7, 8, 9),
        "price": decimal.Decimal("1.50"),
        "raw": b"caf\xc3\xa9\xff",
        "nested": {"days": [datetime.date(2023, 1, 2)], "missing": float("nan")},
    }
    row = {"question": "Q", "answer": "A", "metadata": attached, "label": {"when": datetime.date(2024, 1, 2)}}
    _, _, metadata, label, _ = to_record_fields(row, {})
    assert json.loads(json.dumps(metadata, allow_nan=False)) == {
        "day": "2024-05-06",
        "at": "2024-05-06T07:08:09",
        "price": "1.50",
        "raw": "café\\xff",
        "nested": {"days": ["2023-01-02"], "missing": None},
    }
    assert label == '{"when": "2024-01-02"}'
    only = to_record_fields({"question": "Q", "answer": "A", "metadata": decimal.Decimal("2.5")}, {})
    assert only[2] == {"metadata": "2.5"}
    dated = {"question": "Q", "answer": "A", "label": datetime.datetime(2024, 1, 2, 3, 4)}
    assert to_record_fields(dated, {})[3] == "2024-01-02T03:04:00"


@pytest.mark.parametrize(("value", "label"), [(float("nan"), ""), (None, ""), (2.0, "2.0"), (False, "False")])
def test_a_null_or_nan_label_is_no_label(value, label):
    assert to_record_fields({"question": "Q", "answer": "A", "label": value}, {})[3] == label


CHOSEN = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},  # plain text (LLaMA-Factory's ranking form)
        {  # TRL's conversational form
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {  # TRL's implicit prompt: whole conversations sharing their first turns
            "chosen": CHOSEN,
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
        },
        {
            "prompt": json.dumps([{"role": "user", "content": "Q"}]),
            "chosen": "good",
            "rejected": "bad",
        },  # CSV
    ],
)
def test_every_preference_shape_becomes_the_chosen_chat_and_the_rejected_answer(row):
    assert to_record_fields(row, {}) == (CHOSEN, "", {}, "", "bad")


def test_preference_pairs_with_a_system_column_and_mapped_fields():
    row = {"q": "Q", "good": "good", "bad": "bad", "system": "S", "topic": "x"}
    messages, _, metadata, _, rejected = to_record_fields(
        row, {"prompt": "q", "chosen": "good", "rejected": "bad"}
    )
    assert messages == [{"role": "system", "content": "S"}, *CHOSEN]
    assert (metadata, rejected) == ({"topic": "x"}, "bad")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "chosen": "good"}, "needs both 'chosen' and 'rejected'; this row has no 'rejected'"),
        ({"prompt": "Q", "rejected": "bad"}, "this row has no 'chosen'"),
        (
            {"prompt": "Q", "chosen": "same", "rejected": " same "},
            "'chosen' and 'rejected' are the same answer",
        ),
        ({"prompt": "Q", "chosen": "", "rejected": "bad"}, "'chosen' must be one non-empty assistant answer"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "start with the same prompt"),
    ],
)
def test_broken_preference_rows_say_what_is_wrong(row, message):
    with pytest.raises(InvalidRecord, match=re.escape(message)):
        to_record_fields(row, {})
