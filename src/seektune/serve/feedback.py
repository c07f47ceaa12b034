"""The feedback store: what the server answered and what users thought of it, for the next training round.

With `serve.feedback.enabled` the server records every finished chat or completion choice (prompt,
answer, finish reason, the public model name the client asked for and the version that answered behind an
A/B split, the client's `user`), and `POST /v1/feedback` attaches a rating (-1, 0, 1), a corrected answer
and a comment to a response id (and choice index). `seektune data from-feedback` reads the store back as
SFT and preference datasets (`seektune.data.feedback`).

Recording never holds up a request: the request only puts a record on a bounded in-memory queue
(`put_nowait`; when the queue is full the record is dropped and counted, the answer still goes out). One
writer thread takes records off the queue in batches, masks personal data with the data stage's own
detectors (`serve.feedback.privacy`, the same `mask_pii` as `data.privacy`), and writes each batch in one
transaction. With `privacy.action: drop` a record with personal data keeps its ids, ratings and counts but
none of its text (`withheld`), so that feedback on it is still accepted and the dataset report can say why
it has no row.

A feedback request must name a response this server recorded: the ids of recent responses (queued or
written) are kept in memory, older ones are looked up in the file, on a worker thread.

Why our own code: no library records an OpenAI-compatible server's traffic for training. The store is the
standard library's sqlite3 (one local file, one writer thread, readers in WAL mode), not the registry's
SQLAlchemy: there is no team database to reach and no schema history to migrate; `PRAGMA user_version`
marks the file as ours.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.config import PrivacyConfig
from seektune.errors import UserError

logger = logging.getLogger(__name__)

FEEDBACK_FILE = "feedback.db"
SCHEMA_VERSION = 1
# `PRAGMA application_id` of a seektune feedback store ("STFB"): a SQLite file of another program is refused.
APPLICATION_ID = 0x53544642
_SQLITE_MAGIC = b"SQLite format 3\x00"
_BATCH = 256
_RECENT_IDS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    user TEXT,
    prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    finish_reason TEXT,
    withheld INTEGER NOT NULL DEFAULT 0,
    pii TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, choice)
);
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY,
    response_id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    created REAL NOT NULL,
    rating INTEGER,
    correction TEXT,
    comment TEXT,
    user TEXT,
    withheld INTEGER NOT NULL DEFAULT 0,
    pii TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback (response_id, choice);
CREATE INDEX IF NOT EXISTS responses_model ON responses (model, version);
"""


def default_feedback_store() -> Path:
    """feedback.db in seektune's user data folder (beside the default registry)."""
    from seektune.registry.store import default_registry_dir

    return default_registry_dir() / FEEDBACK_FILE


@dataclass
class ResponseRecord:
    """One answered request: its choices' outputs (index = choice) and where they came from.

    `prompt` is the chat messages ([{role, content}]) or, for /v1/completions, one prompt string per
    choice's prompt (`prompts[choice // n]`)."""

    id: str
    endpoint: str  # "chat" or "completion"
    model: str
    version: str
    user: str | None
    prompts: list[Any]
    outputs: list[tuple[str, str | None]]  # (text, finish_reason) per choice
    n: int = 1
    created: float = field(default_factory=time.time)


@dataclass
class FeedbackRecord:
    id: str
    response_id: str
    choice: int
    rating: int | None
    correction: str | None
    comment: str | None
    user: str | None
    created: float = field(default_factory=time.time)


