"""The audit chain's table in the store: entries appended in the transaction of the change
they record (see `meshserve.mesh.audit` for the chain itself)."""

from typing import Any

from meshserve.common.errors import InvalidArgument
from meshserve.mesh import audit as audit_log
from meshserve.mesh.audit import AuditEntry
from meshserve.mesh.database import Database, TableRows, require

TABLES = (audit_log.TABLE,)


def schema() -> list[str]:
    return [audit_log.CREATE_TABLE]


class AuditChain(Database):
    """Appending to and reading the audit chain; every other table's writes append here."""

    def append_audit(self, actor: str, action: str, subject: str, before: str = "",
                     after: str = "", reason: str = "") -> AuditEntry:
        """Append one entry to the audit chain, in its own transaction."""
        require(actor=actor, action=action)
        with self._write() as cur:
            at = self._now()
            return self._append(cur, at, actor, action, subject, before, after, reason)

    def restore_tables(self, tables: dict[str, TableRows], actor: str, action: str,
                       subject: str, after: str = "") -> list[AuditEntry]:
        """Fill an empty store with exported rows (see `import_tables`) and append the entry
        that records it, in one transaction; the whole chain, read in it, is returned. A
        failure anywhere leaves the store as it was: FailedPrecondition, on one line, also
        for the driver's errors (a refused row, a dropped connection)."""
        require(actor=actor, action=action)
        committing = False
        try:
            with self._write() as cur:
                self._import(cur, tables)
                self._append(cur, self._now(), actor, action, subject, "", after, "")
                rows = self._exec(cur, f"{audit_log.SELECT} ORDER BY seq").fetchall()
                committing = True
        except self._driver_error as exc:
            raise self._restore_failed(exc, committing) from None
        return [audit_log.from_row(row) for row in rows]

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

