"""The control plane's durable state: policies with history, endpoints, canary records and
the audit log, in one database in the data directory, so a restarted control plane serves
the same routes.

Two databases, one code path: SQLite (stdlib `sqlite3`; a file path or `sqlite:///path`)
for a single control plane, and PostgreSQL (`postgresql://` or `postgres://` URL, driver
`psycopg` 3, imported only when such a URL is opened) for production, where several control
planes may share one database. The SQL is kept to what both accept (`CREATE TABLE IF NOT
EXISTS`, `INSERT ... ON CONFLICT (...) DO UPDATE`, `RETURNING`, no `LIMIT`), and the few
differences, placeholder style, autoincrementing keys and how each kind of transaction
begins, live in `Dialect`.

Concurrency: one connection (`check_same_thread=False` in SQLite) behind one lock, taken by
every method, so calls from the event-loop thread and from helper threads do not interleave
inside a transaction. Each method is one explicit transaction, committed or rolled back
before the lock is released; the clock is read inside it, so timestamps follow seq order.
Writers are serialized across processes too, so two control planes cannot both read the
same audit head and fork the chain (nor lose each other's policy change):

- SQLite: `BEGIN IMMEDIATE` takes the database's write lock before the first read. WAL mode
  keeps readers in other processes (an operator's `sqlite3` shell) from blocking us.
- PostgreSQL (psycopg, autocommit off: the driver sends `BEGIN` before the first statement,
  we end every transaction with `commit()`/`rollback()`): a write transaction runs at READ
  COMMITTED and first takes `LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE`. That mode
  conflicts with itself and with the `ROW EXCLUSIVE` lock of any INSERT/UPDATE/DELETE on the
  table, but not with plain SELECTs, so writers queue one at a time (as SQLite's) while
  readers never wait; and since READ COMMITTED gives each statement a fresh snapshot, the
  head read after the lock is granted is the latest committed one. Chosen over SERIALIZABLE,
  which would abort one of two racing writers and need a retry of the whole method, and
  over `SELECT ... FOR UPDATE` of the head row, which locks nothing while the log is empty
  and makes a waiter re-read a head that is no longer the newest. The primary key on `seq`
  stays as a backstop. Reads run at REPEATABLE READ, READ ONLY: one snapshot, as in SQLite.
  Creating the schema takes a transaction-scoped advisory lock instead (the table to lock
  may not exist yet), so two control planes starting on an empty database do not race.
  A connection that the server dropped is reopened by the next call (the call during
  which it dropped fails; nothing is retried, since a lost COMMIT may have landed).

Errors never show a PostgreSQL URL's password: the URL is not echoed, driver messages are
scrubbed of it, and the store's name in messages and `repr` is `postgresql://USER@HOST:PORT/DB`.

Policy history is an undo stack, not a toggle. Every change appends a row to
`policy_history` whose `parent_id` is the row that was current before it:

    put P1, put P2, put P3        current P3 (parent P2 (parent P1))
    rollback  -> P2               a new row with P2's policy and P2's parent (P1)
    rollback  -> P1               a new row with P1's policy and no parent
    rollback  -> FailedPrecondition: nothing earlier

A `put_policy` after a rollback continues from the restored policy. A canary's policies
count as one change (see `put_canary`): rolling back a promoted canary restores the policy
it started from, and a canary that was rolled back leaves the stack as it found it. Rows
are never updated or deleted, so the full sequence of what was served stays in the table
(and in the audit log).
"""

import json
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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

# How a canary's policy joins the policy history (see `Store.put_canary`).
START, OVER_START, RESTORE = "start", "over_start", "restore"
STACKINGS = (START, OVER_START, RESTORE)
CANARY_START = "canary.start"  # the history action of a canary's first step


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between databases. SQL in this module is written with `?`
    placeholders and contains no literal `?` or `%`, so `sql()` can translate it.

    The `begin_*` statements open a transaction of each kind. SQLite's connection is in
    autocommit mode (`isolation_level=None`), so they begin it themselves; psycopg's is not,
    and has sent `BEGIN` by the time the first of them runs, so they only set it up. Every
    transaction ends with the connection's `commit()` or `rollback()`."""

    name: str
    paramstyle: str  # DB-API paramstyle: "qmark" (?) or "format" (%s)
    identity_key: str  # column definition of an autoincrementing integer primary key
    begin_write: tuple[str, ...]  # open a write transaction, holding the writers' lock
    begin_read: tuple[str, ...]  # open a read transaction: its statements see one snapshot
    begin_schema: tuple[str, ...]  # open the transaction that creates the schema
    # Restoring rows with their own keys: the clause that lets an INSERT give an identity
    # column's value, and what brings each table's key generator past the restored keys.
    insert_keys: str = ""
    after_insert_keys: tuple[str, ...] = ()

    def sql(self, text: str) -> str:
        return text if self.paramstyle == "qmark" else text.replace("?", "%s")


