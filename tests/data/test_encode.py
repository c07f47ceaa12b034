"""Tokenisation: only answers are learnt and end with EOS, templates that rewrite turns, truncation,
the `train_on` choice and documents cut into windows."""

import copy

from seektune.data.encode import IGNORE_INDEX, encode_chat, encode_text, tokenize_batch


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


CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


def _learnt(tokenizer, encoded):
    pairs = zip(encoded["input_ids"], encoded["labels"], strict=True)
    return tokenizer.decode([t for t, lab in pairs if lab != IGNORE_INDEX])


def test_train_on_chooses_the_learnt_tokens(tokenizer):
    last, _ = encode_chat(CHAT, tokenizer, 256, train_on="last_assistant")
    assert _learnt(tokenizer, last) == "Six.<｜end▁of▁sentence｜>"
    everything, _ = encode_chat(CHAT, tokenizer, 256, train_on="all")
    assert everything["labels"][0] == IGNORE_INDEX  # the first token is never a target
    assert everything["labels"][1:] == everything["input_ids"][1:]


def test_truncation_keeps_the_start_or_drops(tokenizer):
    whole, _ = encode_chat(CHAT, tokenizer, 256)
    limit = len(whole["input_ids"]) - 2
    assert encode_chat(CHAT, tokenizer, limit) == (None, "too_long")
    cut, reason = encode_chat(CHAT, tokenizer, limit, truncation="truncate")
    assert reason == "truncated" and cut["input_ids"] == whole["input_ids"][:limit]
    # cut before the first answer: nothing left to learn, so it is dropped even when truncating
    assert encode_chat(CHAT, tokenizer, 4, truncation="truncate") == (None, "too_long")


def test_documents_become_windows_learnt_whole(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    windows = encode_text(text, tokenizer, 32)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for w in windows for t in w["input_ids"]] == [
        tokenizer.bos_token_id,
        *ids,
        tokenizer.eos_token_id,
    ]
    assert all(len(w["input_ids"]) <= 32 and w["labels"][0] == IGNORE_INDEX for w in windows)
    assert all(w["labels"][1:] == w["input_ids"][1:] for w in windows)


def test_tokenize_batch_marks_drops_and_keeps_documents_aligned_when_asked(tokenizer):
    batch = {
        "messages": [CHAT, [{"role": "user", "content": "hi"}], []],
        "text": ["", "", "word " * 100],
        "source": ["a", "a", "b"],
    }
    train = tokenize_batch(batch, [10, 11, 12], tokenizer, 32)
    assert train["drop_reason"][:2] == ["", "no_answer"]
    assert len(train["input_ids"]) > 3 and set(train["record_index"][2:]) == {12}
    held_out = tokenize_batch(batch, [10, 11, 12], tokenizer, 32, windows=False)
    assert held_out["record_index"] == [10, 11, 12]
    assert held_out["truncated"] == [False, False, True] and held_out["drop_reason"][2] == ""
    short = tokenize_batch(batch, None, tokenizer, 256, min_tokens=1000)
    assert short["drop_reason"] == ["too_short", "no_answer", "too_short"]


def test_turns_after_the_last_answer_are_left_out(tokenizer):
    trailing = [*CHAT, {"role": "user", "content": "And 4+4?"}]
    encoded, reason = encode_chat(trailing, tokenizer, 256)
    assert reason == "" and encoded == encode_chat(CHAT, tokenizer, 256)[0]
    assert "4+4" not in tokenizer.decode(encoded["input_ids"])
