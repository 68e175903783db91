"""What a load run is (`LoadSpec`), how it is shared between client processes, and what each
process sends back: plain values, checked before anything connects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# After an open-loop window, requests still in flight get this long before they are cancelled.
DRAIN_S = 5.0
DEFAULT_STREAMS = 8


@dataclass(frozen=True)
class LoadSpec:
    """What to load and how. ``rate > 0`` selects the open loop, else ``concurrency`` workers."""

    target: str
    model: str
    version: str = ""
    concurrency: int = 1
    rate: float = 0.0
    stream: bool = False
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 0
    batch: int = 1
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    processes: int = 1
    max_outstanding: int = 1024
    streams: int = 0  # open-loop stream pool per process; 0 = DEFAULT_STREAMS
    # A serialized ModelInferRequest to send as it is; empty: built from ModelMetadata (for
    # servers that answer ModelInfer only, such as an internal hop).
    request: bytes = b""
    protocol: str = "grpc"  # or "http" (see meshserve.tools.bench_http)
    encoding: str = "binary"  # http: tensors as binary tensor data, or "json"

    @property
    def open_loop(self) -> bool:
        return self.rate > 0


@dataclass(frozen=True)
class Share:
    """One process's part of the load."""

    concurrency: int
    rate: float
    max_requests: int
    max_outstanding: int
    streams: int


@dataclass
class Part:
    """One process's measurements (picklable, sent back from a spawned process)."""

    samples_ms: np.ndarray
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    wall_start: float = 0.0
    wall_end: float = 0.0
    cpu_s: float = 0.0


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def validate(spec: LoadSpec) -> None:
    problems = []
    if not spec.target:
        problems.append("target is empty")
    if not spec.model:
        problems.append("model is empty")
    if spec.rate < 0 or not math.isfinite(spec.rate):
        problems.append(f"rate must be a finite number >= 0, got {spec.rate}")
    if not spec.open_loop and spec.concurrency < 1:
        problems.append(f"concurrency must be >= 1, got {spec.concurrency}")
    if not spec.duration_s > 0 or not math.isfinite(spec.duration_s):
        problems.append(f"duration_s must be > 0, got {spec.duration_s}")
    if spec.warmup_s < 0 or not math.isfinite(spec.warmup_s):
        problems.append(f"warmup_s must be >= 0, got {spec.warmup_s}")
    for name in ("max_requests", "streams"):
        if getattr(spec, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(spec, name)}")
    for name in ("batch", "processes", "max_outstanding"):
        if getattr(spec, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(spec, name)}")
    if (spec.cert is None) != (spec.key is None):
        problems.append("cert and key go together (mutual TLS)")
    if spec.cert is not None and spec.ca is None:
        problems.append("cert/key need ca (TLS)")
    if spec.protocol not in ("grpc", "http"):
        problems.append(f"protocol must be grpc or http, got {spec.protocol!r}")
    if spec.encoding not in ("binary", "json"):
        problems.append(f"encoding must be binary or json, got {spec.encoding!r}")
    if problems:
        raise ValueError("invalid load spec: " + "; ".join(problems))


def shares_of(spec: LoadSpec) -> list[Share]:
    processes = spec.processes
    if not spec.open_loop:
        processes = min(processes, spec.concurrency)
    if spec.max_requests:
        processes = min(processes, spec.max_requests)
    processes = max(1, min(processes, spec.max_outstanding))
    concurrency = split_evenly(spec.concurrency, processes)
    budgets = split_evenly(spec.max_requests, processes)
    outstanding = split_evenly(spec.max_outstanding, processes)
    streams = spec.streams or DEFAULT_STREAMS
    return [
        Share(
            concurrency=concurrency[i],
            rate=spec.rate / processes,
            max_requests=budgets[i],
            max_outstanding=outstanding[i],
            streams=max(1, min(streams, outstanding[i])),
        )
        for i in range(processes)
    ]
