"""`meshserve bench compare`: meshserve against NVIDIA Triton and the in-process limit.

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

Each server in turn (never two at once) gets a closed-loop `run_load` per model, concurrency
and transport. Before and after each run, ``ModelStatistics`` is read (for meshserve through
the ingress) and the difference gives a per-hop breakdown: batcher queue time per request,
compute time per request (input + infer + output of the batches the request was in), and the
rest of the client's p50 (for meshserve: ingress + router + transport). The statistics also
cover the run's warm-up, so they are averages over slightly more requests than the client's
window.

Results go to ``--out`` (default ``bench-results/<UTC timestamp>/``): ``results.jsonl`` (every
raw JSON line: limit measurements, bench results, statistics), ``report.md`` (the tables that
are also printed), ``logs/`` (server logs) and ``latency-throughput.png`` when matplotlib is
importable (it is not a dependency).
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
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec

MODELS = ("mlp", "cnn")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SERVERS = ("meshserve", "triton")
_STATS_TIMEOUT_S = 10.0
_MAX_LIMIT_CALLS = 1_000_000


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


QUICK = Plan(MODELS, (1, 32), ("unary",), duration_s=3.0, warmup_s=1.0, limit_s=0.5)
FULL = Plan(MODELS, (1, 8, 32, 128), ("unary", "stream"), duration_s=12.0, warmup_s=3.0,
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


COMPARISON_HEADERS = [
    "model", "concurrency", "transport",
    "meshserve rps", "meshserve p50 ms", "meshserve p99 ms",
    "Triton rps", "Triton p50 ms", "Triton p99 ms",
    "meshserve/Triton", "meshserve/limit",
]


def comparison_rows(
    plan_runs: Iterable[tuple[str, int, str]],
    results: Mapping[tuple[str, str, int, str], Mapping],
    limits: Mapping[str, float],
) -> list[list[str]]:
    """Table rows: `results` is keyed by (server, model, concurrency, transport), `limits` by
    model (best-batch rows/s). Missing runs show as "—"."""
    rows = []
    for model, concurrency, transport in plan_runs:
        mesh = results.get(("meshserve", model, concurrency, transport))
        triton = results.get(("triton", model, concurrency, transport))
        rows.append([
            model, str(concurrency), transport,
            _number(_rps(mesh)), _number(_latency(mesh, "p50"), 2),
            _number(_latency(mesh, "p99"), 2),
            _number(_rps(triton)), _number(_latency(triton, "p50"), 2),
            _number(_latency(triton, "p99"), 2),
            ratio_text(ratio(_rps(mesh), _rps(triton))),
            ratio_text(ratio(_rps(mesh), limits.get(model))),
        ])
    return rows


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


def _bench_one(target: Target, plan: Plan, model: str, concurrency: int, transport: str,
               recorder: Recorder) -> None:
    key = (target.server, model, concurrency, transport)
    label = f"{target.server:<9} {model:<4} c={concurrency:<3} {transport:<6}"
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
        message = f"{label}: {type(error).__name__}: {error}"
        recorder.failures.append(message)
        recorder.write({"kind": "failure", "server": target.server, "model": model,
                        "concurrency": concurrency, "transport": transport, "error": str(error)})
        recorder.say(f"  FAILED {message}")
        return
    hop = hop_breakdown(before, after, _latency(result, "p50"), _latency(result, "mean"))
    recorder.results[key] = result
    recorder.hops.append((*key, hop))
    recorder.write({"kind": "bench", "server": target.server, **result})
    recorder.write({"kind": "statistics", "server": target.server, "model": model,
                    "concurrency": concurrency, "transport": transport,
                    "before": before, "after": after, "breakdown": hop})
    if not result["requests"] or result["errors"]:
        recorder.failures.append(f"{label}: {result['requests']} ok, errors {result['errors']}")
    p50, p99 = _latency(result, "p50"), _latency(result, "p99")
    recorder.say(f"  {label} {result['throughput_rps']:>9,.1f} req/s  p50 {_number(p50, 2)} ms"
                 f"  p99 {_number(p99, 2)} ms  errors {result['errors'] or 0}")


def bench_target(target: Target, plan: Plan, recorder: Recorder) -> None:
    for model, concurrency, transport in plan.runs():
        _bench_one(target, plan, model, concurrency, transport, recorder)


def measure_limits(repository_dir: Path, plan: Plan, recorder: Recorder) -> None:
    from meshserve.common.arrays import config_dtype
    from meshserve.common.repository import ModelRepository

    repository = ModelRepository.load(repository_dir)
    for model in plan.models:
        config = repository.get(model).config
        dtypes = {t.data_type for t in config.input}
        dtype = config_dtype(dtypes.pop()) if len(dtypes) == 1 else None
        dtype = np.float32 if dtype is None else dtype
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
               triton_root: Path | None, timeout_s: float) -> None:
    from meshserve.tools import triton_baseline

    installed = triton_baseline.install(triton_root, say=recorder.say)
    repository = work_dir / "triton-models"
    versions = triton_baseline.write_repository(data_dir / "models", repository, plan.models)
    backends = triton_baseline.backend_directory(installed, work_dir / "triton-backends")
    recorder.write({"kind": "triton", "tritonserver": str(installed.tritonserver),
                    "versions": versions,
                    "queue_delay_us": triton_baseline.QUEUE_DELAY_US})
    recorder.say("starting Triton (Python backend, KIND_CPU x1, 1 ms queue delay)")
    runs = list(plan.runs())
    while runs:
        server = triton_baseline.TritonServer(installed, repository, backends,
                                              recorder.out_dir / "logs" / "triton.log",
                                              plan.models, timeout_s=timeout_s)
        with server:
            recorder.say(f"  ready  tritonserver       {server.address}")
            while runs and server.process.poll() is None:
                _bench_one(Target("triton", server.address), plan, *runs.pop(0), recorder)
            if runs:  # it died under the last load: say so, start it again for the rest
                crash = f"tritonserver exited with {server.process.returncode} under load"
                recorder.failures.append(crash)
                recorder.write({"kind": "failure", "server": "triton", "error": crash})
                recorder.say(f"  {crash}; starting it again")


def report(plan: Plan, recorder: Recorder, elapsed_s: float) -> str:
    limits = {m: best_batch({b: v["rows_per_s"] for b, v in by.items()})[1]
              for m, by in recorder.limits.items()}
    parts = [
        "## meshserve vs Triton (closed loop, batch 1 per request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), recorder.results,
                                                           limits)),
        "\nmeshserve/limit: meshserve throughput over the in-process best-batch rows/s.\n",
        "\n## In-process limit (torch.jit.load, 1 thread, inference_mode)\n\n",
        markdown_table(LIMIT_HEADERS, limit_rows(recorder.limits)),
        "\n## Per-hop breakdown\n\n"
        "From ModelStatistics before and after each run (read through the ingress for "
        "meshserve; averages, warm-up included): batcher queue time per request, compute time "
        "(input + infer + output) of the batch each request was in, and the rest of the "
        "client's latency — for meshserve ingress+router+transport, for Triton its frontend "
        "and transport. The p50 rest subtracts means from a median, as asked; the mean rest "
        "compares like with like.\n\n",
        markdown_table(HOP_HEADERS, hop_rows(recorder.hops)),
        f"\n{len(recorder.results)} runs of {plan.duration_s:g} s (+{plan.warmup_s:g} s warm-up)"
        f" in {elapsed_s:.0f} s total.\n",
    ]
    if recorder.failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in recorder.failures))
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


def compare(plan: Plan, out_dir: Path, triton_root: Path | None = None,
            servers: Iterable[str] = SERVERS, timeout_s: float = 180.0,
            say: Callable[[str], None] = print) -> int:
    """Runs the whole comparison; returns 0 when every run completed without errors."""
    from meshserve.common.repository import ModelRepository
    from meshserve.tools.demo_repository import write_demo_repository

    servers = tuple(servers)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out_dir, say)
    say(f"bench compare: {len(plan.runs())} runs per server, ~{plan.load_seconds(len(servers)):.0f}"
        f" s under load; results in {out_dir}")
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
        steps: list[tuple[str, Callable[[], None]]] = []
        if "triton" in servers:
            # Install first: it is the slowest step on a fresh machine and the likeliest to fail.
            from meshserve.tools import triton_baseline

            steps.append(("triton install",
                          lambda: triton_baseline.install(triton_root, say=say)))
        steps.append(("limit", lambda: measure_limits(data_dir / "models", plan, recorder)))
        if "meshserve" in servers:
            steps.append(("meshserve",
                          lambda: run_meshserve(data_dir, plan, recorder, timeout_s)))
        if "triton" in servers:
            steps.append(("triton", lambda: run_triton(data_dir, work_dir, plan, recorder,
                                                       triton_root, timeout_s)))
        failed: set[str] = set()
        for name, step in steps:
            if name == "triton" and "triton install" in failed:
                continue
            say(f"[{time.monotonic() - started:5.0f} s] {name}")
            try:
                step()
            except Exception as error:  # one step failing must not stop the others
                failed.add(name)
                recorder.failures.append(f"{name}: {type(error).__name__}: {error}")
                recorder.write({"kind": "failure", "step": name, "error": str(error),
                                "traceback": traceback.format_exc()})
                say(f"  FAILED {name}: {type(error).__name__}: {error}")
    elapsed = time.monotonic() - started
    text = report(plan, recorder, elapsed)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    say("")
    say(text)
    say(plot(recorder, out_dir / "latency-throughput.png"))
    say(f"results: {out_dir}/results.jsonl, {out_dir}/report.md")
    expected = len(plan.runs()) * len(servers)
    complete = len(recorder.results) == expected and not recorder.failures
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


def _cmd_compare(args: argparse.Namespace) -> int:
    plan = make_plan(args.quick, args.models, args.duration, args.warmup)
    out_dir = args.out if args.out is not None else default_out_dir()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: servers are stopped

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return compare(plan, out_dir, args.triton_dir, args.servers, args.timeout)
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
        help="meshserve vs NVIDIA Triton vs the in-process limit, on the demo models",
        description="Runs the demo models in-process, on meshserve (embedded default) and on "
        "Triton (nvidia-pytriton, installed on demand), one server at a time, and writes a "
        "Markdown report and raw JSON lines to a dated folder.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1 and 32, unary, ~3 s each (default: 1, 8, 32, 128; "
                        "unary and stream; 12 s each)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench-results/<UTC timestamp>/)")
    parser.add_argument("--triton-dir", type=Path, default=None,
                        help="Triton cache environment (default ~/.cache/meshserve/triton)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma list of demo models (default mlp,cnn)")
    parser.add_argument("--servers", type=_servers, default=SERVERS,
                        help="comma list of meshserve,triton (default both)")
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
    "MODELS",
    "QUICK",
    "Plan",
    "add_parser",
    "best_batch",
    "compare",
    "comparison_rows",
    "hop_breakdown",
    "limit_rows",
    "make_plan",
    "markdown_table",
    "measure_limit",
    "ratio",
    "statistics_totals",
]
