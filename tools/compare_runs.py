"""What `meshserve bench compare` runs (`Plan`) and how each run is measured against a
server and recorded: a closed-loop load per model, concurrency and transport, with
ModelStatistics read before and after it for the per-hop breakdown, and the in-process limit
of each model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.budget_proc import tree_cpu_ticks
from meshserve.tools.compare_limit import BATCH_SIZES, measure_limit
from meshserve.tools.compare_tables import (
    SERVERS,
    RunKey,
    best_batch,
    hop_breakdown,
    latency_of,
    number_text,
    server_cpu_us,
    statistics_totals,
)
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec

MODELS = ("mlp", "cnn")
TRITON_SYSTEMS = ("triton", "triton-envoy")  # the systems served by tritonserver
_STATS_TIMEOUT_S = 10.0


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


@dataclass
class Target:
    """A running server to load: address and how to talk to it."""

    server: str
    address: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    # The server's processes, each with its descendants: their CPU per answered request.
    pids: tuple[int, ...] = ()

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
        self.results: dict[RunKey, dict] = {}
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


def bench_one(target: Target, plan: Plan, model: str, concurrency: int, transport: str,
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
        ticks = tree_cpu_ticks(target.pids)
        before = read_statistics(target.address, model, version, credentials,
                                 target.server_name)
        result = run_load(spec)
        after = read_statistics(target.address, model, version, credentials,
                                target.server_name)
        ticks = tree_cpu_ticks(target.pids) - ticks
    except (RuntimeError, ValueError, OSError, grpc.RpcError) as error:
        message = f"{label}: {_error_text(error)}"
        recorder.write({"kind": "failure", "server": target.server, "model": model,
                        "concurrency": concurrency, "transport": transport,
                        "error": _error_text(error)})
        recorder.say(f"  FAILED {message}")
        return message
    hop = hop_breakdown(before, after, latency_of(result, "p50"), latency_of(result, "mean"))
    if target.pids:
        result["server_cpu_us"] = server_cpu_us(ticks / os.sysconf("SC_CLK_TCK"),
                                                hop["requests"])
    recorder.results[key] = result
    recorder.hops.append((*key, hop))
    recorder.write({"kind": "bench", "server": target.server, **result})
    recorder.write({"kind": "statistics", "server": target.server, "model": model,
                    "concurrency": concurrency, "transport": transport,
                    "before": before, "after": after, "breakdown": hop})
    p50, p99 = latency_of(result, "p50"), latency_of(result, "p99")
    recorder.say(f"  {label} {result['throughput_rps']:>9,.1f} req/s  p50 {number_text(p50, 2)} ms"
                 f"  p99 {number_text(p99, 2)} ms  errors {result['errors'] or 0}")
    if not result["requests"] or result["errors"]:
        return f"{label}: {result['requests']} ok, errors {result['errors']}"
    return None


def bench_target(target: Target, plan: Plan, recorder: Recorder) -> None:
    for model, concurrency, transport in plan.runs():
        failure = bench_one(target, plan, model, concurrency, transport, recorder)
        if failure:
            recorder.failures.append(failure)


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

