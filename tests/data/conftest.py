"""The reduced base's tokenizer, shared by the data tests."""

import pytest
from transformers import AutoTokenizer

from seektune.config import BaseBuildConfig
from seektune.models.tiny import base_dir
from support import TINY_RECIPE


@pytest.fixture(scope="session")
def tokenizer(base_cache):
    return AutoTokenizer.from_pretrained(base_dir(BaseBuildConfig(**TINY_RECIPE), base_cache))
