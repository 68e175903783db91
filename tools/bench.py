"""Load generator for any Open Inference Protocol (KServe v2 / Triton) gRPC server.

Closed loop (``concurrency`` workers, each with one request outstanding) or open loop
(Poisson arrivals at ``rate`` per second, at most ``max_outstanding`` in flight; arrivals over
that bound are dropped and counted), over unary ``ModelInfer`` or bidi ``ModelStreamInfer``.

How it measures:

* ``ModelMetadata`` is read once; one random tensor per model input is built from it (a ``-1``
  dimension becomes ``batch`` for the first dimension and 1 elsewhere) and the request is
  serialized once. The multicallables take those bytes as they are (no request serializer), so
  the client does no per-request encoding work. ``LoadSpec.request`` (serialized bytes)
  replaces that step, for servers without ``ModelMetadata``.
* The run is ``warmup_s`` (not counted) then a measured window of ``duration_s``, cut short
  when ``max_requests`` measured requests (successes plus errors) have completed.
* Closed loop: a request counts when it was sent and answered inside the window; the few still
  in flight at the end are cancelled and not counted.
* Open loop: a request counts when its *scheduled* arrival falls inside the window, and its
  latency runs from that scheduled time (so client-side queueing is not hidden). After the
  window the requests still in flight get up to ``DRAIN_S`` seconds; those still unanswered
  then are cancelled and counted as ``CANCELLED`` errors.
* ``window_unix_s`` is the measured window as seconds since the epoch, for readings taken
  outside the client (a server's CPU from /proc) to be cut to the same window.
* Latency percentiles are over successful requests only, by the nearest-rank method (see
  `percentiles`). Errors are counted by gRPC status code name; an in-stream ``error_message``
  counts under the status name it starts with (``"RESOURCE_EXHAUSTED: ..."``), else
  ``UNKNOWN``; a stream the server ends without answering counts as ``UNKNOWN`` too.
* ``client_cpu_s`` is user plus system CPU time of the client process(es) during the window,
  from ``os.times()``. With ``processes == 1`` the load runs inside the calling process, so
  that figure includes anything else the process does meanwhile (an in-process test server).
* Each process runs one ``grpc.aio`` channel on a ``uvloop`` event loop. With ``processes > 1``
  the concurrency, rate, request budget and outstanding bound are split across spawned
  processes that start together (a barrier) and their samples are merged.
* Streams: a closed-loop worker owns one stream (write, read its answer, repeat). The open loop
  spreads requests over a pool of ``streams`` streams per process (default 8); there each
  request carries an ``id`` (one pre-serialized request per in-flight slot) and answers are
  matched by ``infer_response.id``, falling back to first-in-first-out when the server does not
  echo it. Decoupled models (several answers per request) are not supported.

`run_load` blocks; call it from async code through ``asyncio.to_thread``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from meshserve.protocol import grpc_service_pb2 as pb

_SERVICE = "/inference.GRPCInferenceService/"
_METADATA_TIMEOUT_S = 10.0
_READY_TIMEOUT_S = 10.0
_SPAWN_TIMEOUT_S = 60.0
DRAIN_S = 5.0
DEFAULT_STREAMS = 8
_REOPEN_BACKOFF_S = 0.01
_SETTLE_S = 0.05

# Fixed-size numeric datatypes of the protocol, as little-endian numpy dtypes. BF16 is made
# from FP32 values (their top 16 bits).
_NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}

_QUANTILES: tuple[tuple[str, int], ...] = (("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999))


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
class _Share:
    """One process's part of the load."""

    concurrency: int
    rate: float
    max_requests: int
    max_outstanding: int
    streams: int


@dataclass
class _Part:
    """One process's measurements (picklable, sent back from a spawned process)."""

    samples_ms: np.ndarray
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    wall_start: float = 0.0
    wall_end: float = 0.0
    cpu_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# Pure helpers


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


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def input_shape(shape: list[int] | tuple[int, ...], batch: int) -> list[int]:
    """Metadata shape with -1 as ``batch`` in the first dimension and 1 elsewhere."""
    return [d if d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(shape)]


