"""Session-wide fixtures: a reduced offline base model built once, and isolated logging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from seektune.config import BaseBuildConfig
from support import TINY_RECIPE


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the reduced base, built once per test session.

    SEEKTUNE_TEST_BASE_CACHE names a folder to keep it in between sessions (for quick local reruns;
    CI builds it afresh).
    """
    from seektune.models.tiny import ensure_base

    kept = os.environ.get("SEEKTUNE_TEST_BASE_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("seektune-cache")
    ensure_base(BaseBuildConfig(**TINY_RECIPE), cache)
    return cache


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache folder for the full-size default base: the first test that runs the quickstart's
    model builds it there from scratch (as a fresh machine would), the later ones reuse it."""
    return tmp_path_factory.mktemp("quickstart-cache")


@pytest.fixture(autouse=True)
def _own_registry(tmp_path, monkeypatch):
    """Every test's CLI registry is a file of its own, never the user's (SEEKTUNE_REGISTRY_URL)."""
    monkeypatch.setenv("SEEKTUNE_REGISTRY_URL", f"sqlite:///{tmp_path / 'registry' / 'registry.db'}")


@pytest.fixture(autouse=True)
def _isolated_logging():
    yield
    from seektune.logs import reset_logging

    reset_logging()
