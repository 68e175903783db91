"""A tamper-evident audit log: a hash chain of entries, and the SQL table that holds it.

Each entry carries the sha256 of its own fields (`hash`) and the hash of the entry before
it (`prev_hash`; the first entry follows `GENESIS`, 64 zeros). `verify` recomputes every
hash and follows the chain, so an entry edited in place, an entry re-hashed after an edit,
and entries removed from the middle are all reported.

What the chain cannot show on its own: entries removed from the *end*. A log cut after
entry 7 is a perfectly valid chain of 7 entries. To detect that, export `head_hash` from
time to time (to another system, a ticket, a signed message) and pass it back to `verify`
as `anchor`: the log must still contain the entry with that hash. Likewise, someone who can
rewrite the whole table can rebuild a consistent chain; the anchor is what catches that.

The functions here are pure; `meshserve.mesh.store_audit` reads and writes the table.
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    """One recorded change. `before`/`after` are the subject's JSON ("" when absent)."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str
    before: str
    after: str
    reason: str
    prev_hash: str
    hash: str


def utc_timestamp(moment: datetime) -> str:
    """`2026-05-09T07:35:25.123456Z`: UTC, ISO-8601, microseconds, `Z`. Naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def entry_hash(seq: int, at: str, actor: str, action: str, subject: str, before: str,
               after: str, reason: str, prev_hash: str) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces, UTF-8) of the fields."""
    fields = {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject,
              "before": before, "after": after, "reason": reason, "prev_hash": prev_hash}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def make_entry(seq: int, at: str, actor: str, action: str, subject: str, before: str,
               after: str, reason: str, prev_hash: str) -> AuditEntry:
    """An entry with its hash filled in."""
    digest = entry_hash(seq, at, actor, action, subject, before, after, reason, prev_hash)
    return AuditEntry(seq, at, actor, action, subject, before, after, reason, prev_hash, digest)


def recomputed_hash(entry: AuditEntry) -> str:
    return entry_hash(entry.seq, entry.at, entry.actor, entry.action, entry.subject,
                      entry.before, entry.after, entry.reason, entry.prev_hash)


def head_hash(entries: Iterable[AuditEntry]) -> str:
    """The hash of the last entry (`GENESIS` for an empty log): the anchor to export."""
    head = GENESIS
    for entry in entries:
        head = entry.hash
    return head


def verify(entries: Iterable[AuditEntry], *, prev: AuditEntry | None = None,
           anchor: str | None = None) -> list[str]:
    """The problems found in a chain given in seq order; an empty list means intact.

    `entries` is the whole log from seq 1, or a window of it together with `prev`, the
    entry just before the window. `anchor` is a `head_hash` exported earlier: the entry
    with that hash must still be present (the only way to notice a removed tail).
    """
    problems: list[str] = []
    hashes = {GENESIS} if prev is None else {GENESIS, prev.hash}
    for entry in entries:
        if recomputed_hash(entry) != entry.hash:
            problems.append(f"entry {entry.seq} was altered")
        expected_seq = prev.seq + 1 if prev is not None else 1
        if entry.seq > expected_seq:
            problems.append(_missing(expected_seq, entry.seq - 1))
        elif entry.seq < expected_seq:
            after = f"entry {prev.seq}" if prev is not None else "the start"
            problems.append(f"entry {entry.seq} is out of order or repeated (after {after})")
        elif prev is None and entry.prev_hash != GENESIS:
            problems.append(f"entry {entry.seq} does not follow the genesis")
        elif prev is not None and entry.prev_hash != prev.hash:
            problems.append(f"entry {entry.seq} does not follow entry {prev.seq}")
        hashes.add(entry.hash)
        prev = entry
    if anchor is not None and anchor not in hashes:
        problems.append(f"the anchored entry (hash {anchor[:12]}...) is missing: the log was "
                        "truncated or rewritten")
    return problems


def _missing(first: int, last: int) -> str:
    return f"entry {first} is missing" if first == last else f"entries {first}..{last} are missing"


# The table, in SQL that SQLite and PostgreSQL both accept. `seq` is assigned by the writer
# (it is part of the hash), so no autoincrement is needed; column names avoid the keywords
# BEFORE/AFTER/AT.
TABLE = "audit_log"
COLUMNS: Sequence[str] = ("seq", "at_utc", "actor", "action", "subject", "before_value",
                          "after_value", "reason", "prev_hash", "entry_hash")
CREATE_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    seq INTEGER PRIMARY KEY,
    at_utc TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    before_value TEXT NOT NULL,
    after_value TEXT NOT NULL,
    reason TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
)"""
INSERT = (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('?' for _ in COLUMNS)})")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
SELECT_HEAD = f"SELECT seq, entry_hash FROM {TABLE} WHERE seq = (SELECT MAX(seq) FROM {TABLE})"


def to_row(entry: AuditEntry) -> tuple:
    return (entry.seq, entry.at, entry.actor, entry.action, entry.subject, entry.before,
            entry.after, entry.reason, entry.prev_hash, entry.hash)


def from_row(row: Sequence) -> AuditEntry:
    return AuditEntry(int(row[0]), *(str(value) for value in row[1:]))
