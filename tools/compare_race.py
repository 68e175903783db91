"""The race that opens `meshserve bench compare`'s report: ratios of one figure of two systems
measured in the same run (`GOALS`), the bounds the project holds itself to, and the medians
of several full runs. Pure functions of the measurements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshserve.tools.compare_tables import RunKey, latency_of, median, ratio, ratio_text, rps_of


@dataclass(frozen=True)
class Goal:
    """A ratio of one figure of two runs, and the bound the project holds it to."""

    label: str
    numerator: RunKey
    figure: str  # "rps", or a latency percentile ("p50", "p99")
    denominator: RunKey | None  # None: the in-process best-batch limit of the model
    at_least: float | None = None
    at_most: float | None = None

    def value(self, results: Mapping[RunKey, Mapping],
              limits: Mapping[str, float]) -> float | None:
        top = _figure(results.get(self.numerator), self.figure)
        if self.denominator is None:
            return ratio(top, limits.get(self.numerator[1]))
        return ratio(top, _figure(results.get(self.denominator), self.figure))

    def met(self, value: float | None) -> bool | None:
        """Whether `value` is within the bound (None when there is no value)."""
        if value is None:
            return None
        return not ((self.at_least is not None and value < self.at_least)
                    or (self.at_most is not None and value > self.at_most))

    def bound(self) -> str:
        parts = []
        if self.at_least is not None:
            parts.append(f"≥ {self.at_least:g}")
        if self.at_most is not None:
            parts.append(f"≤ {self.at_most:g}")
        return ", ".join(parts)


def _figure(result: Mapping | None, figure: str) -> float | None:
    return rps_of(result) if figure == "rps" else latency_of(result, figure)


GOALS = (
    Goal("mlp c=32 req/s: meshserve / Envoy mesh", ("meshserve", "mlp", 32, "unary"), "rps",
         ("triton-envoy", "mlp", 32, "unary"), at_least=1.0),
    Goal("mlp c=32 req/s: meshserve / Triton", ("meshserve", "mlp", 32, "unary"), "rps",
         ("triton", "mlp", 32, "unary"), at_least=0.8),
    Goal("mlp c=32 p99: meshserve / Envoy mesh", ("meshserve", "mlp", 32, "unary"), "p99",
         ("triton-envoy", "mlp", 32, "unary"), at_most=1.0),
    Goal("mlp c=1 p50: meshserve / Envoy mesh", ("meshserve", "mlp", 1, "unary"), "p50",
         ("triton-envoy", "mlp", 1, "unary"), at_most=1.0),
    Goal("cnn c=32 req/s: meshserve / in-process limit", ("meshserve", "cnn", 32, "unary"),
         "rps", None, at_least=0.9),
    Goal("mlp c=32 req/s: meshserve stream / unary", ("meshserve", "mlp", 32, "stream"), "rps",
         ("meshserve", "mlp", 32, "unary"), at_least=1.0),
)


def goal_rows(values_by_run: list[list[float | None]],
              goals: tuple[Goal, ...] = GOALS) -> list[list[str]]:
    """Rows of the race table: `values_by_run[run][goal]` is each goal's ratio in one run.

    One run: ratio, bound, met. Several: each run's ratio, their median, bound, and whether
    the median meets it.
    """
    rows = []
    for index, goal in enumerate(goals):
        values = [run[index] for run in values_by_run]
        middle = median(values)
        met = {True: "yes", False: "no", None: "—"}[goal.met(middle)]
        each = [ratio_text(v) for v in values] if len(values) > 1 else []
        rows.append([goal.label, *each, ratio_text(middle), goal.bound(), met])
    return rows


def goal_headers(runs: int) -> list[str]:
    if runs <= 1:
        return ["ratio", "measured", "goal", "met"]
    return ["ratio", *(f"run {i + 1}" for i in range(runs)), "median", "goal", "met"]


def median_results(results_by_run: list[Mapping[RunKey, Mapping]]) -> dict[RunKey, dict]:
    """Per run key, the median throughput, latency percentiles and server CPU per request over
    the runs that answered (requests: the sum over those runs)."""
    merged: dict[RunKey, dict] = {}
    keys = dict.fromkeys(key for results in results_by_run for key in results)
    for key in keys:
        answered = [r[key] for r in results_by_run if rps_of(r.get(key)) is not None]
        if not answered:
            continue
        names = dict.fromkeys(n for r in answered for n in (r.get("latency_ms") or {}))
        merged[key] = {
            "requests": sum(r["requests"] for r in answered),
            "runs": len(answered),
            "throughput_rps": median(rps_of(r) for r in answered),
            "latency_ms": {n: median(latency_of(r, n) for r in answered) for n in names},
            "server_cpu_us": median(r.get("server_cpu_us") for r in answered),
        }
    return merged