def random_tensor(datatype: str, shape: list[int], rng: np.random.Generator) -> bytes:
    """Little-endian raw bytes of a random tensor of a fixed-size numeric datatype."""
    dtype = _NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(
            f"datatype {datatype!r} is not supported; use one of {', '.join(_NUMPY_DTYPES)}"
        )
    if datatype == "BOOL":
        array = rng.integers(0, 2, size=shape).astype(dtype)
    elif datatype == "BF16":
        array = (rng.random(shape, dtype=np.float32).view(np.uint32) >> 16).astype(dtype)
    elif datatype.startswith("FP"):
        array = rng.random(shape).astype(dtype)
    else:
        array = rng.integers(0, 100, size=shape).astype(dtype)
    return array.tobytes()


def build_request(
    metadata: pb.ModelMetadataResponse, model: str, version: str = "", batch: int = 1, seed: int = 0
) -> pb.ModelInferRequest:
    """One request with a random tensor per model input, payload in ``raw_input_contents``."""
    if not metadata.inputs:
        raise ValueError(f"model {model!r} declares no inputs")
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for tensor in metadata.inputs:
        shape = input_shape(list(tensor.shape), batch)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(random_tensor(tensor.datatype, shape, rng))
    return request


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def with_id(serialized: bytes, request_id: str) -> bytes:
    """A serialized ModelInferRequest with ``id`` set, without re-encoding the payload.

    Appends field 3 (``id``); for a singular field the last occurrence wins when parsed.
    """
    raw = request_id.encode()
    return serialized + b"\x1a" + _varint(len(raw)) + raw


def stream_error_code(message: str) -> str:
    """Status code name an in-stream ``error_message`` starts with, else ``UNKNOWN``."""
    head = message.split(":", 1)[0].strip().upper()
    return head if head in grpc.StatusCode.__members__ and head != "OK" else "UNKNOWN"


