"""The durable store of asynchronous requests: one SQLite table, in submission order.

A row goes PENDING → RUNNING → DONE or FAILED; a retried row goes back to PENDING with a
time before which it is not taken again; a row given up before it finished is CANCELLED
(and no later end of its run changes it). Each change is one committed transaction (WAL
journal, synchronous=FULL), so whatever `submit` has returned survives a crash of the
process. Each row keeps the protocol its request arrived by ("grpc" or "http"), so that its
answer is counted under that protocol whenever it runs; rows stored before the column
existed read as "grpc". Each row keeps its owner too, the principal that submitted it (NULL:
none, as for rows stored before the column existed). The connection and the clock are
handed in; nothing here knows of gRPC.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from meshserve.common.errors import ResourceExhausted

PENDING, RUNNING, DONE, FAILED, CANCELLED = "PENDING", "RUNNING", "DONE", "FAILED", "CANCELLED"
FINISHED = (DONE, FAILED, CANCELLED)
GRPC = "grpc"  # the protocol of a row stored without one
PROTOCOL_COLUMN = f"protocol TEXT NOT NULL DEFAULT '{GRPC}'"
OWNER_COLUMN = "owner TEXT"  # NULL: submitted without a principal, or before owners were kept
# Columns added since the first version of the table, by name: opening an older store adds them.
ADDED_COLUMNS = {"protocol": PROTOCOL_COLUMN, "owner": OWNER_COLUMN}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    response BLOB,
    code INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    {PROTOCOL_COLUMN},
    {OWNER_COLUMN}
);
CREATE INDEX IF NOT EXISTS submissions_by_state ON submissions (state, seq);
"""


@dataclass(frozen=True)
class Submission:
    id: str
    model: str
    request: bytes
    state: str
    response: bytes | None
    code: int
    message: str
    attempts: int
    created: float
    updated: float
    protocol: str = GRPC
    owner: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


COLUMNS = ("id, model, request, state, response, code, message, attempts, created, updated, "
           "protocol, owner")


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection to the store at `path` (created if missing) in WAL mode."""
    connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=5000")
    connection.executescript(SCHEMA)
    add_missing_columns(connection)
    return connection


def add_missing_columns(connection: sqlite3.Connection) -> None:
    """A store written by an older ingress gains the columns it lacks (ADDED_COLUMNS): its
    rows read as "grpc" and without an owner. One transaction, so two processes opening the
    same old store both succeed."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        names = {row[1] for row in connection.execute("PRAGMA table_info(submissions)")}
        for name, column in ADDED_COLUMNS.items():
            if name not in names:
                connection.execute(f"ALTER TABLE submissions ADD COLUMN {column}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class SubmissionStore:
    """`clock` gives wall-clock seconds (rows outlive processes); `new_id` makes ids."""

    def __init__(self, connection: sqlite3.Connection, max_pending: int,
                 clock: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(16)) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._db = connection
        self.max_pending = max_pending
        self._clock = clock
        self._new_id = new_id
        self._unfinished = self._count(PENDING) + self._count(RUNNING)

    def _count(self, state: str) -> int:
        return self._db.execute("SELECT count(*) FROM submissions WHERE state = ?",
                                (state,)).fetchone()[0]

    @property
    def unfinished(self) -> int:
        """Rows PENDING or RUNNING."""
        return self._unfinished

    def submit(self, model: str, request: bytes, protocol: str = GRPC,
               owner: str | None = None) -> str:
        """Store a request that arrived by `protocol`, submitted by the principal `owner`
        (None: none); its id. ResourceExhausted when `max_pending` are unfinished."""
        if self._unfinished >= self.max_pending:
            raise ResourceExhausted(
                f"asynchronous request store holds {self._unfinished} unfinished requests "
                f"(--async-max-pending {self.max_pending}); retry later")
        now = self._clock()
        submission_id = self._new_id()
        self._db.execute(
            "INSERT INTO submissions (id, model, request, state, created, updated, protocol, "
            "owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (submission_id, model, request, PENDING, now, now, protocol, owner))
        self._unfinished += 1
        return submission_id

    def get(self, submission_id: str) -> Submission | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM submissions WHERE id = ?",
                               (submission_id,)).fetchone()
        return None if row is None else Submission(*row)

    def claim(self, limit: int) -> list[Submission]:
        """Up to `limit` PENDING rows that are due, oldest first, now RUNNING."""
        if limit < 1:
            return []
        now = self._clock()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM submissions WHERE state = ? AND not_before <= ? "
                "ORDER BY seq LIMIT ?", (PENDING, now, limit)).fetchall()
            self._db.executemany(
                "UPDATE submissions SET state = ?, attempts = attempts + 1, updated = ? "
                "WHERE id = ?", [(RUNNING, now, row[0]) for row in rows])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return [replace(Submission(*row), state=RUNNING, attempts=row[7] + 1, updated=now)
                for row in rows]

    def next_due(self) -> float | None:
        """When the earliest PENDING row becomes due (None: no PENDING row)."""
        return self._db.execute("SELECT min(not_before) FROM submissions WHERE state = ?",
                                (PENDING,)).fetchone()[0]

    def finish(self, submission_id: str, response: bytes) -> None:
        self._end(submission_id, DONE, response, 0, "")

    def fail(self, submission_id: str, code: int, message: str) -> None:
        self._end(submission_id, FAILED, None, code, message)

    def _end(self, submission_id: str, state: str, response: bytes | None, code: int,
             message: str) -> None:
        changed = self._db.execute(
            "UPDATE submissions SET state = ?, response = ?, code = ?, message = ?, "
            "request = x'', updated = ? WHERE id = ? AND state = ?",
            (state, response, code, message, self._clock(), submission_id, RUNNING)).rowcount
        self._unfinished -= changed

    def cancel(self, submission_id: str) -> bool:
        """A PENDING or RUNNING row CANCELLED (its request dropped); whether it was one."""
        changed = self._db.execute(
            "UPDATE submissions SET state = ?, request = x'', updated = ? "
            "WHERE id = ? AND state IN (?, ?)",
            (CANCELLED, self._clock(), submission_id, PENDING, RUNNING)).rowcount
        self._unfinished -= changed
        return bool(changed)

    def retry(self, submission_id: str, delay: float, code: int, message: str) -> None:
        """A RUNNING row back to PENDING, due again after `delay` seconds."""
        now = self._clock()
        self._db.execute(
            "UPDATE submissions SET state = ?, not_before = ?, code = ?, message = ?, "
            "updated = ? WHERE id = ? AND state = ?",
            (PENDING, now + delay, code, message, now, submission_id, RUNNING))

    def recover(self) -> int:
        """After a restart: every RUNNING row back to PENDING (inference is idempotent)."""
        now = self._clock()
        return self._db.execute(
            "UPDATE submissions SET state = ?, not_before = 0, updated = ? WHERE state = ?",
            (PENDING, now, RUNNING)).rowcount

    def purge(self, retention: float) -> int:
        """Delete finished rows older than `retention` seconds; how many went."""
        cutoff = self._clock() - retention
        return self._db.execute(
            "DELETE FROM submissions WHERE state IN (?, ?, ?) AND updated < ?",
            (*FINISHED, cutoff)).rowcount
