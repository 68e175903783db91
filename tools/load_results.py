"""A load run's result: the processes' measurements merged into one JSON-ready dict, with
latency percentiles by the nearest-rank method."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from meshserve.tools.load_spec import LoadSpec, Part

_QUANTILES: tuple[tuple[str, int], ...] = (("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999))


def percentiles(samples_ms: list[float]) -> dict:
    """p50/p90/p99/p999/max/mean of latency samples, by the nearest-rank method.

    The p-th percentile is the smallest sample with at least p% of the samples at or below it:
    the value at 1-based rank ``ceil(p/100 * n)`` of the sorted samples (computed in integers,
    so there is no float rounding of the rank). With no samples every value is ``None``.
    """
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    n = int(values.size)
    if n == 0:
        return {name: None for name, _ in _QUANTILES} | {"max": None, "mean": None}
    out: dict[str, float | None] = {}
    for name, per_mille in _QUANTILES:
        rank = -(-n * per_mille // 1000)  # ceil without floats
        out[name] = float(values[max(rank, 1) - 1])
    out["max"] = float(values[-1])
    out["mean"] = float(values.mean())
    return out


def _transport(spec: LoadSpec) -> str:
    if spec.protocol == "http":
        return f"http-{spec.encoding}"
    return "stream" if spec.stream else "unary"


def summarize(spec: LoadSpec, parts: list[Part]) -> dict:
    samples = np.concatenate([part.samples_ms for part in parts])
    ok = sum(part.ok for part in parts)
    errors: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
        versions.update(part.versions)
    window = (min(part.wall_start for part in parts), max(part.wall_end for part in parts))
    duration = max(window[1] - window[0], 1e-9)
    latency = {
        name: (round(value, 4) if value is not None else None)
        for name, value in percentiles(samples).items()
    }
    result: dict[str, Any] = {
        "target": spec.target,
        "model": spec.model,
        "version": spec.version,
        "mode": "open" if spec.open_loop else "closed",
        "transport": _transport(spec),
    }
    if spec.open_loop:
        result["rate"] = spec.rate
        result["max_outstanding"] = spec.max_outstanding
    else:
        result["concurrency"] = spec.concurrency
    result |= {
        "batch": spec.batch,
        "processes": len(parts),
        "duration_s": round(duration, 4),
        "window_unix_s": [round(window[0], 4), round(window[1], 4)],
        "requests": ok,
        "throughput_rps": round(ok / duration, 2),
        "latency_ms": latency,
        "errors": dict(sorted(errors.items())),
        "client_cpu_s": round(sum(part.cpu_s for part in parts), 3),
        "versions": dict(sorted(versions.items())),
    }
    if spec.open_loop:
        result["dropped"] = sum(part.dropped for part in parts)
    return result
