"""Data stage: formats, loading errors, the built-in task and its split, tokenisation with EOS in the loss."""

import copy
import json

import pytest
from transformers import AutoTokenizer

from seektune.config import BaseBuildConfig, DataConfig
from seektune.data import stdlib_docs
from seektune.data.formats import to_messages
from seektune.data.prepare import IGNORE_INDEX, encode_chat, prepare_data
from seektune.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(base_cache):
    from seektune.models.tiny import base_dir
    from support import TINY_RECIPE

    return AutoTokenizer.from_pretrained(base_dir(BaseBuildConfig(**TINY_RECIPE), base_cache))


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Q", "input": "", "output": "A"},
        {"prompt": "Q", "completion": "A"},
        {"question": "Q", "answer": "A"},
    ],
)
def test_every_shape_becomes_the_same_chat(record):
    assert to_messages(record) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_alpaca_input_is_appended_and_unknown_shapes_are_none():
    assert to_messages({"instruction": "Do", "input": "this", "output": "ok"})[0]["content"] == "Do\n\nthis"
    assert to_messages({"text": "raw"}) is None
    assert to_messages({"messages": [{"role": "wizard", "content": "x"}]}) is None


def test_only_answers_are_learnt_and_they_end_with_eos(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."},
    ]
    encoded, _ = encode_chat(messages, tokenizer, max_length=256, system_prompt="Be brief.")
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[0] == tokenizer.bos_token_id
    assert labels[-1] == tokenizer.eos_token_id
    learnt = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert learnt == "Four.<｜end▁of▁sentence｜>Six.<｜end▁of▁sentence｜>"
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], tokenize=False
    )
    assert tokenizer.decode(ids) == full  # turn-by-turn tokenisation equals the template's rendering


def test_long_and_answerless_examples_are_dropped_with_reasons(tokenizer):
    assert encode_chat([{"role": "user", "content": "hi"}], tokenizer, 256)[1] == "no_answer"
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    assert encode_chat(long, tokenizer, 64) == (None, "too_long")


def test_builtin_split_is_fixed_and_held_out_of_pretraining():
    units = stdlib_docs.collect_units()
    held_out = {u.key for u in units if u.split in {"validation", "test"}}
    assert held_out and len(held_out) < len(units) / 5
    corpus = stdlib_docs.pretraining_texts(units)
    titles = {text.split("\n\n", 1)[0] for text in corpus}
    assert not any(u.title in titles for u in units if u.split == "test")
    test = stdlib_docs.qa_examples("test", units)
    train_sources = {r["source"] for r in stdlib_docs.qa_examples("train", units)}
    assert test and not {r["source"] for r in test} & train_sources
    train_answers = {r["messages"][1]["content"] for r in stdlib_docs.qa_examples("train", units)}
    assert not {r["messages"][1]["content"] for r in test} & train_answers  # no shared docstring leaks
    assert stdlib_docs.split_of("json.dumps") == stdlib_docs.split_of("json.dumps")


def test_first_paragraph_skips_signatures_and_cuts_at_a_sentence():
    text = "dumps(obj) -> str\n\nSerialize obj to a JSON formatted str. " + "More words here. " * 40
    answer = stdlib_docs.first_paragraph(text)
    assert answer.startswith("Serialize obj")
    assert answer.endswith(".") and len(answer) <= 320


def test_user_jsonl_is_split_by_ratio_and_fingerprinted(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is item {i}?", "answer": f"Item {i} is a thing."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[{"path": str(path)}], validation_ratio=0.1, test_ratio=0.2)
    first = prepare_data(cfg, tokenizer, seed=1, out_dir=tmp_path / "out")
    assert first.report["splits"] == {"train": 28, "validation": 4, "test": 8}
    assert (tmp_path / "out" / "test.jsonl").read_text().count("\n") == 8
    assert prepare_data(cfg, tokenizer, seed=1).report["fingerprint"] == first.report["fingerprint"]
    assert prepare_data(cfg, tokenizer, seed=2).report["fingerprint"] != first.report["fingerprint"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"question": "a", "answer": "b"}\n{oops\n', "line 2: not valid JSON"),
        ("none.jsonl", '{"text": "raw"}\n', "no usable records"),
        ("data.csv", "a,b\n", "unsupported file type"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_data(DataConfig(sources=[{"path": str(path)}]), tokenizer, seed=0)


def test_missing_file_and_unknown_builtin(tokenizer, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(DataConfig(sources=[{"path": str(tmp_path / "x.jsonl")}]), tokenizer, seed=0)
    with pytest.raises(UserError, match="unknown built-in dataset"):
        prepare_data(DataConfig(sources=[{"path": "builtin:nope"}]), tokenizer, seed=0)


# DeepSeek-R1's own template shape: the generation prompt opens a <think> block, and past answers lose
# their reasoning.
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def test_r1_style_template_still_learns_the_answers(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = R1_TEMPLATE
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>add</think>Four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."},
    ]
    encoded, reason = encode_chat(messages, tokenizer, max_length=256)
    assert reason == ""
    learnt = [
        t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    assert tokenizer.decode(learnt) == "Four.<｜end▁of▁sentence｜>Six.<｜end▁of▁sentence｜>"


def test_tiny_files_keep_a_test_example(tmp_path, tokenizer):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(5)))
    prepared = prepare_data(DataConfig(sources=[{"path": str(path)}]), tokenizer, seed=0)
    assert prepared.report["splits"] == {"train": 3, "validation": 1, "test": 1}


def test_non_utf8_file_is_a_user_error(tmp_path, tokenizer):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps({"prompt": "你好", "completion": "世界"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare_data(DataConfig(sources=[{"path": str(path)}]), tokenizer, seed=0)
