"""What happened to each request of a chaos run, and the tally per scenario (no I/O).

Every request sent ends in exactly one outcome:

- succeeded: answered OK with outputs equal to a local forward pass of the version that
  answered;
- refused: told promptly and clearly that it was not served (RESOURCE_EXHAUSTED,
  UNAVAILABLE or DEADLINE_EXCEEDED with a non-empty message, before the client's deadline);
- failed: any other status, an empty message, or a wrong output;
- lost: accepted but never answered (the client's own deadline ran out, or the driver's
  bookkeeping shows a request that never completed).
"""

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from meshserve.tools.load_results import percentiles


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    REFUSED = "refused"
    FAILED = "failed"
    LOST = "lost"


REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
# What malformed input may be told: anything clear, never INTERNAL or UNKNOWN.
INPUT_REFUSALS = REFUSALS | {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
                             "OUT_OF_RANGE", "UNIMPLEMENTED"}


def classify(code: str, message: str, elapsed: float, deadline: float,
             output_ok: bool = False, refusals: frozenset[str] = REFUSALS) -> Outcome:
    """The outcome of one answered call: `code` is the status name ("OK" on success),
    `elapsed` the seconds it took against the client's `deadline`, `output_ok` whether an
    OK answer matched the local forward pass; `refusals` are the codes that count as a
    clear refusal (for malformed input, INVALID_ARGUMENT is one)."""
    if code == "OK":
        return Outcome.SUCCEEDED if output_ok else Outcome.FAILED
    if code == "DEADLINE_EXCEEDED" and elapsed >= deadline * 0.95:
        return Outcome.LOST  # held until the client gave up: never answered
    if code in refusals and message.strip():
        return Outcome.REFUSED
    return Outcome.FAILED


@dataclass
class Tally:
    """Counts of one scenario; `statuses` counts every non-OK status name seen, and
    `examples` keeps the first message of each (for the report)."""

    scenario: str
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: dict[Outcome, list[float]] = field(default_factory=dict)  # each call's latency

    def record(self, outcome: Outcome, code: str = "OK", message: str = "",
               elapsed: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if elapsed is not None:
            self.seconds.setdefault(outcome, []).append(elapsed)
        if code != "OK":
            self.statuses[code] += 1
            self.examples.setdefault(f"{outcome.value} {code}", message[:160])

    def p99_ms(self, outcome: Outcome) -> float | None:
        """The 99th percentile latency of the calls that ended in `outcome` (nearest rank),
        in ms; None when none did."""
        return percentiles([s * 1000 for s in self.seconds.get(outcome, ())])["p99"]

    def never_answered(self, count: int) -> None:
        """Requests the driver sent but saw no completion of at all."""
        self.outcomes[Outcome.LOST] += count

    def add(self, other: "Tally") -> None:
        self.sent += other.sent
        self.outcomes.update(other.outcomes)
        for outcome, seconds in other.seconds.items():
            self.seconds.setdefault(outcome, []).extend(seconds)
        self.statuses.update(other.statuses)
        for key, value in other.examples.items():
            self.examples.setdefault(key, value)

    @property
    def succeeded(self) -> int:
        return self.outcomes[Outcome.SUCCEEDED]

    @property
    def refused(self) -> int:
        return self.outcomes[Outcome.REFUSED]

    @property
    def failed(self) -> int:
        return self.outcomes[Outcome.FAILED]

    @property
    def lost(self) -> int:
        return self.outcomes[Outcome.LOST]

    @property
    def accounted(self) -> bool:
        """Every request sent has exactly one outcome."""
        return sum(self.outcomes.values()) == self.sent


@dataclass(frozen=True)
class Row:
    """One line of the report: a scenario's tally and what its fault allows."""

    tally: Tally
    fault: str
    max_failed: int = 0  # failures the fault makes unavoidable, all with status `tolerated`
    tolerated: str = ""
    max_refused: int | None = None  # None: any number of clear refusals is acceptable

    @property
    def verdict(self) -> str:
        tally = self.tally
        if not tally.accounted:
            return "FAIL (unaccounted requests)"
        if tally.lost:
            return "FAIL (lost requests)"
        if tally.failed > self.max_failed:
            return f"FAIL (failed > {self.max_failed})"
        if tally.failed and set(tally.statuses) - REFUSALS - {self.tolerated}:
            return f"FAIL (failures other than {self.tolerated})"
        if self.max_refused is not None and tally.refused > self.max_refused:
            return f"FAIL (refused > {self.max_refused})"
        return "pass"


def markdown_table(rows: list[Row]) -> str:
    """The report as a Markdown table, one scenario per line."""
    lines = ["| scenario | fault | sent | succeeded | refused | failed | lost | statuses "
             "| p99 ms succeeded / refused | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        t = row.tally
        statuses = ", ".join(f"{code} {n}" for code, n in sorted(t.statuses.items())) or "-"
        p99 = " / ".join("-" if ms is None else f"{ms:,.0f}" for ms in (
            t.p99_ms(Outcome.SUCCEEDED), t.p99_ms(Outcome.REFUSED)))
        lines.append(f"| {t.scenario} | {row.fault} | {t.sent} | {t.succeeded} | {t.refused} "
                     f"| {t.failed} | {t.lost} | {statuses} | {p99} | {row.verdict} |")
    return "\n".join(lines) + "\n"