SQLITE = Dialect("sqlite", "qmark", "INTEGER PRIMARY KEY AUTOINCREMENT",
                 begin_write=("BEGIN IMMEDIATE",), begin_read=("BEGIN",),
                 begin_schema=("BEGIN IMMEDIATE",))
# Key of the advisory lock held while creating the schema ("mesh" in ASCII). Advisory locks
# are per database, so it only meets other meshserve control planes on the same one.
_PG_SCHEMA_LOCK_KEY = 0x6D657368
POSTGRESQL = Dialect(
    "postgresql", "format", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    begin_write=("SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
                 f"LOCK TABLE {audit_log.TABLE} IN SHARE ROW EXCLUSIVE MODE"),
    begin_read=("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",),
    begin_schema=("SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
                  f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK_KEY})"),
    insert_keys="OVERRIDING SYSTEM VALUE",
    after_insert_keys=("SELECT setval(pg_get_serial_sequence('policy_history', 'id'), "
                       "COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) FROM policy_history",))


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
        """CREATE TABLE IF NOT EXISTS model_versions (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            signer TEXT NOT NULL,
            manifest TEXT NOT NULL,
            pushed_by TEXT NOT NULL,
            pushed_at TEXT NOT NULL,
            PRIMARY KEY (name, version)
        )""",
        audit_log.CREATE_TABLE,
    ]


# Every table of the state, each before the tables whose foreign keys name it: the order in
# which a backup exports them and a restore fills them (`export_tables`, `import_tables`).
TABLES = ("policy_history", "current_policy", "endpoints", "canaries", "model_versions",
          audit_log.TABLE)


@dataclass(frozen=True)
class TableRows:
    """One table's column names and rows, as a backup carries them."""

    columns: tuple[str, ...]
    rows: list[tuple]


