from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from meshserve.mesh.audit import (
    GENESIS,
    AuditEntry,
    entry_hash,
    head_hash,
    make_entry,
    recomputed_hash,
    utc_timestamp,
    verify,
)


def chain(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev_hash = GENESIS
    for seq in range(1, n + 1):
        entry = make_entry(seq, f"2026-01-01T00:00:{seq:02d}.000000Z", "alice", "policy.set",
                           f"model-{seq}", "" if seq == 1 else f'{{"n": {seq - 1}}}',
                           f'{{"n": {seq}}}', "test", prev_hash)
        entries.append(entry)
        prev_hash = entry.hash
    return entries


def rehash(entry: AuditEntry) -> AuditEntry:
    return replace(entry, hash=recomputed_hash(entry))


def test_entry_hash_is_sha256_hex_of_canonical_fields() -> None:
    digest = entry_hash(1, "2026-01-01T00:00:00.000000Z", "a", "x", "s", "", "", "", GENESIS)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == entry_hash(1, "2026-01-01T00:00:00.000000Z", "a", "x", "s", "", "", "",
                                GENESIS)
    # Every field counts, and fields cannot bleed into one another.
    assert digest != entry_hash(2, "2026-01-01T00:00:00.000000Z", "a", "x", "s", "", "", "",
                                GENESIS)
    assert entry_hash(1, "t", "ab", "c", "s", "", "", "", GENESIS) != \
        entry_hash(1, "t", "a", "bc", "s", "", "", "", GENESIS)


def test_genesis_and_head_hash() -> None:
    entries = chain(3)
    assert GENESIS == "0" * 64
    assert entries[0].prev_hash == GENESIS
    assert head_hash(entries) == entries[-1].hash
    assert head_hash([]) == GENESIS


def test_intact_chain_verifies() -> None:
    assert verify(chain(10)) == []
    assert verify([]) == []


def test_edited_field_is_reported_as_altered() -> None:
    entries = chain(10)
    entries[6] = replace(entries[6], after='{"n": 999}')
    assert verify(entries) == ["entry 7 was altered"]
    entries = chain(10)
    entries[2] = replace(entries[2], actor="mallory")
    assert verify(entries) == ["entry 3 was altered"]


def test_rehashed_edit_breaks_the_link_to_the_next_entry() -> None:
    entries = chain(10)
    entries[6] = rehash(replace(entries[6], reason="nothing to see"))
    assert verify(entries) == ["entry 8 does not follow entry 7"]


def test_rehashed_first_entry_with_wrong_genesis() -> None:
    entries = chain(3)
    entries[0] = rehash(replace(entries[0], prev_hash="1" * 64))
    assert verify(entries) == ["entry 1 does not follow the genesis",
                               "entry 2 does not follow entry 1"]


def test_deleted_middle_entries_are_reported_as_a_gap() -> None:
    entries = chain(10)
    del entries[4]
    assert verify(entries) == ["entry 5 is missing"]
    entries = chain(10)
    del entries[4:6]
    assert verify(entries) == ["entries 5..6 are missing"]


def test_deleted_first_entries_are_reported() -> None:
    assert verify(chain(5)[2:]) == ["entries 1..2 are missing"]


def test_window_verifies_against_the_entry_before_it() -> None:
    entries = chain(10)
    assert verify(entries[5:], prev=entries[4]) == []
    assert verify(entries[5:], prev=replace(entries[4], hash="f" * 64)) == \
        ["entry 6 does not follow entry 5"]


def test_repeated_entry_is_reported() -> None:
    entries = chain(4)
    entries.insert(3, entries[2])
    assert verify(entries) == ["entry 3 is out of order or repeated (after entry 3)"]


def test_removed_tail_needs_an_anchor() -> None:
    entries = chain(10)
    anchor = head_hash(entries)
    truncated = entries[:7]
    # Without an anchor a truncated log is a valid, shorter chain: undetectable.
    assert verify(truncated) == []
    problems = verify(truncated, anchor=anchor)
    assert len(problems) == 1 and "anchored entry" in problems[0]
    assert verify(entries, anchor=anchor) == []
    # Entries appended after the anchor was taken are fine.
    assert verify(chain(12), anchor=anchor) == []
    assert verify([], anchor=GENESIS) == []


def test_utc_timestamp_format() -> None:
    moment = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)
    assert utc_timestamp(moment) == "2026-05-09T07:35:25.123456Z"
    local = moment.astimezone(timezone(timedelta(hours=2)))
    assert utc_timestamp(local) == "2026-05-09T07:35:25.123456Z"
    assert utc_timestamp(moment.replace(tzinfo=None)) == "2026-05-09T07:35:25.123456Z"
