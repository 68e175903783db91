"""Automated canary analysis: one verdict per interval from the statistics of two versions,
and the weights each step serves. Pure: the caller measures each interval, applies the
verdict's weight and keeps the time.

A canary moves weight only between its baseline and its candidate (`Split`): every other
version keeps the weight it had when the canary started, at every step, at promotion and at
rollback. The baseline is the version named with `--from`, or else the version other than
the candidate with the most weight (a tie is refused: name one). The two of them carry a
`share` of the traffic when the canary starts; that share is all a canary can move.

A plan's `steps` are the candidate's weight at each step, in percent of the model's unpinned
traffic (as `traffic status` shows it). Requested steps end at 100 (`parse_steps`);
`candidate_steps` caps them at the share, so the first step that reaches it is the last:
steps 10,50,100 with a share of 70 are 10,50,70, with a share of 30 they are 10,30.

After each interval of `interval_s`, `judge` compares the canary's last window with the
baseline's:

1. canary error rate (failures / requests) above `max_error_rate` → rollback;
2. both p99 latencies known, baseline p99 above 0, canary p99 / baseline p99 above
   `max_latency_ratio` → rollback;
3. fewer than `min_requests` canary requests → hold (same weight, wait another interval);
4. at the last step → promote (the candidate keeps the whole share), else step to the next
   step's weight.

Being exactly at a bound is healthy. Errors are judged before the request count: a burst of
failures rolls back at once, however few requests it took. A rollback (or an abort) restores
the policy in force when the canary started (`restored`), not the baseline's last step.
"""

import math
import re
from dataclasses import dataclass, replace

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.mesh.policy import TrafficPolicy, is_version

HOLD, STEP, PROMOTE, ROLLBACK = "hold", "step", "promote", "rollback"


