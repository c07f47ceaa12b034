"""The built-in task: a fixed split held out of the base's pre-training, answers cut at sentences."""

from seektune.data import stdlib_docs


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
