"""Opening the registry database: SQLite by default, any SQLAlchemy URL; migrations; transactions.

SQLAlchemy talks to the database and Alembic migrates it (`migrations/`); what is ours is the opening
protocol, because a registry must never be half-migrated or written by two processes in a muddle:
- SQLite runs in WAL mode (readers never block the writer) with a busy timeout, and every write
  transaction starts with `BEGIN IMMEDIATE`, so two processes registering at once take turns instead of
  failing half-way ("database is locked" on the upgrade of a read lock); PostgreSQL takes an advisory lock
  for migrations and row locks for the writes that need them (`RegistryStore.write`).
- Opening checks what the file is before anything is written: not a SQLite file at all, a database of
  another program (tables but no seektune revision), or one written by a newer seektune: each a clear
  message. An empty database, or one at an older revision, is migrated to `HEAD_REVISION` inside one
  transaction, so concurrent openers wait for the first and find it done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session

from seektune.errors import UserError
from seektune.registry.models import HEAD_REVISION

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.db"
ARTEFACTS_DIR = "artefacts"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 60.0
# Any constant: the key PostgreSQL's advisory lock serialises migrations of the registry on.
_PG_MIGRATION_LOCK = 7_302_011_905
_MIGRATIONS = Path(__file__).parent / "migrations"


def default_registry_dir() -> Path:
    """The user's data directory for seektune (e.g. ~/.local/share/seektune on Linux)."""
    from platformdirs import user_data_path

    return user_data_path("seektune", appauthor=False)


def registry_url(url: str | None) -> str:
    """`url`, or the SQLite file in the user's data directory when None."""
    return url or f"sqlite:///{default_registry_dir() / REGISTRY_FILE}"


def artefact_root(url: str, artefact_dir: Path | None) -> Path:
    """Where registered artefacts are kept: `artefact_dir`, else beside a SQLite file, else the user's
    data directory."""
    if artefact_dir is not None:
        return Path(artefact_dir).expanduser()
    parsed = _parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database).expanduser().parent / ARTEFACTS_DIR
    return default_registry_dir() / ARTEFACTS_DIR


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except sa_exc.ArgumentError:
        raise UserError(
            f"registry.url {url!r} is not a database URL: give e.g. sqlite:////path/registry.db or "
            "postgresql+psycopg://user@host/db (or leave it unset for the file in your data directory)"
        ) from None


class RegistryStore:
    """An open, migrated registry database and its artefact folder."""

    def __init__(self, engine: Engine, url: str, artefacts: Path) -> None:
        self.engine = engine
        self.url = url
        self.artefacts = artefacts

    @property
    def shown_url(self) -> str:
        """The URL with any password hidden, for messages."""
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction: everything in it is committed together or not at all.

        SQLite: `BEGIN IMMEDIATE` takes the write lock first, so concurrent writers queue (up to the busy
        timeout) instead of reading, then failing to write."""
        with self._session(immediate=True) as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in one read transaction (a consistent snapshot)."""
        with self._session(immediate=False) as session:
            yield session

    @contextmanager
    def _session(self, immediate: bool) -> Iterator[Session]:
        with _database_errors(self.shown_url), self.engine.connect() as conn:
            conn.execution_options(seektune_immediate=immediate)
            with conn.begin():
                session = Session(bind=conn, expire_on_commit=False, autoflush=True)
                try:
                    yield session
                    session.flush()
                finally:
                    session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(url: str | None, artefact_dir: Path | None = None) -> RegistryStore:
    """Open (creating and migrating when needed) the registry at `url` (None: the default file)."""
    url = registry_url(url)
    parsed = _parse_url(url)
    shown = parsed.render_as_string(hide_password=True)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _check_sqlite_file(parsed)
    try:
        engine = create_engine(url, **({"connect_args": {"timeout": BUSY_TIMEOUT_S}} if is_sqlite else {}))
    except (sa_exc.NoSuchModuleError, ImportError) as exc:
        raise UserError(
            f"registry.url {shown}: the database driver is not installed ({exc}): install it, e.g. "
            "pip install 'psycopg[binary]' for postgresql+psycopg://"
        ) from None
    if is_sqlite:
        _sqlite_transactions(engine)
    store = RegistryStore(engine, url, artefact_root(url, artefact_dir))
    _migrate(store)
    return store


def _check_sqlite_file(parsed: URL) -> None:
    """A SQLite URL's file: its folder is created; an existing non-empty file must be a SQLite file."""
    database = parsed.database
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    if path.is_dir():
        raise UserError(f"registry database {path} is a folder: give the path of a file (registry.db)")
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
        if head != SQLITE_MAGIC:
            raise UserError(
                f"registry database {path} is not a SQLite database (corrupt, or another kind of file): "
                "restore it from a backup, or point registry.url at another file"
            )
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the registry's folder {path.parent}: {exc.strerror}") from None


def _sqlite_transactions(engine: Engine) -> None:
    """WAL, a busy timeout, foreign keys, and SQLAlchemy (not sqlite3) emitting BEGIN [IMMEDIATE]."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and str(mode[0]).lower() not in ("wal", "memory"):
            logger.warning("the registry database could not switch to WAL mode (%s)", mode[0])
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("seektune_immediate", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def _database_errors(shown: str) -> Iterator[None]:
    """The database's own failures as one line each (a bug in a query still raises as it is)."""
    try:
        yield
    except sa_exc.OperationalError as exc:
        reason = str(exc.orig) if exc.orig is not None else str(exc)
        if "locked" in reason or "busy" in reason:
            raise UserError(
                f"the registry {shown} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s: try "
                "again when it has finished"
            ) from None
        raise UserError(f"the registry {shown} cannot be used: {reason.splitlines()[0]}") from None
    except sa_exc.DatabaseError as exc:
        reason = str(exc.orig) if exc.orig is not None else str(exc)
        raise UserError(
            f"the registry {shown} cannot be read ({reason.splitlines()[0]}): is it corrupt? Restore it "
            "from a backup, or point registry.url at another file"
        ) from None


def _migrate(store: RegistryStore) -> None:
    """Bring the database to HEAD_REVISION, or refuse one that is not a seektune registry or is newer."""
    with _database_errors(store.shown_url), store.engine.connect() as conn:
        conn.execution_options(seektune_immediate=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            tables = set(inspect(conn).get_table_names())
            current = _revision(conn) if "alembic_version" in tables else None
            if current == HEAD_REVISION:
                return
            if current is None and tables:
                shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
                raise UserError(
                    f"{store.shown_url} is not a seektune registry (it holds other tables: {shown}): point "
                    "registry.url at another database, or at a new file"
                )
            if current is not None and current not in _known_revisions():
                raise UserError(
                    f"the registry {store.shown_url} was written by a newer seektune (schema revision "
                    f"{current}; this one knows up to {HEAD_REVISION}): upgrade seektune"
                )
            _upgrade(conn)
            logger.debug(  # not worth a line on a user's terminal: a first use is a migration too
                "registry %s migrated from %s to %s", store.shown_url, current or "empty", HEAD_REVISION
            )


def _revision(conn: Connection) -> str | None:
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def _alembic_config(conn: Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _upgrade(conn: Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(conn), "head")