def parse_steps(text: str) -> tuple[int, ...]:
    """`"5,25,50,100"` → `(5, 25, 50, 100)`: strictly increasing, 1..100, ending at 100."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(part.isascii() and part.isdigit() for part in parts):
        raise InvalidArgument(f"steps '{text}' are not comma-separated whole percents "
                              "(for example 5,25,50,100)")
    return _check_requested(tuple(int(part) for part in parts))


def _check_requested(steps: tuple[int, ...]) -> tuple[int, ...]:
    if not steps or steps[-1] != 100:
        raise InvalidArgument(f"steps {_show(steps)} must end at 100")
    return _check_steps(steps)


def _check_steps(steps: tuple[int, ...]) -> tuple[int, ...]:
    if not steps:
        raise InvalidArgument("a canary needs at least one step")
    if any(isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 100
           for step in steps):
        raise InvalidArgument(f"steps {_show(steps)} must each be between 1 and 100")
    if any(a >= b for a, b in zip(steps, steps[1:])):
        raise InvalidArgument(f"steps {_show(steps)} must increase")
    return steps


def _show(steps: tuple[int, ...]) -> str:
    return ",".join(str(step) for step in steps) or "(none)"


_PART = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?:ms|s|m|h)"
_DURATION = re.compile(rf"(?:{_PART}\s*)+")
_PARTS = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# The longest canary interval: a step waits at most a day.
MAX_INTERVAL_S = 24 * 3600.0


def parse_duration(text: str, most: float = MAX_INTERVAL_S) -> float:
    """`"30s"`, `"2m"`, `"500ms"`, `"1h"`, `"1.5m"`, `"1m30s"` → seconds (above 0, at most
    `most`)."""
    if _DURATION.fullmatch(text.strip()) is None:
        raise InvalidArgument(f"duration '{text}' is not a number with a unit of ms, s, m or h "
                              "(for example 30s or 1m30s)")
    seconds = sum(float(m["number"]) * _SECONDS[m["unit"]] for m in _PARTS.finditer(text))
    if seconds <= 0:
        raise InvalidArgument(f"duration '{text}' must be above 0")
    if seconds > most:
        raise InvalidArgument(f"duration '{text}' is longer than {most:g} s")
    return seconds


@dataclass(frozen=True)
class CanaryPlan:
    """`baseline` "" (as requested without `--from`): the control plane chooses it when the
    canary starts (`choose_baseline`). `steps`: the candidate's weight at each step; as
    requested they end at 100, as run (`candidate_steps`) at the share moved."""

    model: str
    baseline: str
    canary: str
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = 30.0
    max_error_rate: float = 0.01
    max_latency_ratio: float = 1.5
    min_requests: int = 20

    def __post_init__(self) -> None:
        for role, version in (("baseline", self.baseline), ("canary", self.canary)):
            if not is_version(version) and (role, version) != ("baseline", ""):
                raise InvalidArgument(f"{role} version '{version}' of model '{self.model}' is "
                                      "not a number")
        if self.baseline == self.canary:
            raise InvalidArgument(f"baseline and canary are both version '{self.canary}'")
        _check_steps(tuple(self.steps))
        if not (math.isfinite(self.interval_s) and 0 < self.interval_s <= MAX_INTERVAL_S):
            raise InvalidArgument(f"interval {self.interval_s} s must be above 0 and at most "
                                  f"{MAX_INTERVAL_S:g} s")
        if not 0 <= self.max_error_rate <= 1:
            raise InvalidArgument(f"max error rate {self.max_error_rate} must be between 0 "
                                  "and 1")
        if not (math.isfinite(self.max_latency_ratio) and self.max_latency_ratio >= 1):
            raise InvalidArgument(f"max latency ratio {self.max_latency_ratio} must be at "
                                  "least 1")
        if self.min_requests < 1:
            raise InvalidArgument(f"min requests {self.min_requests} must be at least 1")


@dataclass(frozen=True)
class VersionWindow:
    """Statistics of one version over the last interval."""

    requests: int
    failures: int
    latency_p99_ms: float | None

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.failures <= self.requests:
            raise InvalidArgument(f"window of {self.requests} requests cannot have "
                                  f"{self.failures} failures")
        if self.latency_p99_ms is not None and not self.latency_p99_ms >= 0:
            raise InvalidArgument(f"p99 latency {self.latency_p99_ms} ms must be at least 0")

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    action: str  # "hold" | "step" | "promote" | "rollback"
    # The candidate's weight to apply; 0 for a rollback, which restores the whole policy in
    # force before the canary (`restored`) instead.
    weight: int
    reason: str


def judge(plan: CanaryPlan, step_index: int, baseline: VersionWindow,
          canary: VersionWindow) -> Verdict:
    """The verdict on the interval just measured, the canary being at `plan.steps[step_index]`."""
    if not 0 <= step_index < len(plan.steps):
        raise InvalidArgument(f"step index {step_index} is not one of the plan's "
                              f"{len(plan.steps)} steps")
    current = plan.steps[step_index]
    if canary.requests >= 1 and canary.error_rate > plan.max_error_rate:
        rate, bound = _distinct(canary.error_rate, plan.max_error_rate, 3)
        return Verdict(ROLLBACK, 0, f"error rate {rate} > {bound} over {canary.requests} "
                                    "requests")
    b99, c99 = baseline.latency_p99_ms, canary.latency_p99_ms
    if b99 is not None and c99 is not None and b99 > 0 and c99 / b99 > plan.max_latency_ratio:
        ratio, bound = _distinct(c99 / b99, plan.max_latency_ratio, 2)
        return Verdict(ROLLBACK, 0, f"p99 latency ratio {ratio} > {bound} ({c99:g} ms vs "
                                    f"baseline {b99:g} ms)")
    if canary.requests < plan.min_requests:
        return Verdict(HOLD, current, f"only {canary.requests} requests, need "
                                      f"{plan.min_requests}")
    health = (f"error rate {canary.error_rate:.3f} <= {plan.max_error_rate:.3f} over "
              f"{canary.requests} requests")
    if step_index == len(plan.steps) - 1:
        return Verdict(PROMOTE, current, f"healthy at {current}%: {health}")
    following = plan.steps[step_index + 1]
    return Verdict(STEP, following, f"healthy at {current}%: {health}; next {following}%")


def _distinct(value: float, bound: float, digits: int) -> tuple[str, str]:
    """Both numbers with `digits` decimals, or more where that would show them equal."""
    while f"{value:.{digits}f}" == f"{bound:.{digits}f}" and digits < 9:
        digits += 1
    return f"{value:.{digits}f}", f"{bound:.{digits}f}"


def choose_baseline(policy: TrafficPolicy, canary: str, named: str = "") -> str:
    """The version a canary to `canary` takes weight from: `named` (`--from`) when given,
    else the other version with the most weight. A tie for the most is refused, and so is a
    baseline that carries nothing (there would be no traffic to move)."""
    _check_member(policy, canary)
    if named:
        _check_member(policy, named)
        if named == canary:
            raise InvalidArgument(f"baseline and canary are both version '{canary}'")
        baseline = named
    else:
        others = {v: w for v, w in policy.weights.items() if v != canary}
        most = max(others.values(), default=0)
        leaders = sorted((v for v, w in others.items() if w == most), key=int)
        if most == 0:
            raise FailedPrecondition(f"version '{canary}' already carries all unpinned traffic "
                                     f"of model '{policy.model}'; no other version has any to "
                                     "move")
        if len(leaders) > 1:
            names = f"{', '.join(leaders[:-1])} and {leaders[-1]}"
            raise InvalidArgument(f"versions {names} of model '{policy.model}' "
                                  f"{'both' if len(leaders) == 2 else 'all'} carry {most}%; "
                                  f"name the baseline with --from (for example --from "
                                  f"{leaders[0]})")
        baseline = leaders[0]
    if policy.weights[baseline] == 0:
        raise FailedPrecondition(f"baseline version '{baseline}' of model '{policy.model}' "
                                 f"carries no traffic, so there is none to move to version "
                                 f"'{canary}'")
    return baseline


def _check_member(policy: TrafficPolicy, version: str) -> None:
    if version not in policy.weights:
        raise InvalidArgument(f"model '{policy.model}' has no version '{version}' "
                              f"(versions: {', '.join(policy.versions)})")


def candidate_steps(requested: tuple[int, ...], share: int) -> tuple[int, ...]:
    """The candidate's weight at each requested step, capped at `share`; the first step
    that reaches the share is the last (10,50,100 with a share of 30: 10,30)."""
    _check_requested(tuple(requested))
    if not 1 <= share <= 100:
        raise InvalidArgument(f"a canary's share {share} is not between 1 and 100")
    capped = [min(step, share) for step in requested]
    return tuple(capped[:capped.index(share) + 1])  # the last requested step, 100, reaches it


@dataclass(frozen=True)
class Split:
    """The weights a canary serves: `start` (every version's weight when it started) with
    weight moved only between `baseline` and `canary`, whose `share` stays theirs."""

    start: dict[str, int]
    baseline: str
    canary: str

    def __post_init__(self) -> None:
        for version in (self.baseline, self.canary):
            if version not in self.start:
                raise InvalidArgument(f"version '{version}' has no weight in {self.start}")
        if self.baseline == self.canary:
            raise InvalidArgument(f"baseline and canary are both version '{self.canary}'")

    @property
    def share(self) -> int:
        return self.start[self.baseline] + self.start[self.canary]

    def weights(self, canary_weight: int) -> dict[str, int]:
        """Every version's weight with the candidate at `canary_weight` and the baseline at
        the rest of the share."""
        if isinstance(canary_weight, bool) or not 0 <= canary_weight <= self.share:
            raise InvalidArgument(f"canary weight {canary_weight} is not between 0 and the "
                                  f"share {self.share} of versions {self.baseline} and "
                                  f"{self.canary}")
        return {**self.start, self.baseline: self.share - canary_weight,
                self.canary: canary_weight}


def restored(start: TrafficPolicy, current: TrafficPolicy) -> TrafficPolicy:
    """What a rollback serves: the policy in force when the canary started, exactly; a
    version registered since keeps weight 0 (and stays pinnable)."""
    added = {version: 0 for version in current.weights if version not in start.weights}
    return replace(start, weights={**start.weights, **added})
