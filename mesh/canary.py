"""Automated canary analysis: one verdict per interval from the statistics of two versions.
Pure: the caller measures each interval, applies the verdict's weight and keeps the time.

A plan moves the canary through `steps` (percent of unpinned traffic). After each interval of
`interval_s`, `judge` compares the canary's last window with the baseline's:

1. canary error rate (failures / requests) above `max_error_rate` → rollback (weight 0);
2. both p99 latencies known, baseline p99 above 0, canary p99 / baseline p99 above
   `max_latency_ratio` → rollback;
3. fewer than `min_requests` canary requests → hold (same weight, wait another interval);
4. at the last step → promote (weight 100), else step to the next step's weight.

Being exactly at a bound is healthy. Errors are judged before the request count: a burst of
failures rolls back at once, however few requests it took.
"""

import math
import re
from dataclasses import dataclass

from meshserve.common.errors import InvalidArgument

HOLD, STEP, PROMOTE, ROLLBACK = "hold", "step", "promote", "rollback"


def parse_steps(text: str) -> tuple[int, ...]:
    """`"5,25,50,100"` → `(5, 25, 50, 100)`: strictly increasing, 1..100, ending at 100."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(part.isascii() and part.isdigit() for part in parts):
        raise InvalidArgument(f"steps '{text}' are not comma-separated whole percents "
                              "(for example 5,25,50,100)")
    return _check_steps(tuple(int(part) for part in parts))


def _check_steps(steps: tuple[int, ...]) -> tuple[int, ...]:
    if not steps or steps[-1] != 100:
        raise InvalidArgument(f"steps {_show(steps)} must end at 100")
    if any(not 1 <= step <= 100 for step in steps):
        raise InvalidArgument(f"steps {_show(steps)} must each be between 1 and 100")
    if any(a >= b for a, b in zip(steps, steps[1:])):
        raise InvalidArgument(f"steps {_show(steps)} must increase")
    return steps


def _show(steps: tuple[int, ...]) -> str:
    return ",".join(str(step) for step in steps) or "(none)"


_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """`"30s"`, `"2m"`, `"500ms"`, `"1h"`, `"1.5m"` → seconds (above 0)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"duration '{text}' is not a number with a unit of ms, s, m or h "
                              "(for example 30s)")
    seconds = float(match["number"]) * _SECONDS[match["unit"]]
    if seconds <= 0:
        raise InvalidArgument(f"duration '{text}' must be above 0")
    return seconds


@dataclass(frozen=True)
class CanaryPlan:
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
            if not version.isdigit():
                raise InvalidArgument(f"{role} version '{version}' of model '{self.model}' is "
                                      "not a number")
        if self.baseline == self.canary:
            raise InvalidArgument(f"baseline and canary are both version '{self.canary}'")
        _check_steps(tuple(self.steps))
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise InvalidArgument(f"interval {self.interval_s} s must be above 0")
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
    weight: int  # canary weight to apply
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
        return Verdict(PROMOTE, 100, f"healthy at {current}%: {health}")
    following = plan.steps[step_index + 1]
    return Verdict(STEP, following, f"healthy at {current}%: {health}; next {following}%")


def _distinct(value: float, bound: float, digits: int) -> tuple[str, str]:
    """Both numbers with `digits` decimals, or more where that would show them equal."""
    while f"{value:.{digits}f}" == f"{bound:.{digits}f}" and digits < 9:
        digits += 1
    return f"{value:.{digits}f}", f"{bound:.{digits}f}"


def weights(plan: CanaryPlan, canary_weight: int) -> dict[str, int]:
    """`{baseline: 100 - w, canary: w}`: both keys always, for `TrafficPolicy.with_weights`."""
    if isinstance(canary_weight, bool) or not 0 <= canary_weight <= 100:
        raise InvalidArgument(f"canary weight {canary_weight} is not between 0 and 100")
    return {plan.baseline: 100 - canary_weight, plan.canary: canary_weight}
