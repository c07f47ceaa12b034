"""Opening the registry: migrations from an empty database, and what is refused before anything is written."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from seektune.errors import UserError
from seektune.registry.models import HEAD_REVISION, Base
from seektune.registry.store import _alembic_config, artefact_root, open_store, registry_url


def test_an_empty_database_is_migrated_to_the_schema_of_the_models(tmp_path):
    path = tmp_path / "new" / "registry.db"
    store = open_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD_REVISION,)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store.engine.connect() as conn:  # the migrations create exactly what the ORM classes describe
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    assert heads == [HEAD_REVISION]
    open_store(f"sqlite:///{path}").dispose()  # a second open finds it migrated
    store.dispose()


def test_reopening_a_registry_keeps_its_rows(tmp_path):
    path = tmp_path / "registry.db"
    open_store(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO registered_models (name, created_at) VALUES ('kept', '2026-01-01')")
    open_store(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM registered_models").fetchall() == [("kept",)]


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database at all" * 10)
    with pytest.raises(UserError, match=r"is not a SQLite database"):
        open_store(f"sqlite:///{path}")
    assert path.read_bytes().startswith(b"this is not")


def test_a_corrupt_sqlite_file_is_one_message(tmp_path):
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE x (a)")
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the header survives, the schema page does not
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot (be read|be used)"):
        open_store(f"sqlite:///{path}")


def test_a_database_of_another_program_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(UserError, match=r"not a seektune registry \(it holds other tables: invoices\)"):
        open_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:  # nothing was added to it
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"invoices"}


def test_a_registry_from_a_newer_seektune_is_refused(tmp_path):
    path = tmp_path / "registry.db"
    open_store(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(UserError, match=r"written by a newer seektune.*9999"):
        open_store(f"sqlite:///{path}")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "is not a database URL"),
        ("nosuchdb://host/x", "database driver is not installed|is not a database URL"),
    ],
)
def test_unusable_urls_are_one_message(url, expected):
    with pytest.raises(UserError, match=expected):
        open_store(url)


def test_a_folder_is_not_a_database_file(tmp_path):
    with pytest.raises(UserError, match=r"is a folder"):
        open_store(f"sqlite:///{tmp_path}")


def test_defaults_live_in_the_user_data_directory_and_artefacts_beside_the_file(tmp_path):
    assert registry_url(None).endswith("/registry.db") and registry_url(None).startswith("sqlite:///")
    assert artefact_root(f"sqlite:///{tmp_path}/r.db", None) == tmp_path / "artefacts"
    assert artefact_root("postgresql://h/db", tmp_path / "shared") == tmp_path / "shared"