def _code_name(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _cpu_now() -> float:
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------------------------------------
# Connection


def _channel(spec: LoadSpec) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    if spec.ca is None:
        return grpc.aio.insecure_channel(spec.target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(spec.ca).read_bytes(),
        private_key=Path(spec.key).read_bytes() if spec.key else None,
        certificate_chain=Path(spec.cert).read_bytes() if spec.cert else None,
    )
    if spec.server_name:
        options += [
            ("grpc.ssl_target_name_override", spec.server_name),
            ("grpc.default_authority", spec.server_name),
        ]
    return grpc.aio.secure_channel(spec.target, credentials, options=options)


def _metadata(spec: LoadSpec) -> tuple[tuple[str, str], ...]:
    return tuple((key.lower(), value) for key, value in spec.headers)


async def _fetch_request(channel: grpc.aio.Channel, spec: LoadSpec) -> bytes:
    method = channel.unary_unary(
        _SERVICE + "ModelMetadata",
        request_serializer=pb.ModelMetadataRequest.SerializeToString,
        response_deserializer=pb.ModelMetadataResponse.FromString,
    )
    try:
        metadata = await method(
            pb.ModelMetadataRequest(name=spec.model, version=spec.version),
            metadata=_metadata(spec),
            timeout=_METADATA_TIMEOUT_S,
        )
    except grpc.RpcError as error:
        details = error.details() if hasattr(error, "details") else str(error)
        raise RuntimeError(
            f"ModelMetadata for {spec.model!r} at {spec.target} failed: "
            f"{_code_name(error)}: {details}"
        ) from None
    request = build_request(metadata, spec.model, spec.version, spec.batch)
    return request.SerializeToString()


async def _request_bytes(spec: LoadSpec) -> bytes:
    channel = _channel(spec)
    try:
        return await _fetch_request(channel, spec)
    finally:
        await channel.close(grace=None)


# ---------------------------------------------------------------------------------------------
# The load, in one process


class _PooledStream:
    """One bidi stream of the open-loop pool: a writer, a reader, answers matched by id."""

    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self._queue: asyncio.Queue[float] = asyncio.Queue()
        self._pending: dict[str, tuple[float, int]] = {}  # id -> (scheduled time, slot)
        self._free: list[int] = []
        self._requests: list[bytes] = []  # per slot, built on first use, then reused

    def submit(self, scheduled: float) -> None:
        self._queue.put_nowait(scheduled)

    def leftover(self) -> list[float]:
        """Scheduled times of requests queued or in flight."""
        queued = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        return [t for t, _ in self._pending.values()] + queued

    async def run(self) -> None:
        runner = self._runner
        while True:
            call = runner.stream_method(metadata=runner.metadata)
            writer = asyncio.create_task(self._write(call))
            code = "UNKNOWN"
            try:
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    self._answer(response)
            except grpc.RpcError as error:
                code = _code_name(error)
            finally:
                writer.cancel()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            now = time.perf_counter()
            for scheduled, slot in self._pending.values():
                self._free.append(slot)
                runner.record(scheduled, now, error=code)
            self._pending.clear()
            await asyncio.sleep(_REOPEN_BACKOFF_S)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            scheduled = await self._queue.get()
            if self._free:
                slot = self._free.pop()
            else:
                slot = len(self._requests)
                self._requests.append(with_id(self._runner.request, str(slot)))
            self._pending[str(slot)] = (scheduled, slot)
            try:
                await call.write(self._requests[slot])
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the reader sees the stream's end and fails what is pending

    def _answer(self, response: pb.ModelStreamInferResponse) -> None:
        entry = self._pending.pop(response.infer_response.id, None)
        if entry is None:
            if not self._pending:
                return
            entry = self._pending.pop(next(iter(self._pending)))
        scheduled, slot = entry
        self._free.append(slot)
        now = time.perf_counter()
        if response.error_message:
            self._runner.record(scheduled, now, error=stream_error_code(response.error_message))
        else:
            self._runner.record(scheduled, now, version=response.infer_response.model_version)


class _Runner:
    def __init__(
        self, spec: LoadSpec, share: _Share, channel: grpc.aio.Channel | None, request: bytes
    ) -> None:
        self.spec = spec
        self.share = share
        self.request = request
        self.metadata = _metadata(spec)
        if channel is not None:  # None: a subclass sends requests its own way (HTTP)
            # request_serializer=None: the pre-serialized bytes go on the wire as they are.
            self.infer_method = channel.unary_unary(
                _SERVICE + "ModelInfer",
                request_serializer=None,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            self.stream_method = channel.stream_stream(
                _SERVICE + "ModelStreamInfer",
                request_serializer=None,
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )
        self.samples: list[float] = []
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.dropped = 0
        self.measured = 0  # completed in the window, ok or not (closed loop)
        self.issued = 0  # sent in the window (open loop)
        self.outstanding = 0
        self.closing = False
        self.stop = asyncio.Event()
        self.idle = asyncio.Event()
        self.t_start = time.perf_counter()
        self.w_start = self.t_start + spec.warmup_s
        self.w_end = self.w_start + spec.duration_s

    # -- bookkeeping

    def record(
        self, sent: float, done: float, *, version: str | None = None, error: str | None = None
    ) -> None:
        """One answer. ``sent`` is the send (closed) or scheduled arrival (open) time."""
        if self.spec.open_loop:
            self.outstanding -= 1
            if self.closing and self.outstanding <= 0:
                self.idle.set()
            if not self.w_start <= sent < self.w_end:
                return
        else:
            if sent < self.w_start or done > self.w_end or self.stop.is_set():
                return
        if error is None:
            self.ok += 1
            self.samples.append((done - sent) * 1000.0)
            self.versions[version or ""] += 1
        else:
            self.errors[error] += 1
        if not self.spec.open_loop:
            self.measured += 1
            if self.share.max_requests and self.measured >= self.share.max_requests:
                self.w_end = done
                self.stop.set()

    # -- closed loop

    async def _unary_worker(self) -> None:
        while not self.closing:
            sent = time.perf_counter()
            try:
                response = await self.infer_method(self.request, metadata=self.metadata)
            except grpc.RpcError as error:
                self.record(sent, time.perf_counter(), error=_code_name(error))
            else:
                self.record(sent, time.perf_counter(), version=response.model_version)

    async def _stream_worker(self) -> None:
        while not self.closing:
            call = self.stream_method(metadata=self.metadata)
            sent = time.perf_counter()
            try:
                while not self.closing:
                    sent = time.perf_counter()
                    await call.write(self.request)
                    response = await call.read()
                    now = time.perf_counter()
                    if response is grpc.aio.EOF:
                        self.record(sent, now, error="UNKNOWN")
                        break
                    if response.error_message:
                        self.record(sent, now, error=stream_error_code(response.error_message))
                    else:
                        self.record(sent, now, version=response.infer_response.model_version)
            except grpc.RpcError as error:
                self.record(sent, time.perf_counter(), error=_code_name(error))
            except asyncio.InvalidStateError:  # the server half-closed the stream
                self.record(sent, time.perf_counter(), error="UNKNOWN")
            finally:
                call.cancel()
            await asyncio.sleep(_REOPEN_BACKOFF_S)

    async def _closed(self) -> tuple[float, float]:
        worker = self._stream_worker if self.spec.stream else self._unary_worker
        tasks = [asyncio.create_task(worker()) for _ in range(self.share.concurrency)]
        try:
            await asyncio.sleep(max(0.0, self.w_start - time.perf_counter()))
            cpu0 = _cpu_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.stop.wait(), timeout=max(0.0, self.w_end - time.perf_counter())
                )
            self.stop.set()
            cpu1 = _cpu_now()
        finally:
            self.closing = True
            await _cancel_all(tasks)
        self.w_end = min(self.w_end, time.perf_counter())
        return cpu0, cpu1

    # -- open loop

    def _arrive(self, scheduled: float, send: Callable[[float], None]) -> None:
        in_window = scheduled >= self.w_start
        if self.outstanding >= self.share.max_outstanding:
            if in_window:
                self.dropped += 1
            return
        if in_window:
            self.issued += 1
        self.outstanding += 1
        send(scheduled)

    async def _arrivals(self, send: Callable[[float], None]) -> None:
        rng = random.Random()
        rate = self.share.rate
        scheduled = self.t_start + rng.expovariate(rate)
        budget = self.share.max_requests
        while scheduled < self.w_end:
            now = time.perf_counter()
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
                continue
            while scheduled <= now and scheduled < self.w_end:
                self._arrive(scheduled, send)
                if budget and self.issued >= budget:
                    self.w_end = scheduled + 1e-9
                    return
                scheduled += rng.expovariate(rate)
            await asyncio.sleep(0)

    async def _one_unary(self, scheduled: float) -> None:
        try:
            response = await self.infer_method(self.request, metadata=self.metadata)
        except grpc.RpcError as error:
            self.record(scheduled, time.perf_counter(), error=_code_name(error))
        else:
            self.record(scheduled, time.perf_counter(), version=response.model_version)

    async def _open(self) -> tuple[float, float]:
        inflight: dict[asyncio.Task, float] = {}
        pool: list[_PooledStream] = []
        pool_tasks: list[asyncio.Task] = []

        if self.spec.stream:
            pool = [_PooledStream(self) for _ in range(self.share.streams)]
            pool_tasks = [asyncio.create_task(stream.run()) for stream in pool]
            turn = itertools.count()

            def send(scheduled: float) -> None:
                pool[next(turn) % len(pool)].submit(scheduled)
        else:

            def send(scheduled: float) -> None:
                task = asyncio.create_task(self._one_unary(scheduled))
                inflight[task] = scheduled
                task.add_done_callback(lambda done: inflight.pop(done, None))

        arrivals = asyncio.create_task(self._arrivals(send))
        try:
            await asyncio.sleep(max(0.0, self.w_start - time.perf_counter()))
            cpu0 = _cpu_now()
            await arrivals
            self.w_end = min(self.w_end, time.perf_counter())
            cpu1 = _cpu_now()
            self.closing = True
            if self.outstanding > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.idle.wait(), timeout=DRAIN_S)
            leftover = list(inflight.values())
            for stream in pool:
                leftover += stream.leftover()
            self.errors["CANCELLED"] += sum(1 for t in leftover if self.w_start <= t < self.w_end)
            if not self.errors["CANCELLED"]:
                del self.errors["CANCELLED"]
        finally:
            self.closing = True
            await _cancel_all([arrivals, *pool_tasks, *inflight])
        return cpu0, cpu1

    async def run(self) -> _Part:
        cpu0, cpu1 = await (self._open() if self.spec.open_loop else self._closed())
        now_perf, now_wall = time.perf_counter(), time.time()
        return _Part(
            samples_ms=np.asarray(self.samples, dtype=np.float64),
            ok=self.ok,
            errors=dict(self.errors),
            versions=dict(self.versions),
            dropped=self.dropped,
            wall_start=now_wall - (now_perf - self.w_start),
            wall_end=now_wall - (now_perf - self.w_end),
            cpu_s=cpu1 - cpu0,
        )


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run_process(
    spec: LoadSpec, share: _Share, request: bytes | None, barrier: Any = None
) -> _Part:
    channel = _channel(spec)
    try:
        if request is None:
            request = await _fetch_request(channel, spec)
        else:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=_READY_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"could not connect to {spec.target}") from None
        if barrier is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, barrier.wait, _SPAWN_TIMEOUT_S)
        return await _Runner(spec, share, channel, request).run()
    finally:
        await channel.close(grace=None)
        # Completions of the calls just cancelled still arrive, tagged with this loop; let them
        # land while it runs, or grpc's shared poller hands them to a closed loop later (noise
        # in whatever other grpc.aio loop the process runs, such as an in-process server).
        await asyncio.sleep(_SETTLE_S)


