"""An empty registry per test."""

from __future__ import annotations

import pytest

from seektune.registry.store import open_store


@pytest.fixture
def store(tmp_path):
    opened = open_store(f"sqlite:///{tmp_path / 'reg' / 'registry.db'}")
    yield opened
    opened.dispose()
