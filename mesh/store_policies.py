"""Traffic policies in the store, with their history.

Policy history is an undo stack, not a toggle. Every change appends a row to
`policy_history` whose `parent_id` is the row that was current before it:

    put P1, put P2, put P3        current P3 (parent P2 (parent P1))
    rollback  -> P2               a new row with P2's policy and P2's parent (P1)
    rollback  -> P1               a new row with P1's policy and no parent
    rollback  -> FailedPrecondition: nothing earlier

A rollback restores weights, shadow and region, never a version's existence: a version
the current policy names (or that `keep` names: registered endpoints) stays, at weight 0
when the restored policy did not know it. A `put_policy` of the policy already current
changes nothing (no row, no audit entry); with `expected`, it is refused (`PolicyChanged`)
unless the current policy is still the one the change was computed from.

A `put_policy` after a rollback continues from the restored policy. A canary's policies
count as one change (see `put_canary`): rolling back a promoted canary restores the policy
it started from, and a canary that was rolled back leaves the stack as it found it. Rows
are never updated or deleted, so the full sequence of what was served stays in the table
(and in the audit log).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from meshserve.mesh.database import Dialect, require
from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store_audit import AuditChain

TABLES = ("policy_history", "current_policy")


def schema(dialect: Dialect) -> list[str]:
    return [
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
    ]


@dataclass(frozen=True)
class HistoryRow:
    id: int
    policy: str
    parent_id: int | None


_CURRENT = """SELECT h.id, h.policy, h.parent_id FROM current_policy c
    JOIN policy_history h ON h.id = c.history_id WHERE c.model = ?"""


class PolicyChanged(ServingError):
    """The policy changed since the caller read it: read it again and recompute."""

    code = "ABORTED"


class PolicyHistory(AuditChain):
    """Each model's current policy and the undo stack behind it."""

    def put_policy(self, policy: TrafficPolicy, actor: str, reason: str = "",
                   expected: TrafficPolicy | None = None) -> bool:
        """Make `policy` its model's current policy; recorded in the history and audited
        ("policy.set"), in one transaction. False (nothing recorded) when it is current
        already. With `expected`, `PolicyChanged` unless the current policy is that one."""
        if not isinstance(policy, TrafficPolicy):
            raise InvalidArgument(f"expected a TrafficPolicy, got {type(policy).__name__}")
        require(actor=actor)
        after = policy.to_json()
        with self._write() as cur:
            at = self._now()
            current = self._current(cur, policy.model)
            now = TrafficPolicy.from_json(current.policy) if current else None
            if expected is not None and now != expected:
                raise PolicyChanged(f"the policy of model '{policy.model}' changed since it "
                                    "was read; read it again")
            if now == policy:
                return False
            self._record_policy(cur, policy.model, after, current.id if current else None, at,
                                actor, "policy.set", reason)
            self._append(cur, at, actor, "policy.set", policy.model,
                         current.policy if current else "", after, reason)
        return True

    def policy(self, model: str) -> TrafficPolicy | None:
        with self._read() as cur:
            current = self._current(cur, model)
        return TrafficPolicy.from_json(current.policy) if current else None

    def policies(self) -> dict[str, TrafficPolicy]:
        """Every model's current policy, by model name (sorted)."""
        with self._read() as cur:
            return self._policies(cur)

    def previous_policy(self, model: str) -> TrafficPolicy | None:
        """The policy before the current one as recorded, or None when there is none
        (`rollback` restores it naming every version the current one names too)."""
        with self._read() as cur:
            current = self._current(cur, model)
            if current is None or current.parent_id is None:
                return None
            previous = self._history(cur, current.parent_id)
        return TrafficPolicy.from_json(previous.policy)

    def rollback(self, model: str, actor: str, reason: str = "",
                 keep: Iterable[str] = ()) -> TrafficPolicy:
        """Make the policy before the current one current again (see the module docstring:
        repeated rollbacks walk further back), naming every version the current one names
        and every version of `keep` (those it did not know at weight 0). Recorded as a new
        history row and audited ("policy.rollback"). NotFound when the model has no policy;
        FailedPrecondition when its history has nothing earlier."""
        require(actor=actor)
        keep = tuple(keep)
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
            policy = _restored(previous, current, keep)
            self._record_policy(cur, model, policy.to_json(), previous.parent_id, at, actor,
                                "policy.rollback", reason)
            self._append(cur, at, actor, "policy.rollback", model, current.policy,
                         policy.to_json(), reason)
        return policy

    def _current(self, cur: Any, model: str) -> HistoryRow | None:
        row = self._one(cur, _CURRENT, (model,))
        return HistoryRow(row[0], row[1], row[2]) if row else None

    def _history(self, cur: Any, history_id: int) -> HistoryRow:
        row = self._one(cur, "SELECT id, policy, parent_id FROM policy_history WHERE id = ?",
                        (history_id,))
        return HistoryRow(row[0], row[1], row[2])

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


def _restored(previous: HistoryRow, current: HistoryRow, keep: Iterable[str]) -> TrafficPolicy:
    """`previous` as a rollback restores it: with every version `current` or `keep` names."""
    names = TrafficPolicy.from_json(current.policy).weights
    return TrafficPolicy.from_json(previous.policy).with_versions([*names, *keep])
