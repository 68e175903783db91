"""The control plane's durable state: policies with history, endpoints, canary records and
the audit log, in one database in the data directory, so a restarted control plane serves
the same routes.

Only SQLite (stdlib `sqlite3`) is implemented. The SQL is kept to what PostgreSQL accepts
too (`CREATE TABLE IF NOT EXISTS`, `INSERT ... ON CONFLICT (...) DO UPDATE`, `RETURNING`,
no `LIMIT`), and the few differences, placeholder style, autoincrementing keys and how a
write transaction begins, live in `Dialect`. A PostgreSQL build would add a DB-API driver
and a connect branch in `Store.open` that uses `POSTGRESQL`; today `postgresql://` URLs are
refused with FailedPrecondition.

Concurrency: one connection (`check_same_thread=False`) behind one lock, taken by every
method, so calls from the event-loop thread and from helper threads do not interleave
inside a transaction. Each write is one transaction (`BEGIN IMMEDIATE` in SQLite, which
also keeps a second process from writing between our read of the audit head and our
append); the clock is read inside it, so timestamps follow seq order. Methods are
synchronous and short; WAL mode keeps readers in other processes (an operator's `sqlite3`
shell) from blocking us.

Policy history is an undo stack, not a toggle. Every change appends a row to
`policy_history` whose `parent_id` is the row that was current before it:

    put P1, put P2, put P3        current P3 (parent P2 (parent P1))
    rollback  -> P2               a new row with P2's policy and P2's parent (P1)
    rollback  -> P1               a new row with P1's policy and no parent
    rollback  -> FailedPrecondition: nothing earlier

A `put_policy` after a rollback continues from the restored policy. Rows are never
updated or deleted, so the full sequence of what was served stays in the table (and in the
audit log).
"""

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.mesh import audit as audit_log
from meshserve.mesh.audit import AuditEntry
from meshserve.mesh.policy import Endpoint, MeshState, TrafficPolicy

Clock = Callable[[], datetime]

SCHEMA_VERSION = 1


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between databases. SQL in this module is written with `?`
    placeholders and contains no literal `?` or `%`, so `sql()` can translate it."""

    name: str
    paramstyle: str  # DB-API paramstyle: "qmark" (?) or "format" (%s)
    identity_key: str  # column definition of an autoincrementing integer primary key
    begin_write: str  # statement that starts a write transaction

    def sql(self, text: str) -> str:
        return text if self.paramstyle == "qmark" else text.replace("?", "%s")


SQLITE = Dialect("sqlite", "qmark", "INTEGER PRIMARY KEY AUTOINCREMENT", "BEGIN IMMEDIATE")
# Not wired up (no driver in this build): what a psycopg-based port would use.
POSTGRESQL = Dialect("postgresql", "format", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                     "BEGIN")


def _schema(dialect: Dialect) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS policy_history (
            id {dialect.identity_key},
            model TEXT NOT NULL,
            policy TEXT NOT NULL,
            parent_id INTEGER REFERENCES policy_history (id),
            at_utc TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS current_policy (
            model TEXT PRIMARY KEY,
            history_id INTEGER NOT NULL REFERENCES policy_history (id)
        )""",
        """CREATE TABLE IF NOT EXISTS endpoints (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            address TEXT NOT NULL,
            region TEXT NOT NULL,
            zone TEXT NOT NULL,
            PRIMARY KEY (model, version, address)
        )""",
        """CREATE TABLE IF NOT EXISTS canaries (
            model TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            at_utc TEXT NOT NULL
        )""",
        audit_log.CREATE_TABLE,
    ]


@dataclass(frozen=True)
class _HistoryRow:
    id: int
    policy: str
    parent_id: int | None


_CURRENT = """SELECT h.id, h.policy, h.parent_id FROM current_policy c
    JOIN policy_history h ON h.id = c.history_id WHERE c.model = ?"""


