"""Augmentation: each text operation (seeded), synonym files, dataset plumbing, back-translation."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from seektune.config import AugmentConfig
from seektune.data.augment import (
    augment_dataset,
    back_translate,
    load_synonyms,
    load_translator,
    looks_like_code,
    random_delete,
    random_insert,
    random_swap,
    reorder_paragraphs,
    synonym_replace,
)
from seektune.data.records import COLUMNS, RECORD_FEATURES, make_record, rows_batch
from seektune.errors import UserError

FOX = "The quick brown fox jumps over the lazy dog."
WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"),
    *("hotel", "india", "juliet", "kilo", "lima", "mike", "november"),
]


def _rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


# ---------------------------------------------------------------------------------------------------------
# Single-text operations


def test_swap_exchanges_words_and_leaves_punctuation() -> None:
    assert random_swap(FOX, 0.2, _rng()) == "The quick brown fox jumps over dog lazy the."


def test_delete_removes_words_and_their_space() -> None:
    assert random_delete(FOX, 0.3, _rng()) == "The quick brown jumps over the lazy dog."
    assert random_delete("Hello, big world", 0.99, _rng(3)).count(" ") <= 1
    assert random_delete("one", 0.5, _rng()) == "one"


def test_insert_uses_synonyms_a_vocabulary_or_the_texts_own_words() -> None:
    synonyms = {"quick": ["fast"], "lazy": ["idle"]}
    assert random_insert(FOX, synonyms, 0.1, _rng()) == "idle The quick brown fox jumps over the lazy dog."
    assert (
        random_insert(FOX, ["red", "blue"], 0.1, _rng())
        == "The quick brown fox jumps over blue the lazy dog."
    )
    assert random_insert(FOX, None, 0.1, _rng()) == "The quick brown fox jumps over the the lazy dog."


def test_synonym_replace_keeps_case() -> None:
    synonyms = {"the": ["a"], "quick": ["fast", "speedy"], "lazy": ["idle"]}
    assert synonym_replace(FOX, synonyms, 0.3, _rng()) == "The speedy brown fox jumps over the idle dog."
    assert synonym_replace("THE QUICK fox", {"the": ["a"], "quick": ["fast"]}, 1.0, _rng()) == "A FAST fox"
    assert synonym_replace(FOX, {"cat": ["kitten"]}, 0.5, _rng()) == FOX


def test_reorder_paragraphs_then_sentences() -> None:
    paragraphs = "First paragraph.\n\nSecond one.\n\nThird one."
    assert reorder_paragraphs(paragraphs, _rng()) == "First paragraph.\n\nThird one.\n\nSecond one."
    assert reorder_paragraphs("One. Two! Three?", _rng(1)) == "Two! Three? One."
    assert reorder_paragraphs("Only one sentence here.", _rng(1)) == "Only one sentence here."
    # a shuffle that happens to keep the order is rotated: the result always differs
    assert all(reorder_paragraphs("A. B.", _rng(seed)) == "B. A." for seed in range(6))


def test_chinese_words_come_from_jieba_and_rejoin_without_spaces() -> None:
    assert random_swap("我爱北京天安门", 0.2, _rng()) == "我天安门北京爱"
    assert random_insert("我爱北京天安门", {"北京": ["首都"]}, 0.2, _rng()) == "首都我爱北京天安门"
    assert random_delete("我爱北京天安门", 0.3, _rng(1)) == "爱北京"
    assert synonym_replace("我爱北京天安门", {"北京": ["首都"]}, 0.3, _rng(1)) == "我爱首都天安门"
    assert reorder_paragraphs("我爱北京天安门。今天天气很好！", _rng()) == "今天天气很好！我爱北京天安门。"


def test_code_is_never_edited() -> None:
    text = "Call os.path.join(a, b) then `x = f(y)` and see https://docs.python.org/3/ for more details now"
    protected = ("os.path.join(a, b)", "`x = f(y)`", "https://docs.python.org/3/")
    for seed in range(20):
        for changed in (
            random_swap(text, 0.5, _rng(seed)),
            random_delete(text, 0.5, _rng(seed)),
            random_insert(text, None, 0.5, _rng(seed)),
        ):
            assert all(piece in changed for piece in protected), changed
    assert (
        reorder_paragraphs("Intro.\n\n```\na = 1\n\nb = 2\n```", _rng())
        == "Intro.\n\n```\na = 1\n\nb = 2\n```"
    )


def test_looks_like_code() -> None:
    assert looks_like_code("def f(x):\n    return {x: [x * 2]}")
    assert looks_like_code("for (i = 0; i < n; i++) { sum += a[i]; }")
    assert not looks_like_code("What does the Python reference say about the assert statement (briefly)?")
    assert not looks_like_code("Structure of a program\n======================\n**Source code:** Lib/pdb.py")
    assert not looks_like_code("Look at this:\n```python\nprint({1: [2]})\n```")


# ---------------------------------------------------------------------------------------------------------
# Synonym dictionaries


def test_load_synonyms_json_and_lines(tmp_path: Path) -> None:
    json_file = tmp_path / "syn.json"
    json_file.write_text('{"Quick": ["fast", "speedy"], "北京": ["首都"]}', encoding="utf-8")
    assert load_synonyms(json_file) == {"quick": ["fast", "speedy"], "北京": ["首都"]}
    lines = tmp_path / "syn.txt"
    lines.write_text("# word synonyms\nquick fast speedy\n\nquick rapid fast\n北京 首都\n", encoding="utf-8")
    assert load_synonyms(lines) == {"quick": ["fast", "speedy", "rapid"], "北京": ["首都"]}


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.json", None, "cannot read"),
        ("bad.json", '{"quick": ["fast",', "is not valid JSON (line 1"),
        ("list.json", '["fast"]', "must hold a JSON object"),
        ("value.json", '{"quick": "fast"}', "synonyms of 'quick' must be a list of strings"),
        ("lonely.txt", "quick fast\nslow\n", "line 2 has a word without synonyms"),
        ("empty.txt", "# nothing\n", "holds no synonyms"),
    ],
)
def test_load_synonyms_errors_name_the_key(
    tmp_path: Path, name: str, content: str | None, fragment: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.augment\.synonyms") as caught:
        load_synonyms(path)
    assert fragment in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# Datasets


def _chat_dataset(n: int = 20) -> Dataset:
    rows = []
    for i in range(n):
        question = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8)) + "?"
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3, 9)) + "."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append(make_record(messages=messages, source="s", origin=f"f.jsonl:{i + 1}", split="train"))
    return Dataset.from_dict(rows_batch(rows, COLUMNS), features=RECORD_FEATURES)


def _config(**fields) -> AugmentConfig:
    return AugmentConfig(**{"enabled": True, "methods": ["swap", "insert"], "share": 0.5, **fields})


def test_share_and_copies_give_the_counts_and_marks() -> None:
    train = _chat_dataset(20)
    new = augment_dataset(train, _config(copies=2), seed=7)
    assert new.features == RECORD_FEATURES
    assert len(new) == 20  # 10 chosen records x 2 copies; swap and insert always change a text
    assert Counter(new["augmented"]) == {"swap": 10, "insert": 10}
    assert set(new["split"]) == {"train"}
    originals = Counter(origin.rsplit("+", 1)[0] for origin in new["origin"])
    assert len(originals) == 10 and set(originals.values()) == {2}
    assert all(
        origin.endswith("+" + method) for origin, method in zip(new["origin"], new["augmented"], strict=True)
    )
    by_origin = {row["origin"]: row for row in train}
    for row in new:
        original = by_origin[row["origin"].rsplit("+", 1)[0]]
        assert row["messages"][0]["content"] != original["messages"][0]["content"]
        assert row["messages"][1] == original["messages"][1]  # apply_to='user': answers untouched


def test_same_seed_same_records_other_seed_other_records() -> None:
    train = _chat_dataset(20)
    first = augment_dataset(train, _config(), seed=1).to_list()
    assert first == augment_dataset(train, _config(), seed=1).to_list()
    assert first != augment_dataset(train, _config(), seed=2).to_list()


def test_apply_to_chooses_the_messages() -> None:
    train = _chat_dataset(6)
    by_origin = {row["origin"]: row for row in train}
    for apply_to, changes in (("assistant", (False, True)), ("all", (True, True))):
        new = augment_dataset(train, _config(share=1.0, methods=["insert"], apply_to=apply_to), seed=0)
        assert len(new) == 6
        for row in new:
            original = by_origin[row["origin"].removesuffix("+insert")]
            changed = tuple(
                a["content"] != b["content"]
                for a, b in zip(row["messages"], original["messages"], strict=True)
            )
            assert changed == changes


def test_text_records_change_and_no_op_copies_are_not_emitted() -> None:
    rows = [
        make_record(text="Alpha bravo charlie delta.", origin="t:1"),
        make_record(text="Solo.", origin="t:2"),
    ]
    rows.append(make_record(text="x = f(a[0]); y = {b: c}", origin="t:3"))  # code: left alone
    cfg = _config(share=1.0, methods=["swap"])
    new = augment_dataset(Dataset.from_list(rows, features=RECORD_FEATURES), cfg, seed=0)
    assert new["origin"] == ["t:1+swap"]  # "Solo." cannot be swapped, t:3 looks like code
    assert new["text"][0] != "Alpha bravo charlie delta." and sorted(new["text"][0][:-1].split()) == sorted(
        ["Alpha", "bravo", "charlie", "delta"]
    )


def test_chinese_records_and_synonym_file(tmp_path: Path) -> None:
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("北京 首都\n天气 气候\n", encoding="utf-8")
    messages = [{"role": "user", "content": "我爱北京天安门"}, {"role": "assistant", "content": "好的"}]
    train = Dataset.from_list([make_record(messages=messages, origin="z:1")], features=RECORD_FEATURES)
    cfg = _config(share=1.0, copies=2, methods=["synonym", "swap"], synonyms=synonyms)
    new = augment_dataset(train, cfg, seed=0)
    assert new["augmented"] == ["synonym", "swap"]
    assert new["messages"][0][0]["content"] == "我爱首都天安门"
    assert " " not in new["messages"][1][0]["content"]


def test_only_training_records_are_taken() -> None:
    rows = [make_record(text="alpha bravo charlie", origin="v:1", split="validation")]
    with pytest.raises(ValueError, match="training records only"):
        augment_dataset(Dataset.from_dict(rows_batch(rows, COLUMNS), features=RECORD_FEATURES), _config(), 0)


def test_disabled_or_empty_gives_no_records() -> None:
    assert len(augment_dataset(_chat_dataset(4), AugmentConfig(enabled=False), seed=0)) == 0
    empty = augment_dataset(_chat_dataset(0), _config(), seed=0)
    assert len(empty) == 0 and empty.features == RECORD_FEATURES


# ---------------------------------------------------------------------------------------------------------
# Back-translation with a tiny random seq2seq model


@pytest.fixture(scope="module")
def tiny_translator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BART with a word-level tokenizer trained on the test words, saved to a folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-translator")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [" ".join(WORDS), "? ."], trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(folder)
    config = BartConfig(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    # random weights would end at once; at least two ordinary words per line make every copy differ
    model.generation_config.min_new_tokens = 2
    model.generation_config.suppress_tokens = [0, 1, 3]
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def one_torch_thread():
    """A 16-wide model runs fastest on one thread; several spin for nothing on a busy shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_back_translate_returns_one_text_per_input_and_keeps_layout(tiny_translator: Path) -> None:
    model = load_translator(str(tiny_translator))
    texts = ["alpha bravo charlie", "delta echo\n\n  foxtrot golf", ""]
    first = back_translate(texts, model, model, batch_size=2)
    assert len(first) == 3 and first[2] == ""
    assert first[1].count("\n") == 2 and first[1].split("\n")[2].startswith("  ")
    assert first == back_translate(texts, str(tiny_translator), str(tiny_translator))  # greedy: deterministic


@pytest.mark.usefixtures("one_torch_thread")
def test_back_translation_records_are_marked_and_deterministic(tiny_translator: Path) -> None:
    train = _chat_dataset(4)
    cfg = _config(
        share=1.0,
        methods=["back_translation", "swap"],
        translation_model=str(tiny_translator),
        back_translation_model=str(tiny_translator),
    )
    new = augment_dataset(train, cfg, seed=3)
    assert Counter(new["augmented"]) == {"back_translation": 2, "swap": 2}
    assert all(
        o.endswith("+back_translation")
        for o, m in zip(new["origin"], new["augmented"], strict=True)
        if m != "swap"
    )
    assert new.to_list() == augment_dataset(train, cfg, seed=3).to_list()


def test_translation_models_that_cannot_be_used_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.augment.back_translation_model: cannot load"):
        load_translator(str(tmp_path / "absent"), "data.augment.back_translation_model")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)).save_pretrained(
        tmp_path / "gpt"
    )
    with pytest.raises(UserError, match="is not an encoder-decoder model"):
        load_translator(str(tmp_path / "gpt"))