class StoreFull(Exception):
    """The writer's queue is full (the disk is slower than the traffic)."""


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def open_store(path: Path, create: bool) -> sqlite3.Connection:
    """A connection to the feedback store at `path` (created with `create`), or a UserError that says what
    is wrong with the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"the feedback store {path} is a folder: set serve.feedback.store to a file path")
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open("rb") as handle:
            if handle.read(16) != _SQLITE_MAGIC:
                raise UserError(
                    f"{path} is not a SQLite file, so not a feedback store: point serve.feedback.store (or "
                    "--store) at another file"
                )
    elif not create:
        raise UserError(
            f"there is no feedback store at {path}: start the server with serve.feedback.enabled: true "
            "(and the same serve.feedback.store), or give --store"
        )
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the folder {path.parent}: {exc.strerror}") from None
    try:
        connection = _connect(path)
        app_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        raise UserError(f"cannot open the feedback store {path}: {exc}") from None
    if exists and (app_id != APPLICATION_ID or version > SCHEMA_VERSION):
        connection.close()
        if app_id != APPLICATION_ID:
            raise UserError(
                f"{path} is a SQLite database of another program (tables: "
                f"{', '.join(sorted(tables)) or 'none'}): point serve.feedback.store (or --store) at "
                "another file"
            )
        raise UserError(
            f"the feedback store {path} was written by a newer seektune (schema {version}, this one knows "
            f"{SCHEMA_VERSION}): upgrade seektune"
        )
    if not exists:
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return connection


class _RecentIds:
    """Response id -> number of choices, for the most recent responses (oldest forgotten first)."""

    def __init__(self, most: int = _RECENT_IDS) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()
        self._most = most
        self._lock = threading.Lock()

    def add(self, response_id: str, choices: int) -> None:
        with self._lock:
            self._ids[response_id] = choices
            self._ids.move_to_end(response_id)
            while len(self._ids) > self._most:
                self._ids.popitem(last=False)

    def get(self, response_id: str) -> int | None:
        with self._lock:
            return self._ids.get(response_id)


class FeedbackStore:
    """The server's side of the store: `record_response` and `record_feedback` queue, one thread writes.

    `on_outcome(kind, outcome)` is told of every record: kind "response" or "feedback", outcome "stored",
    "dropped" (queue full) or "failed" (the write failed; logged)."""

    def __init__(
        self,
        path: Path,
        privacy: PrivacyConfig,
        max_pending: int,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self._writer_db = open_store(self.path, create=True)
        self._reader_db = _connect(self.path)
        self._reader_lock = threading.Lock()
        self._privacy = privacy
        self._queue: queue.Queue[ResponseRecord | FeedbackRecord | None] = queue.Queue(maxsize=max_pending)
        self._recent = _RecentIds()
        self._on_outcome = on_outcome or (lambda kind, outcome: None)
        self._failed_logged = False
        self._thread = threading.Thread(target=self._write_loop, name="feedback-writer", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # -- from the request handlers (the event loop: nothing here blocks) ---------------------------------

    def record_response(self, record: ResponseRecord) -> bool:
        """Queue an answered request; False (and counted) when the queue is full or the store closed."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_outcome("response", "dropped")
            return False
        self._recent.add(record.id, len(record.outputs))
        return True

    def record_feedback(self, record: FeedbackRecord) -> None:
        """Queue a user's feedback; StoreFull when the queue is full."""
        if self._closed:
            raise StoreFull("the feedback store is closing")
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_outcome("feedback", "dropped")
            raise StoreFull(f"{self._queue.maxsize} records are waiting to be written") from None

    def choices_of(self, response_id: str) -> int | None:
        """How many choices the response `response_id` has; None when this store never recorded it. Reads
        the file for ids no longer in memory (call it off the event loop)."""
        known = self._recent.get(response_id)
        if known is not None:
            return known
        with self._reader_lock:
            row = self._reader_db.execute(
                "SELECT COUNT(*) FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return int(row[0]) or None

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (for up to `timeout_s`), then stop the writer."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            logger.warning("feedback store: the writer did not catch up; %d records are lost", self.pending)
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("feedback store: stopped with %d records not written", self.pending)
            return
        self._writer_db.close()
        self._reader_db.close()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- the writer thread --------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is None for entry in batch)
            records = [entry for entry in batch if entry is not None]
            try:
                if records:
                    self._write(records)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, records: list[ResponseRecord | FeedbackRecord]) -> None:
        responses: list[tuple[Any, ...]] = []
        feedback: list[tuple[Any, ...]] = []
        for record in records:
            if isinstance(record, ResponseRecord):
                responses.extend(self._response_rows(record))
            else:
                feedback.append(self._feedback_row(record))
        try:
            with _transaction(self._writer_db) as db:
                db.executemany(
                    "INSERT OR REPLACE INTO responses (id, choice, created, endpoint, model, version, "
                    "user, prompt, output, finish_reason, withheld, pii) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    responses,
                )
                db.executemany(
                    "INSERT OR REPLACE INTO feedback (id, response_id, choice, created, rating, correction, "
                    "comment, user, withheld, pii) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    feedback,
                )
        except sqlite3.Error as exc:
            if not self._failed_logged:  # once: a full disk would otherwise log every batch
                logger.error("feedback store %s: writing failed (%s); records are being lost", self.path, exc)
                self._failed_logged = True
            for record in records:
                self._on_outcome(_kind(record), "failed")
            return
        for record in records:
            self._on_outcome(_kind(record), "stored")

    def _mask(self, texts: list[str]) -> tuple[list[str], dict[str, int], bool]:
        """(masked texts, counts by kind, withheld) under serve.feedback.privacy."""
        from seektune.data.privacy import mask_pii

        if not self._privacy.enabled:
            return texts, {}, False
        counts: dict[str, int] = {}
        masked = []
        for text in texts:
            out, found = mask_pii(text, self._privacy.detectors) if text else (text, {})
            masked.append(out)
            for kind, count in found.items():
                counts[kind] = counts.get(kind, 0) + count
        if counts and self._privacy.action == "drop":
            return ["" for _ in texts], counts, True
        return masked, counts, False

    def _response_rows(self, record: ResponseRecord) -> Iterator[tuple[Any, ...]]:
        user = [record.user] if record.user else []
        for choice, (output, finish_reason) in enumerate(record.outputs):
            prompt = record.prompts[choice // record.n] if record.endpoint == "completion" else None
            if record.endpoint == "chat":
                texts = [message["content"] for message in record.prompts]
            else:
                texts = [prompt]
            masked, counts, withheld = self._mask([*texts, output, *user])
            if record.endpoint == "chat":
                stored_prompt: Any = [
                    {**message, "content": text}
                    for message, text in zip(record.prompts, masked, strict=False)
                ]
            else:
                stored_prompt = masked[0]
            yield (
                record.id,
                choice,
                record.created,
                record.endpoint,
                record.model,
                record.version,
                masked[-1] if user else None,
                "" if withheld else json.dumps(stored_prompt, ensure_ascii=False),
                masked[len(texts)],
                finish_reason,
                int(withheld),
                json.dumps(counts),
            )

    def _feedback_row(self, record: FeedbackRecord) -> tuple[Any, ...]:
        texts = [record.correction or "", record.comment or "", record.user or ""]
        (correction, comment, user), counts, withheld = self._mask(texts)
        return (
            record.id,
            record.response_id,
            record.choice,
            record.created,
            record.rating,
            None if record.correction is None or withheld else correction,
            None if record.comment is None or withheld else comment,
            None if record.user is None else user,
            int(withheld),
            json.dumps(counts),
        )


def _kind(record: ResponseRecord | FeedbackRecord) -> str:
    return "response" if isinstance(record, ResponseRecord) else "feedback"


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def new_feedback_id() -> str:
    return f"fb-{uuid.uuid4().hex[:24]}"


def read_store(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every recorded response choice and every feedback row of the store at `path` (oldest first), as
    dicts; the prompt is parsed back from JSON (None for a withheld record)."""
    with closing(open_store(path, create=False)) as db:
        db.row_factory = sqlite3.Row
        responses = [dict(row) for row in db.execute("SELECT * FROM responses ORDER BY created, id, choice")]
        feedback = [dict(row) for row in db.execute("SELECT * FROM feedback ORDER BY created, id")]
    for row in responses:
        row["prompt"] = json.loads(row["prompt"]) if row["prompt"] else None
        row["pii"] = json.loads(row["pii"])
    for row in feedback:
        row["pii"] = json.loads(row["pii"])
    return responses, feedback