class Store:
    """Durable control-plane state. Open with `Store.open`; use as a context manager or
    call `close()`."""

    def __init__(self, connection: sqlite3.Connection, dialect: Dialect, clock: Clock,
                 location: str) -> None:
        self._conn = connection
        self._dialect = dialect
        self._clock = clock
        self._location = location
        self._lock = threading.Lock()
        self._closed = False

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str | Path, *, clock: Clock = _utc_now) -> "Store":
        """Open (creating if missing) the store at a file path or `sqlite:///path` URL.

        URLs follow the SQLAlchemy convention: `sqlite:///data/mesh.db` is relative,
        `sqlite:////var/lib/mesh.db` absolute, `sqlite://` in memory. `postgresql://...`
        raises FailedPrecondition: only SQLite is implemented.
        """
        path = _sqlite_path(path_or_url)
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FailedPrecondition(f"cannot create the directory of the store at "
                                         f"{path}: {exc}") from exc
        try:
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                         timeout=5.0)
        except sqlite3.Error as exc:
            raise FailedPrecondition(f"cannot open the store at {path}: {exc}") from exc
        store = cls(connection, SQLITE, clock, path)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            store._create_schema()
        except sqlite3.Error as exc:
            connection.close()
            raise FailedPrecondition(f"cannot open the store at {path}: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._dialect.name}:{self._location})"

    def _create_schema(self) -> None:
        with self._write() as cur:
            for statement in _schema(self._dialect):
                cur.execute(statement)
            row = self._one(cur, "SELECT MAX(version) FROM schema_version")
            version = row[0] if row is not None else None
            if version is None:
                self._exec(cur, "INSERT INTO schema_version (version) VALUES (?)",
                           (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise FailedPrecondition(f"the store at {self._location} has schema version "
                                         f"{version}, written by a newer meshserve (this one "
                                         f"knows up to {SCHEMA_VERSION})")

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        with self._transaction(self._dialect.begin_write) as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """A read transaction: the statements inside see one snapshot."""
        with self._transaction("BEGIN") as cur:
            yield cur

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"the store at {self._location} is closed")
            cur = self._conn.cursor()
            try:
                cur.execute(begin)
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def _exec(self, cur: sqlite3.Cursor, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return cur.execute(self._dialect.sql(sql), params)

    def _one(self, cur: sqlite3.Cursor, sql: str, params: tuple = ()) -> Any:
        return self._exec(cur, sql, params).fetchone()

    def _now(self) -> str:
        return audit_log.utc_timestamp(self._clock())

    # -- policies --------------------------------------------------------------------------

    def put_policy(self, policy: TrafficPolicy, actor: str, reason: str = "") -> None:
        """Make `policy` its model's current policy; recorded in the history and audited
        ("policy.set"), in one transaction."""
        if not isinstance(policy, TrafficPolicy):
            raise InvalidArgument(f"expected a TrafficPolicy, got {type(policy).__name__}")
        _require(actor=actor)
        after = policy.to_json()
        with self._write() as cur:
            at = self._now()
            current = self._current(cur, policy.model)
            self._record_policy(cur, policy.model, after, current.id if current else None, at,
                                actor, "policy.set", reason)
            self._append(cur, at, actor, "policy.set", policy.model,
                         current.policy if current else "", after, reason)

    def policy(self, model: str) -> TrafficPolicy | None:
        with self._read() as cur:
            current = self._current(cur, model)
        return TrafficPolicy.from_json(current.policy) if current else None

    def policies(self) -> dict[str, TrafficPolicy]:
        """Every model's current policy, by model name (sorted)."""
        with self._read() as cur:
            return self._policies(cur)

    def previous_policy(self, model: str) -> TrafficPolicy | None:
        """The policy `rollback(model)` would restore, or None when there is none."""
        with self._read() as cur:
            current = self._current(cur, model)
            if current is None or current.parent_id is None:
                return None
            previous = self._history(cur, current.parent_id)
        return TrafficPolicy.from_json(previous.policy)

    def rollback(self, model: str, actor: str, reason: str = "") -> TrafficPolicy:
        """Make the policy before the current one current again (see the module docstring:
        repeated rollbacks walk further back). Recorded as a new history row and audited
        ("policy.rollback"). NotFound when the model has no policy; FailedPrecondition
        when its history has nothing earlier."""
        _require(actor=actor)
        with self._write() as cur:
            at = self._now()
            current = self._current(cur, model)
            if current is None:
                raise NotFound(f"model '{model}' has no policy, so there is nothing to roll "
                               "back")
            if current.parent_id is None:
                raise FailedPrecondition(f"model '{model}' has no earlier policy to roll back "
                                         "to: its history begins with the current one")
            previous = self._history(cur, current.parent_id)
            self._record_policy(cur, model, previous.policy, previous.parent_id, at, actor,
                                "policy.rollback", reason)
            self._append(cur, at, actor, "policy.rollback", model, current.policy,
                         previous.policy, reason)
        return TrafficPolicy.from_json(previous.policy)

    def _current(self, cur: sqlite3.Cursor, model: str) -> _HistoryRow | None:
        row = self._one(cur, _CURRENT, (model,))
        return _HistoryRow(row[0], row[1], row[2]) if row else None

    def _history(self, cur: sqlite3.Cursor, history_id: int) -> _HistoryRow:
        row = self._one(cur, "SELECT id, policy, parent_id FROM policy_history WHERE id = ?",
                        (history_id,))
        return _HistoryRow(row[0], row[1], row[2])

    def _record_policy(self, cur: sqlite3.Cursor, model: str, policy_json: str,
                       parent_id: int | None, at: str, actor: str, action: str,
                       reason: str) -> None:
        row = self._one(cur, "INSERT INTO policy_history (model, policy, parent_id, at_utc, "
                             "actor, action, reason) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                        (model, policy_json, parent_id, at, actor, action, reason))
        self._exec(cur, "INSERT INTO current_policy (model, history_id) VALUES (?, ?) "
                        "ON CONFLICT (model) DO UPDATE SET history_id = excluded.history_id",
                   (model, row[0]))

    def _policies(self, cur: sqlite3.Cursor) -> dict[str, TrafficPolicy]:
        rows = self._exec(cur, "SELECT c.model, h.policy FROM current_policy c "
                               "JOIN policy_history h ON h.id = c.history_id "
                               "ORDER BY c.model").fetchall()
        return {model: TrafficPolicy.from_json(text) for model, text in rows}

    # -- endpoints -------------------------------------------------------------------------

    def put_endpoint(self, endpoint: Endpoint, actor: str, reason: str = "") -> None:
        """Add or update the endpoint (key: model, version, address), audited as
        "endpoint.add" (`before` is the old row on an update). Putting an endpoint that is
        already stored unchanged does nothing and records nothing, so re-registrations do
        not flood the audit log."""
        if not isinstance(endpoint, Endpoint):
            raise InvalidArgument(f"expected an Endpoint, got {type(endpoint).__name__}")
        _require(actor=actor, model=endpoint.model, version=endpoint.version,
                 address=endpoint.address)
        _check_address(endpoint)
        after = _endpoint_json(endpoint)
        with self._write() as cur:
            at = self._now()
            existing = self._endpoint(cur, endpoint.model, endpoint.version, endpoint.address)
            before = _endpoint_json(existing) if existing else ""
            if before == after:
                return
            self._exec(cur, "INSERT INTO endpoints (model, version, address, region, zone) "
                            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version, address) "
                            "DO UPDATE SET region = excluded.region, zone = excluded.zone",
                       (endpoint.model, endpoint.version, endpoint.address, endpoint.region,
                        endpoint.zone))
            self._append(cur, at, actor, "endpoint.add", _endpoint_subject(endpoint), before,
                         after, reason)

    def remove_endpoint(self, model: str, version: str, address: str, actor: str,
                        reason: str = "") -> None:
        """Remove the endpoint, audited as "endpoint.remove"; NotFound when absent."""
        _require(actor=actor)
        with self._write() as cur:
            at = self._now()
            existing = self._endpoint(cur, model, version, address)
            if existing is None:
                raise NotFound(f"no endpoint of model '{model}' version '{version}' at "
                               f"'{address}'")
            self._exec(cur, "DELETE FROM endpoints WHERE model = ? AND version = ? "
                            "AND address = ?", (model, version, address))
            self._append(cur, at, actor, "endpoint.remove", _endpoint_subject(existing),
                         _endpoint_json(existing), "", reason)

    def endpoints(self) -> tuple[Endpoint, ...]:
        """All endpoints, sorted by model, version (numerically) and address."""
        with self._read() as cur:
            return self._endpoints(cur)

    def _endpoint(self, cur: sqlite3.Cursor, model: str, version: str,
                  address: str) -> Endpoint | None:
        row = self._one(cur, "SELECT model, version, address, region, zone FROM endpoints "
                             "WHERE model = ? AND version = ? AND address = ?",
                        (model, version, address))
        return Endpoint(*row) if row else None

    def _endpoints(self, cur: sqlite3.Cursor) -> tuple[Endpoint, ...]:
        rows = self._exec(cur, "SELECT model, version, address, region, zone "
                               "FROM endpoints").fetchall()
        return tuple(sorted((Endpoint(*row) for row in rows), key=_endpoint_order))

    def state(self) -> MeshState:
        """Policies and endpoints, read in one snapshot."""
        with self._read() as cur:
            return MeshState(policies=self._policies(cur), endpoints=self._endpoints(cur))

    # -- canary records --------------------------------------------------------------------

    def put_canary(self, model: str, record: dict, actor: str, action: str,
                   reason: str = "") -> None:
        """Replace the canary record of `model` (any JSON object; the caller defines it) and
        audit it with `action` ("canary.start", "canary.step", ...), in one transaction."""
        _require(model=model, actor=actor, action=action)
        if not isinstance(record, dict):
            raise InvalidArgument(f"a canary record is a dict, not {type(record).__name__}")
        try:
            after = json.dumps(record, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"canary record of model '{model}' is not JSON: {exc}"
                                  ) from exc
        with self._write() as cur:
            at = self._now()
            row = self._one(cur, "SELECT record FROM canaries WHERE model = ?", (model,))
            self._exec(cur, "INSERT INTO canaries (model, record, at_utc) VALUES (?, ?, ?) "
                            "ON CONFLICT (model) DO UPDATE SET record = excluded.record, "
                            "at_utc = excluded.at_utc", (model, after, at))
            self._append(cur, at, actor, action, model, row[0] if row else "", after, reason)

    def canary(self, model: str) -> dict | None:
        with self._read() as cur:
            row = self._one(cur, "SELECT record FROM canaries WHERE model = ?", (model,))
        return json.loads(row[0]) if row else None

    def canaries(self) -> dict[str, dict]:
        """Every stored canary record, by model (sorted): what to resume after a restart."""
        with self._read() as cur:
            rows = self._exec(cur, "SELECT model, record FROM canaries "
                                   "ORDER BY model").fetchall()
        return {model: json.loads(text) for model, text in rows}

    # -- audit -------------------------------------------------------------------------------

    def append_audit(self, actor: str, action: str, subject: str, before: str = "",
                     after: str = "", reason: str = "") -> AuditEntry:
        """Append one entry to the audit chain, in its own transaction."""
        _require(actor=actor, action=action)
        with self._write() as cur:
            at = self._now()
            return self._append(cur, at, actor, action, subject, before, after, reason)

    def audit(self, limit: int | None = None, after_seq: int = 0) -> list[AuditEntry]:
        """Entries with seq > `after_seq`, oldest first, at most `limit` of them (page on
        with `after_seq=` the last seq seen)."""
        if limit is not None and limit < 0:
            raise InvalidArgument(f"limit must be 0 or more, not {limit}")
        if after_seq < 0:
            raise InvalidArgument(f"after_seq must be 0 or more, not {after_seq}")
        with self._read() as cur:
            rows = self._exec(cur, f"{audit_log.SELECT} WHERE seq > ? ORDER BY seq",
                              (after_seq,))
            found = rows.fetchall() if limit is None else rows.fetchmany(limit)
        return [audit_log.from_row(row) for row in found]

    def head_hash(self) -> str:
        """The hash of the newest audit entry: export it and pass it to `verify_audit` later
        as `anchor` to detect entries removed from the end."""
        with self._read() as cur:
            row = self._one(cur, audit_log.SELECT_HEAD)
        return row[1] if row else audit_log.GENESIS

    def verify_audit(self, anchor: str | None = None) -> list[str]:
        """Problems in the stored audit chain (empty: intact); see `audit.verify`."""
        return audit_log.verify(self.audit(), anchor=anchor)

    def _append(self, cur: sqlite3.Cursor, at: str, actor: str, action: str, subject: str,
                before: str, after: str, reason: str) -> AuditEntry:
        head = self._one(cur, audit_log.SELECT_HEAD)
        seq, prev_hash = (head[0] + 1, head[1]) if head else (1, audit_log.GENESIS)
        entry = audit_log.make_entry(seq, at, actor, action, subject, before, after, reason,
                                     prev_hash)
        self._exec(cur, audit_log.INSERT, audit_log.to_row(entry))
        return entry


def _sqlite_path(path_or_url: str | Path) -> str:
    if isinstance(path_or_url, Path):
        return str(path_or_url)
    text = str(path_or_url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not text:
            raise InvalidArgument("the store path is empty")
        return text
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        # The URL is not echoed: it may carry a password.
        raise FailedPrecondition("PostgreSQL is not available in this build: only SQLite is "
                                 "implemented; give a file path or sqlite:///path")
    if scheme != "sqlite":
        raise InvalidArgument(f"unsupported store URL scheme '{scheme}': give a file path or "
                              "sqlite:///path")
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise InvalidArgument(f"'{text}' is not sqlite:///PATH (three slashes, then the path)")
    return rest[1:]


def _require(**fields: str) -> None:
    for name, value in fields.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{name} must be a non-empty string")


def _check_address(endpoint: Endpoint) -> None:
    try:
        host, port = endpoint.host_port
    except ValueError:
        host, port = "", 0
    if not host or not 0 < port < 65536:
        raise InvalidArgument(f"endpoint address '{endpoint.address}' is not HOST:PORT")


def _endpoint_json(endpoint: Endpoint) -> str:
    return json.dumps(asdict(endpoint), sort_keys=True)


def _endpoint_subject(endpoint: Endpoint) -> str:
    return f"{endpoint.model}/{endpoint.version}/{endpoint.address}"


def _endpoint_order(endpoint: Endpoint) -> tuple:
    numeric = endpoint.version.isdigit()
    return (endpoint.model, not numeric, int(endpoint.version) if numeric else 0,
            endpoint.version, endpoint.address)