@dataclass(frozen=True)
class ModelVersion:
    """A pushed model version in the registry: its artifact digest, signer and manifest."""

    name: str
    version: str
    digest: str
    signer: str
    manifest: str
    pushed_by: str
    pushed_at: str


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

    def __init__(self, connection: Any, dialect: Dialect, clock: Clock, location: str, *,
                 reconnect: Callable[[], Any] | None = None) -> None:
        self._conn = connection  # a DB-API connection: sqlite3's or psycopg's
        self._dialect = dialect
        self._clock = clock
        self._location = location
        # Opens a new connection when the server dropped ours (PostgreSQL); None: never.
        self._reconnect = reconnect
        self._lock = threading.Lock()
        self._closed = False

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str | Path, *, clock: Clock = _utc_now) -> "Store":
        """Open (creating the schema if missing) the store at a file path, a `sqlite:///path`
        URL or a `postgresql://` URL.

        URLs follow the SQLAlchemy convention: `sqlite:///data/mesh.db` is relative,
        `sqlite:////var/lib/mesh.db` absolute, `sqlite://` in memory.
        `postgresql://USER:PASSWORD@HOST:PORT/DATABASE?PARAM=VALUE` (or `postgres://`, or
        `postgresql+psycopg://`) is handed to libpq as it is, so its parameters (`sslmode`,
        `connect_timeout`, a Unix socket as `host=/run/postgresql`, ...) and libpq's
        environment variables and password file apply; the database must exist. Failing
        to connect raises FailedPrecondition (without the URL).
        """
        url = _postgresql_url(path_or_url)
        if url is not None:
            return cls._open_postgresql(url, clock)
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

    @classmethod
    def _open_postgresql(cls, url: str, clock: Clock) -> "Store":
        try:
            import psycopg
        except ImportError:
            raise FailedPrecondition("a PostgreSQL store needs the psycopg package, which is "
                                     "not installed: pip install 'psycopg[binary]'") from None
        secrets = _url_secrets(url)
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error:
            # libpq's message may quote the URL, password and all.
            raise InvalidArgument("the PostgreSQL store URL is not valid (it is not shown: it "
                                  "may carry a password); give postgresql://USER[:PASSWORD]"
                                  "@HOST[:PORT]/DATABASE") from None
        secrets.add(str(params.get("password") or ""))
        params.setdefault("connect_timeout", "10")
        params.setdefault("application_name", "meshserve")

        def connect() -> Any:
            try:
                return psycopg.connect(autocommit=False, **params)
            except psycopg.Error as exc:
                # `from None`: the driver's exception is not chained, so no traceback shows
                # its unscrubbed text.
                raise FailedPrecondition("cannot connect to the PostgreSQL store: "
                                         f"{_scrub(str(exc), secrets)}") from None

        connection = connect()
        info = connection.info
        location = _postgresql_location(info.user, info.host, info.port, info.dbname)
        store = cls(connection, POSTGRESQL, clock, location, reconnect=connect)
        try:
            store._create_schema()
        except psycopg.Error as exc:
            connection.close()
            raise FailedPrecondition(f"cannot open the store at {location}: "
                                     f"{_scrub(str(exc), secrets)}") from None
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
        with self._transaction(self._dialect.begin_schema) as cur:
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
    def _write(self) -> Iterator[Any]:
        """A write transaction, holding the writers' lock (see the module docstring)."""
        with self._transaction(self._dialect.begin_write) as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A read transaction: the statements inside see one snapshot."""
        with self._transaction(self._dialect.begin_read) as cur:
            yield cur

    @contextmanager
    def _transaction(self, begin: tuple[str, ...]) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"the store at {self._location} is closed")
            if self._reconnect is not None and self._conn.closed:
                self._conn = self._reconnect()
            cur = self._conn.cursor()
            try:
                for statement in begin:
                    cur.execute(statement)
                yield cur
                self._conn.commit()
            except BaseException:
                self._rollback()
                raise
            finally:
                cur.close()

    def _rollback(self) -> None:
        """End the failed transaction, if any. A rollback that fails too (the connection is
        gone, and the transaction with it) must not hide the error that got us here."""
        with suppress(Exception):
            self._conn.rollback()

    def _exec(self, cur: Any, sql: str, params: tuple = ()) -> Any:
        return cur.execute(self._dialect.sql(sql), params)

    def _one(self, cur: Any, sql: str, params: tuple = ()) -> Any:
        return self._exec(cur, sql, params).fetchone()

    def _now(self) -> str:
        return audit_log.utc_timestamp(self._clock())

    # -- backup and restore ----------------------------------------------------------------

    def export_tables(self) -> dict[str, TableRows]:
        """Every table of `TABLES`, read in one snapshot (in PostgreSQL a REPEATABLE READ
        transaction: a transaction-consistent dump)."""
        with self._read() as cur:
            return {table: self._table_rows(cur, table) for table in TABLES}

    def import_tables(self, tables: dict[str, TableRows]) -> None:
        """Fill an empty store with exported rows, keys included, in one transaction.
        FailedPrecondition when the store already holds state or a table's columns differ."""
        with self._write() as cur:
            for table in TABLES:
                rows = tables.get(table, TableRows((), []))
                existing = self._table_rows(cur, table)
                if existing.rows:
                    raise FailedPrecondition(f"the store at {self._location} already holds "
                                             f"state ({len(existing.rows)} rows in {table}); "
                                             "restore into an empty store")
                if rows.rows and tuple(rows.columns) != existing.columns:
                    raise FailedPrecondition(f"table {table} has columns "
                                             f"{', '.join(existing.columns)}, the rows to "
                                             f"restore {', '.join(rows.columns)}")
                insert = (f"INSERT INTO {table} ({', '.join(rows.columns)}) "
                          f"{self._dialect.insert_keys} VALUES "
                          f"({', '.join('?' for _ in rows.columns)})")
                for row in rows.rows:
                    self._exec(cur, insert, tuple(row))
            for statement in self._dialect.after_insert_keys:
                cur.execute(statement)

    def _table_rows(self, cur: Any, table: str) -> TableRows:
        rows = self._exec(cur, f"SELECT * FROM {table} ORDER BY 1, 2")
        columns = tuple(column[0] for column in rows.description)
        return TableRows(columns, [tuple(row) for row in rows.fetchall()])

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

    def _current(self, cur: Any, model: str) -> _HistoryRow | None:
        row = self._one(cur, _CURRENT, (model,))
        return _HistoryRow(row[0], row[1], row[2]) if row else None

    def _history(self, cur: Any, history_id: int) -> _HistoryRow:
        row = self._one(cur, "SELECT id, policy, parent_id FROM policy_history WHERE id = ?",
                        (history_id,))
        return _HistoryRow(row[0], row[1], row[2])

    def _record_policy(self, cur: Any, model: str, policy_json: str,
                       parent_id: int | None, at: str, actor: str, action: str,
                       reason: str) -> None:
        row = self._one(cur, "INSERT INTO policy_history (model, policy, parent_id, at_utc, "
                             "actor, action, reason) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                        (model, policy_json, parent_id, at, actor, action, reason))
        self._exec(cur, "INSERT INTO current_policy (model, history_id) VALUES (?, ?) "
                        "ON CONFLICT (model) DO UPDATE SET history_id = excluded.history_id",
                   (model, row[0]))

    def _policies(self, cur: Any) -> dict[str, TrafficPolicy]:
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

    def _endpoint(self, cur: Any, model: str, version: str,
                  address: str) -> Endpoint | None:
        row = self._one(cur, "SELECT model, version, address, region, zone FROM endpoints "
                             "WHERE model = ? AND version = ? AND address = ?",
                        (model, version, address))
        return Endpoint(*row) if row else None

    def _endpoints(self, cur: Any) -> tuple[Endpoint, ...]:
        rows = self._exec(cur, "SELECT model, version, address, region, zone "
                               "FROM endpoints").fetchall()
        return tuple(sorted((Endpoint(*row) for row in rows), key=_endpoint_order))

    def state(self) -> MeshState:
        """Policies and endpoints, read in one snapshot."""
        with self._read() as cur:
            return MeshState(policies=self._policies(cur), endpoints=self._endpoints(cur))

    # -- canary records --------------------------------------------------------------------

    def put_canary(self, model: str, record: dict, actor: str, action: str,
                   reason: str = "", *, policy: TrafficPolicy | None = None,
                   stacking: str = "") -> None:
        """Replace the canary record of `model` (any JSON object; the caller defines it) and
        audit it with `action` ("canary.start", "canary.step", ...), in one transaction.

        With `policy` (of `model`), that policy becomes current in the same transaction and
        the audit entry holds the policy before and after instead of the records, so a
        canary's traffic and its record never disagree. A canary joins the undo stack as one
        change: `stacking` START pushes the first step (as `put_policy` does); OVER_START
        puts a later step or the promotion over the policy the canary started from, so
        `rollback` after a promotion restores that policy; RESTORE writes that policy back
        (the caller passes it) with its own parent, as `rollback` would. START goes with
        action "canary.start", which is how the others find where the canary began."""
        _require(model=model, actor=actor, action=action)
        if not isinstance(record, dict):
            raise InvalidArgument(f"a canary record is a dict, not {type(record).__name__}")
        if policy is not None and policy.model != model:
            raise InvalidArgument(f"policy of model '{policy.model}' given for the canary of "
                                  f"model '{model}'")
        if policy is None and stacking:
            raise InvalidArgument(f"stacking '{stacking}' needs a policy")
        if policy is not None and stacking not in STACKINGS:
            raise InvalidArgument(f"stacking '{stacking}' is not one of {', '.join(STACKINGS)}")
        if (stacking == START) != (policy is not None and action == CANARY_START):
            raise InvalidArgument(f"a canary's first policy is put as '{CANARY_START}' with "
                                  f"stacking '{START}', and only it")
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
            if policy is None:
                self._append(cur, at, actor, action, model, row[0] if row else "", after,
                             reason)
                return
            current = self._current(cur, model)
            policy_json = policy.to_json()
            self._record_policy(cur, model, policy_json,
                                self._canary_parent(cur, model, current, stacking), at, actor,
                                action, reason)
            self._append(cur, at, actor, action, model, current.policy if current else "",
                         policy_json, reason)

    def _canary_parent(self, cur: Any, model: str, current: _HistoryRow | None,
                       stacking: str) -> int | None:
        """The history parent of a canary's policy row (see `put_canary`)."""
        start = self._one(cur, "SELECT MAX(id) FROM policy_history WHERE model = ? AND "
                               "action = ?", (model, CANARY_START))
        if stacking == START or start is None or start[0] is None:
            return current.id if current else None
        before_canary = self._history(cur, start[0]).parent_id
        if stacking == OVER_START or before_canary is None:
            return before_canary
        return self._history(cur, before_canary).parent_id

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

    # -- model registry ----------------------------------------------------------------------

    def add_model_version(self, name: str, version: str, digest: str, signer: str,
                          manifest: str, actor: str, reason: str = "") -> ModelVersion:
        """Record a pushed version (pushed_at is now), audited as "model.push" in the same
        transaction. Versions are immutable: FailedPrecondition when it exists."""
        _require(name=name, version=version, digest=digest, signer=signer, actor=actor)
        with self._write() as cur:
            at = self._now()
            if self._one(cur, "SELECT digest FROM model_versions WHERE name = ? AND "
                              "version = ?", (name, version)):
                raise FailedPrecondition(f"model '{name}' version {version} is already in the "
                                         "registry; versions are immutable, push a new one")
            row = ModelVersion(name, version, digest, signer, manifest, actor, at)
            self._exec(cur, "INSERT INTO model_versions (name, version, digest, signer, "
                            "manifest, pushed_by, pushed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, version, digest, signer, manifest, actor, at))
            self._append(cur, at, actor, "model.push", f"{name}/{version}", "",
                         json.dumps({"digest": digest, "signer": signer}, sort_keys=True),
                         reason)
        return row

    def model_versions(self, name: str = "") -> list[ModelVersion]:
        """Pushed versions (of `name`, or all), by name then version number."""
        with self._read() as cur:
            rows = self._exec(cur, "SELECT name, version, digest, signer, manifest, pushed_by, "
                                   "pushed_at FROM model_versions").fetchall()
        found = [ModelVersion(*row) for row in rows if not name or row[0] == name]
        return sorted(found, key=lambda v: (v.name, int(v.version) if v.version.isdigit()
                                            else 0, v.version))

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
            # fetchmany(0) means "a default amount" (sqlite3: all rows; psycopg: one).
            found = (rows.fetchall() if limit is None else
                     rows.fetchmany(limit) if limit > 0 else [])
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

    def _append(self, cur: Any, at: str, actor: str, action: str, subject: str,
                before: str, after: str, reason: str) -> AuditEntry:
        head = self._one(cur, audit_log.SELECT_HEAD)
        seq, prev_hash = (head[0] + 1, head[1]) if head else (1, audit_log.GENESIS)
        entry = audit_log.make_entry(seq, at, actor, action, subject, before, after, reason,
                                     prev_hash)
        self._exec(cur, audit_log.INSERT, audit_log.to_row(entry))
        return entry


def _postgresql_url(path_or_url: str | Path) -> str | None:
    """The libpq URL for a PostgreSQL store URL; None for anything else."""
    if isinstance(path_or_url, Path):
        return None
    scheme, sep, rest = str(path_or_url).partition("://")
    scheme = scheme.lower()
    if not sep or not scheme.startswith("postgres"):
        return None
    if scheme in ("postgresql", "postgres"):
        return str(path_or_url)
    if scheme == "postgresql+psycopg":  # SQLAlchemy's spelling of the same URL
        return f"postgresql://{rest}"
    # The URL is not echoed: it may carry a password.
    raise InvalidArgument(f"unsupported store URL scheme '{scheme}': give postgresql://..., "
                          "a file path or sqlite:///path")


def _url_secrets(url: str) -> set[str]:
    """The password of a PostgreSQL URL as written and decoded, and the URL itself: what
    `_scrub` removes from messages."""
    secrets = {url}
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return secrets
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        secrets.add(userinfo.partition(":")[2])
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "password":
            secrets.add(value)
    return secrets | {urllib.parse.unquote(secret) for secret in secrets}


def _scrub(message: str, secrets: set[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message.strip()


def _postgresql_location(user: str, host: str, port: int | str, dbname: str) -> str:
    """`postgresql://USER@HOST:PORT/DB`, without password or parameters: the store's name in
    messages. A Unix socket directory is percent-encoded, as libpq accepts it."""
    quoted = urllib.parse.quote
    return (f"postgresql://{quoted(user, safe='')}@{quoted(host, safe='')}:{port}/"
            f"{quoted(dbname, safe='')}")


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
    if scheme != "sqlite":
        raise InvalidArgument(f"unsupported store URL scheme '{scheme}': give a file path, "
                              "sqlite:///path or postgresql://...")
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
