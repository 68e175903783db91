"""The store's one connection and its SQL dialect: opening SQLite or PostgreSQL, creating the
schema, transactions, and copying every table out and back in (backup and restore).

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
"""

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.mesh import audit as audit_log
from meshserve.mesh.database_urls import (
    postgresql_location,
    postgresql_url,
    scrub,
    sqlite_path,
    url_secrets,
)

Clock = Callable[[], datetime]

SCHEMA_VERSION = 1


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



@dataclass(frozen=True)
class TableRows:
    """One table's column names and rows, as a backup carries them."""

    columns: tuple[str, ...]
    rows: list[tuple]


class Database:
    """One connection to the store's database, behind one lock. A subclass names its tables
    (`TABLES`, each before the tables whose foreign keys name it: the order in which
    `export_tables` and `import_tables` copy them) and their `CREATE TABLE` statements
    (`schema`). Open with `open`; use as a context manager or call `close()`."""

    TABLES: tuple[str, ...] = ()

    def schema(self) -> list[str]:
        """The statements that create the tables (`CREATE TABLE IF NOT EXISTS`)."""
        return []

    def __init__(self, connection: Any, dialect: Dialect, clock: Clock, location: str, *,
                 reconnect: Callable[[], Any] | None = None,
                 driver_error: type[Exception] = sqlite3.Error,
                 secrets: frozenset[str] = frozenset()) -> None:
        self._conn = connection  # a DB-API connection: sqlite3's or psycopg's
        self._dialect = dialect
        self._clock = clock
        self._location = location
        # Opens a new connection when the server dropped ours (PostgreSQL); None: never.
        self._reconnect = reconnect
        # The driver's base exception, and what its messages must not show (`driver_message`).
        self._driver_error = driver_error
        self._secrets = secrets
        self._lock = threading.Lock()
        self._closed = False


    # -- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str | Path, *, clock: Clock = _utc_now):
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
        url = postgresql_url(path_or_url)
        if url is not None:
            return cls._open_postgresql(url, clock)
        path = sqlite_path(path_or_url)
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
    def _open_postgresql(cls, url: str, clock: Clock):
        try:
            import psycopg
        except ImportError:
            raise FailedPrecondition("a PostgreSQL store needs the psycopg package, which is "
                                     "not installed: pip install 'psycopg[binary]'") from None
        secrets = url_secrets(url)
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
                                         f"{driver_message(exc, secrets)}") from None

        connection = connect()
        info = connection.info
        location = postgresql_location(info.user, info.host, info.port, info.dbname)
        store = cls(connection, POSTGRESQL, clock, location, reconnect=connect,
                    driver_error=psycopg.Error, secrets=frozenset(secrets))
        try:
            store._create_schema()
        except psycopg.Error as exc:
            connection.close()
            raise FailedPrecondition(f"cannot open the store at {location}: "
                                     f"{driver_message(exc, secrets)}") from None
        except BaseException:
            connection.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._dialect.name}:{self._location})"

    def _create_schema(self) -> None:
        with self._transaction(self._dialect.begin_schema) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for statement in self.schema():
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
        transaction: a transaction-consistent dump). The driver's errors (a dropped
        connection) raise FailedPrecondition, on one line."""
        try:
            with self._read() as cur:
                return {table: self._table_rows(cur, table) for table in self.TABLES}
        except self._driver_error as exc:
            raise FailedPrecondition(f"reading the store at {self._location} failed: "
                                     f"{driver_message(exc, self._secrets)}") from None

    def import_tables(self, tables: dict[str, TableRows]) -> None:
        """Fill an empty store with exported rows, keys included, in one transaction.
        FailedPrecondition when the store already holds state or a table's columns differ.
        (A restore uses `restore_tables`, which records itself in the same transaction.)"""
        with self._write() as cur:
            self._import(cur, tables)

    def _import(self, cur: Any, tables: dict[str, TableRows]) -> None:
        for table in self.TABLES:
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

    def _restore_failed(self, error: Exception, committing: bool) -> FailedPrecondition:
        """What a restore's transaction that the driver failed did: rolled back, unless the
        connection was lost during its COMMIT, which the server may have carried out."""
        message = driver_message(error, self._secrets)
        if committing and self._reconnect is not None and self._conn.closed:
            return FailedPrecondition(
                f"restoring into the store at {self._location} failed: the connection was "
                f"lost during COMMIT ({message}), so whether it was committed is unknown: if "
                "the store now holds rows, empty it and restore again")
        return FailedPrecondition(f"restoring into the store at {self._location} failed: "
                                  f"{message}; nothing was restored (its transaction was "
                                  "rolled back)")

    def _table_rows(self, cur: Any, table: str) -> TableRows:
        rows = self._exec(cur, f"SELECT * FROM {table} ORDER BY 1, 2")
        columns = tuple(column[0] for column in rows.description)
        return TableRows(columns, [tuple(row) for row in rows.fetchall()])


def driver_message(error: Exception, secrets: set[str] | frozenset[str]) -> str:
    """A driver's error on one line, without `secrets`: PostgreSQL's CONTEXT (where in a
    function it was raised) left out, its other lines (DETAIL, HINT) joined."""
    lines = []
    for line in scrub(str(error), set(secrets)).splitlines():
        if line.startswith("CONTEXT:"):
            break
        lines.append(" ".join(line.split()))
    return " ".join(line for line in lines if line) or type(error).__name__


def require(**fields: str) -> None:
    """InvalidArgument unless every field is a non-empty string."""
    for name, value in fields.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{name} must be a non-empty string")
