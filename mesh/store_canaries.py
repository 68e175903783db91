"""Canary records in the store, and how a canary's policies join the policy history."""

import json
from typing import Any

from meshserve.common.errors import InvalidArgument
from meshserve.mesh.database import require
from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store_policies import HistoryRow, PolicyHistory

# How a canary's policy joins the policy history (see `Store.put_canary`).
START, OVER_START, RESTORE = "start", "over_start", "restore"
STACKINGS = (START, OVER_START, RESTORE)
CANARY_START = "canary.start"  # the history action of a canary's first step

TABLES = ("canaries",)


def schema() -> list[str]:
    return [
        """CREATE TABLE IF NOT EXISTS canaries (
            model TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            at_utc TEXT NOT NULL
        )""",
    ]


class Canaries(PolicyHistory):
    """Each model's canary record (any JSON object), written with the canary's policy."""

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
        require(model=model, actor=actor, action=action)
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

    def _canary_parent(self, cur: Any, model: str, current: HistoryRow | None,
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
