"""Session-wide fixtures: a reduced offline base model built once, and isolated logging."""

from __future__ import annotations

from pathlib import Path

import pytest

from seektune.config import BaseBuildConfig
from support import TINY_RECIPE


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the reduced base, built once per test session."""
    from seektune.models.tiny import ensure_base

    cache = tmp_path_factory.mktemp("seektune-cache")
    ensure_base(BaseBuildConfig(**TINY_RECIPE), cache)
    return cache


@pytest.fixture(autouse=True)
def _isolated_logging():
    yield
    from seektune.logs import reset_logging

    reset_logging()
