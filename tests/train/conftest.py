"""Fixtures of the training tests: the tiny tokenizer and Llama of `tinymodels`."""

from __future__ import annotations

import pytest
from tinymodels import llama, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama():
    return llama()