def _child_main(spec: LoadSpec, share: _Share, request: bytes, barrier: Any, conn: Any) -> None:
    """Entry point of a spawned client process: runs its share and sends back a `_Part`."""
    try:
        part = uvloop.run(_run_process(spec, share, request, barrier))
    except BaseException:  # report anything, including a broken barrier, to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", part))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Orchestration


def _run_sync(coroutine_function: Callable[..., Any], *args: Any) -> Any:
    """Runs a coroutine on a fresh uvloop loop; in a helper thread if this one has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return uvloop.run(coroutine_function(*args))
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = uvloop.run(coroutine_function(*args))
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="meshserve-bench", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _validate(spec: LoadSpec) -> None:
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


def _shares(spec: LoadSpec) -> list[_Share]:
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
        _Share(
            concurrency=concurrency[i],
            rate=spec.rate / processes,
            max_requests=budgets[i],
            max_outstanding=outstanding[i],
            streams=max(1, min(streams, outstanding[i])),
        )
        for i in range(processes)
    ]


def _spawn(spec: LoadSpec, shares: list[_Share], request: bytes) -> list[_Part]:
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(shares))
    children = []
    for index, share in enumerate(shares):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_child_main,
            args=(spec, share, request, barrier, sender),
            name=f"meshserve-bench-{index}",
            daemon=True,
        )
        process.start()
        sender.close()
        children.append((process, receiver))
    deadline = time.monotonic() + _SPAWN_TIMEOUT_S + spec.warmup_s + spec.duration_s + DRAIN_S + 30
    results: dict[Any, Any] = {}
    failures: list[str] = []
    try:
        waiting = [receiver for _, receiver in children]
        while waiting and not failures:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append("client processes did not finish in time")
                break
            for receiver in wait(waiting, timeout=remaining):
                waiting.remove(receiver)
                try:
                    status, payload = receiver.recv()
                except EOFError:
                    failures.append("a client process exited without a result")
                    continue
                if status == "ok":
                    results[receiver] = payload
                else:
                    failures.append(payload)
    finally:
        if failures:
            with contextlib.suppress(Exception):
                barrier.abort()
        for process, receiver in children:
            process.join(timeout=5 if not failures else 1)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            receiver.close()
    if failures:
        raise RuntimeError("bench client process failed:\n" + "\n".join(failures))
    return [results[receiver] for _, receiver in children]


def _transport(spec: LoadSpec) -> str:
    if spec.protocol == "http":
        return f"http-{spec.encoding}"
    return "stream" if spec.stream else "unary"


def _summarize(spec: LoadSpec, parts: list[_Part]) -> dict:
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


def run_load(spec: LoadSpec) -> dict:
    """Runs the load described by ``spec`` and returns the result (see the module docstring).

    Blocks until done (about ``warmup_s + duration_s``, bounded). ``processes > 1`` spawns that
    many client processes; otherwise the load runs in this process.
    """
    _validate(spec)
    if spec.protocol == "http":
        from meshserve.tools import bench_http

        return bench_http.run_load(spec)
    shares = _shares(spec)
    if len(shares) == 1:
        parts = [_run_sync(_run_process, spec, shares[0], spec.request or None)]
    else:
        request = spec.request or _run_sync(_request_bytes, spec)
        parts = _spawn(spec, shares, request)
    return _summarize(spec, parts)


# ---------------------------------------------------------------------------------------------
# Command line


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().lower(), value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _spec_from_args(args: argparse.Namespace) -> LoadSpec:
    return LoadSpec(
        target=args.target,
        model=args.model,
        version=args.version,
        concurrency=args.concurrency or 1,
        rate=args.rate or 0.0,
        stream=args.stream,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.requests,
        batch=args.batch,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
        headers=tuple(args.header),
        processes=args.processes,
        max_outstanding=args.max_outstanding,
        streams=args.streams,
        protocol=args.protocol,
        encoding=args.encoding,
    )


def _human(result: dict) -> str:
    load = (
        f"rate {result['rate']:g}/s" if result["mode"] == "open" else f"c={result['concurrency']}"
    )
    latency = result["latency_ms"]
    if latency["p50"] is None:
        timing = "no successful requests"
    else:
        timing = f"p50 {latency['p50']:.3f} p99 {latency['p99']:.3f} max {latency['max']:.3f} ms"
    parts = [
        f"bench {result['model']} {result['mode']}/{result['transport']} {load}:",
        f"{result['requests']} ok in {result['duration_s']:.2f} s",
        f"= {result['throughput_rps']:.1f} req/s;",
        f"{timing};",
        f"errors {result['errors'] or 0};",
    ]
    if result["mode"] == "open":
        parts.append(f"dropped {result['dropped']};")
    parts.append(f"client cpu {result['client_cpu_s']:.2f} s")
    return " ".join(parts)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        spec = _spec_from_args(args)
        result = run_load(spec)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(_human(result), file=sys.stderr)
    return 0 if result["requests"] > 0 else 1


def plot_results(results: list[dict], path: Path) -> None:
    """p50 and p99 latency against throughput, one line per (model, transport, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], list[dict]] = {}
    for result in results:
        key = (result["model"], result["transport"], result["target"])
        series.setdefault(key, []).append(result)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (model, transport, target), points in sorted(series.items()):
        points.sort(key=lambda r: r["throughput_rps"])
        x = [r["throughput_rps"] for r in points]
        for quantile, style in (("p50", "-"), ("p99", "--")):
            axis.plot(x, [r["latency_ms"][quantile] for r in points], style, marker="o",
                      label=f"{model} {transport} {quantile} ({target})")
    axis.set_xlabel("throughput (requests/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cmd_plot(args: argparse.Namespace) -> int:
    results = [json.loads(line) for line in args.results.read_text().splitlines()
               if line.strip()]
    results = [r for r in results if r.get("requests")]
    if not results:
        print(f"bench: no results with requests in {args.results}", file=sys.stderr)
        return 2
    plot_results(results, args.out)
    print(f"plot: {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``bench run``, ``plot``, ``compare`` and ``budget`` to a CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        description="Closed-loop and open-loop load for any Open Inference Protocol gRPC server.",
    )
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run a load and print one JSON result line",
        description="Runs a load; prints one JSON line on stdout and a summary on stderr.",
    )
    connection = run.add_argument_group("connection")
    connection.add_argument("--target", required=True, help="HOST:PORT of the server")
    connection.add_argument(
        "--protocol", choices=("grpc", "http"), default="grpc",
        help="gRPC (default) or HTTP/REST (closed loop, one process)")
    connection.add_argument(
        "--encoding", choices=("binary", "json"), default="binary",
        help="HTTP: tensors as binary tensor data (default) or as JSON")
    connection.add_argument("--ca", type=Path, help="CA bundle: use TLS (plaintext without)")
    connection.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    connection.add_argument("--key", type=Path, help="client private key (mutual TLS)")
    connection.add_argument("--server-name", default="", help="TLS target name override")
    connection.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra request metadata (repeatable)",
    )
    request = run.add_argument_group("request")
    request.add_argument("--model", required=True, help="model name")
    request.add_argument("--version", default="", help="model version (default: server's)")
    request.add_argument(
        "--batch", type=_positive_int, default=1, help="size of a -1 first dimension (default 1)"
    )
    load = run.add_argument_group("load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=_positive_int,
        help="closed loop: N workers, one request outstanding each (default 1)",
    )
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument(
        "--max-outstanding",
        type=_positive_int,
        default=1024,
        help="open loop: in-flight bound; arrivals over it are dropped (default 1024)",
    )
    load.add_argument("--stream", action="store_true", help="use ModelStreamInfer")
    load.add_argument(
        "--streams",
        type=int,
        default=0,
        help=f"open loop with --stream: streams per process (default {DEFAULT_STREAMS})",
    )
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    load.add_argument(
        "--warmup", type=float, default=2.0, help="seconds before measuring (default 2)"
    )
    load.add_argument(
        "--requests",
        type=int,
        default=0,
        help="stop after N measured requests (successes plus errors) or at --duration, "
        "whichever is first",
    )
    load.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="client processes sharing the load (default 1)",
    )
    run.add_argument("--output", type=Path, help="also append the JSON line to this file")
    run.set_defaults(func=_cmd_run)
    plot = commands.add_parser(
        "plot", help="plot latency against throughput from `bench run --output` lines")
    plot.add_argument("results", type=Path, help="a file of `bench run` JSON lines")
    plot.add_argument("--out", type=Path, default=Path("latency-throughput.png"))
    plot.set_defaults(func=_cmd_plot)

    from meshserve.tools import bench_compare, budget_run

    bench_compare.add_parser(commands)
    budget_run.add_parser(commands)


def main(argv: list[str] | None = None) -> int:
    """``python -m meshserve.tools.bench run --target ... --model ...``."""
    parser = argparse.ArgumentParser(prog="meshserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DEFAULT_STREAMS",
    "DRAIN_S",
    "LoadSpec",
    "build_request",
    "input_shape",
    "percentiles",
    "random_tensor",
    "register",
    "run_load",
    "split_evenly",
    "stream_error_code",
    "with_id",
]
