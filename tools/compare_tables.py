"""The tables of `meshserve bench compare`, as pure functions of its measurements: the
systems compared, ratios and medians, the best batch of the in-process limit, Markdown tables,
and the per-hop breakdown computed from ModelStatistics before and after a run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

from meshserve.protocol import grpc_service_pb2 as pb


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not > 0."""
    if numerator is None or denominator is None:
        return None
    if not denominator > 0 or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    return numerator / denominator


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none); NaN and
    infinities count as missing."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def best_batch(rows_per_s: Mapping[int, float]) -> tuple[int, float]:
    """The batch size with the most rows/s (the smaller one on a tie) and that rate."""
    if not rows_per_s:
        raise ValueError("no batch sizes measured")
    size = min(rows_per_s, key=lambda b: (-rows_per_s[b], b))
    return size, rows_per_s[size]


def number_text(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def ratio_text(value: float | None) -> str:
    """"0.52×"; below 0.095 with three decimals ("0.004×"); "—" when there is no ratio."""
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.095 else f"{value:.3f}×"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table; numeric-looking columns are right-aligned."""
    def numeric(column: int) -> bool:
        cells = [row[column] for row in rows if row[column] not in ("", "—")]
        return all(
            cell.replace(",", "").replace(".", "").replace("×", "").replace("-", "").isdigit()
            for cell in cells
        )

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latency_of(result: Mapping | None, name: str) -> float | None:
    if not result:
        return None
    return (result.get("latency_ms") or {}).get(name)


def rps_of(result: Mapping | None) -> float | None:
    if not result or not result.get("requests"):
        return None
    return result.get("throughput_rps")


# (server, model, concurrency, transport): one bench run of one system.
RunKey = tuple[str, str, int, str]
# The systems raced, in the order of the comparison table's columns, and their names there.
SERVERS = ("meshserve", "triton", "triton-envoy")
LABELS = {"meshserve": "meshserve", "triton": "Triton", "triton-envoy": "Envoy mesh"}

COMPARISON_HEADERS = [
    "model", "concurrency", "transport",
    *(f"{LABELS[server]} {figure}" for server in SERVERS
      for figure in ("rps", "p50 ms", "p99 ms")),
    "meshserve/Triton", "meshserve/Envoy mesh", "meshserve/limit",
]


def comparison_rows(
    plan_runs: Iterable[tuple[str, int, str]],
    results: Mapping[RunKey, Mapping],
    limits: Mapping[str, float],
) -> list[list[str]]:
    """Table rows: `results` is keyed by `RunKey`, `limits` by model (best-batch rows/s).
    Missing runs show as "—"."""
    rows = []
    for model, concurrency, transport in plan_runs:
        found = {server: results.get((server, model, concurrency, transport))
                 for server in SERVERS}
        figures = []
        for result in found.values():
            figures += [number_text(rps_of(result)), number_text(latency_of(result, "p50"), 2),
                        number_text(latency_of(result, "p99"), 2)]
        mesh = rps_of(found["meshserve"])
        rows.append([
            model, str(concurrency), transport, *figures,
            ratio_text(ratio(mesh, rps_of(found["triton"]))),
            ratio_text(ratio(mesh, rps_of(found["triton-envoy"]))),
            ratio_text(ratio(mesh, limits.get(model))),
        ])
    return rows


def best_limits(limits: Mapping[str, Mapping[int, Mapping]]) -> dict[str, float]:
    """Best-batch rows/s per model of the in-process limit (`limits[model][batch]`)."""
    return {model: best_batch({b: m["rows_per_s"] for b, m in by_batch.items()})[1]
            for model, by_batch in limits.items()}


LIMIT_HEADERS = ["model", "batch 1 rows/s", "batch 1 ms", "best batch", "best rows/s"]


def limit_rows(limits: Mapping[str, Mapping[int, Mapping]]) -> list[list[str]]:
    """Rows of the in-process limit table; `limits[model][batch]` has rows_per_s, p50_ms."""
    rows = []
    for model, by_batch in limits.items():
        size, best = best_batch({b: m["rows_per_s"] for b, m in by_batch.items()})
        one = by_batch.get(1, {})
        rows.append([model, number_text(one.get("rows_per_s")), number_text(one.get("p50_ms"), 3),
                     str(size), number_text(best)])
    return rows


_STAT_FIELDS = ("success", "queue", "compute_input", "compute_infer", "compute_output")
_COMPUTE_FIELDS = ("compute_input", "compute_infer", "compute_output")


def statistics_totals(response: pb.ModelStatisticsResponse) -> dict[str, int]:
    """Sums over every model version of a ModelStatisticsResponse (counts and ns).

    Besides the ``inference_stats`` durations (``<field>_count``, ``<field>_ns``) it sums the
    ``batch_stats``: ``batch_ns`` (compute input + infer + output of every batch),
    ``batch_row_ns`` (the same, each batch weighted by its rows) and ``batch_rows`` (rows of
    every batch). Per-batch times are what every request of a batch waited for compute, on
    meshserve and Triton alike, whatever their ``inference_stats`` make of them.
    """
    totals = {"inference_count": 0, "execution_count": 0, "batch_ns": 0, "batch_row_ns": 0,
              "batch_rows": 0}
    for name in _STAT_FIELDS:
        totals[f"{name}_count"] = 0
        totals[f"{name}_ns"] = 0
    for stats in response.model_stats:
        totals["inference_count"] += stats.inference_count
        totals["execution_count"] += stats.execution_count
        for name in _STAT_FIELDS:
            duration = getattr(stats.inference_stats, name)
            totals[f"{name}_count"] += duration.count
            totals[f"{name}_ns"] += duration.ns
        for entry in stats.batch_stats:
            ns = sum(getattr(entry, name).ns for name in _COMPUTE_FIELDS)
            totals["batch_ns"] += ns
            totals["batch_row_ns"] += ns * entry.batch_size
            totals["batch_rows"] += entry.compute_infer.count * entry.batch_size
    return totals


def hop_breakdown(before: Mapping[str, int], after: Mapping[str, int],
                  client_p50_ms: float | None,
                  client_mean_ms: float | None = None) -> dict[str, float | None]:
    """Per-request averages of the statistics between two snapshots, and the rest of p50.

    queue_ms: mean time a request waited in the batcher's queue; compute_ms: mean compute time
    (input + infer + output) of the batch a row was in (one row per request: the time a
    request waited for compute); compute_per_row_ms: the same time shared among its rows (the
    throughput view); rest_ms: client p50 minus queue and compute (the hops in front of the
    batcher and the transport), rest_mean_ms: the same from the client's mean, which matches
    the means it subtracts; mean_batch: rows per batch.
    """
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}

    def per(ns_key: str, count_key: str) -> float | None:
        count = delta.get(count_key, 0)
        if count <= 0:
            return None
        return delta.get(ns_key, 0) / count / 1e6

    queue = per("queue_ns", "queue_count")
    compute = per("batch_row_ns", "batch_rows")
    compute_per_row = per("batch_ns", "batch_rows")
    server = per("success_ns", "success_count")

    def rest(client: float | None) -> float | None:
        if client is None or queue is None or compute is None:
            return None
        return client - queue - compute

    executions = delta.get("execution_count", 0)
    mean_batch = delta.get("inference_count", 0) / executions if executions > 0 else None
    return {"requests": delta.get("success_count", 0), "queue_ms": queue, "compute_ms": compute,
            "compute_per_row_ms": compute_per_row, "server_total_ms": server,
            "client_p50_ms": client_p50_ms, "client_mean_ms": client_mean_ms,
            "rest_ms": rest(client_p50_ms), "rest_mean_ms": rest(client_mean_ms),
            "mean_batch": mean_batch}


def server_cpu_us(cpu_s: float, requests: int) -> float | None:
    """The server's CPU per request it answered, in µs (None when it answered none)."""
    return cpu_s / requests * 1e6 if requests > 0 else None


CPU_HEADERS = ["model", "concurrency", "transport",
               *(f"{LABELS[server]} µs/req" for server in SERVERS),
               "meshserve/Triton", "meshserve/Envoy mesh"]


def cpu_rows(plan_runs: Iterable[tuple[str, int, str]],
             results: Mapping[RunKey, Mapping]) -> list[list[str]]:
    """Table rows of each system's server CPU per answered request (`server_cpu_us`)."""
    rows = []
    for model, concurrency, transport in plan_runs:
        cpu = {server: (results.get((server, model, concurrency, transport)) or {}).get(
            "server_cpu_us") for server in SERVERS}
        rows.append([model, str(concurrency), transport,
                     *(number_text(cpu[server]) for server in SERVERS),
                     ratio_text(ratio(cpu["meshserve"], cpu["triton"])),
                     ratio_text(ratio(cpu["meshserve"], cpu["triton-envoy"]))])
    return rows


HOP_HEADERS = ["server", "model", "concurrency", "transport", "client p50 ms",
               "batcher queue ms/req", "compute ms/req", "rest ms (p50 − both)",
               "rest ms (mean − both)", "mean batch rows"]


def hop_rows(hops: Iterable[tuple[str, str, int, str, Mapping]]) -> list[list[str]]:
    rows = []
    for server, model, concurrency, transport, hop in hops:
        figures = [(name, 3) for name in ("client_p50_ms", "queue_ms", "compute_ms", "rest_ms",
                                          "rest_mean_ms")] + [("mean_batch", 1)]
        rows.append([server, model, str(concurrency), transport,
                     *(number_text(hop.get(name), digits) for name, digits in figures)])
    return rows

