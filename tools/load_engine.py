"""One process's load over gRPC: the closed loop's workers, the open loop's arrivals and
stream pool, and the counting of answers inside the measured window (see
`meshserve.tools.load` for what is measured, and how).

`run_process(spec, share, request)` runs on this process's event loop; `run_sync` runs a
coroutine on a fresh uvloop loop, in a helper thread when the caller already has a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import uvloop

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.load_spec import DRAIN_S, LoadSpec, Part, Share
from meshserve.tools.load_wire import (
    SERVICE,
    channel_for,
    code_name,
    fetch_request,
    metadata_of,
    stream_error_code,
    with_id,
)

_READY_TIMEOUT_S = 10.0
SPAWN_TIMEOUT_S = 60.0  # client processes wait this long for each other at the start
_REOPEN_BACKOFF_S = 0.01
_SETTLE_S = 0.05


def _cpu_now() -> float:
    times = os.times()
    return times.user + times.system


class _PooledStream:
    """One bidi stream of the open-loop pool: a writer, a reader, answers matched by id."""

    def __init__(self, runner: Runner) -> None:
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
                code = code_name(error)
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


class Runner:
    def __init__(
        self, spec: LoadSpec, share: Share, channel: grpc.aio.Channel | None, request: bytes
    ) -> None:
        self.spec = spec
        self.share = share
        self.request = request
        self.metadata = metadata_of(spec)
        if channel is not None:  # None: a subclass sends requests its own way (HTTP)
            # request_serializer=None: the pre-serialized bytes go on the wire as they are.
            self.infer_method = channel.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=None,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            self.stream_method = channel.stream_stream(
                SERVICE + "ModelStreamInfer",
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
                self.record(sent, time.perf_counter(), error=code_name(error))
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
                else:  # the load is over, and this stream has no request in flight
                    await _end_stream(call)
            except grpc.RpcError as error:
                self.record(sent, time.perf_counter(), error=code_name(error))
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
            self.closing = True
            await asyncio.wait(tasks, timeout=DRAIN_S)
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
            self.record(scheduled, time.perf_counter(), error=code_name(error))
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

    async def run(self) -> Part:
        cpu0, cpu1 = await (self._open() if self.spec.open_loop else self._closed())
        now_perf, now_wall = time.perf_counter(), time.time()
        return Part(
            samples_ms=np.asarray(self.samples, dtype=np.float64),
            ok=self.ok,
            errors=dict(self.errors),
            versions=dict(self.versions),
            dropped=self.dropped,
            wall_start=now_wall - (now_perf - self.w_start),
            wall_end=now_wall - (now_perf - self.w_end),
            cpu_s=cpu1 - cpu0,
        )


async def _end_stream(call: grpc.aio.StreamStreamCall) -> None:
    """A closed loop's stream at the end of a load, with no request in flight: half-closed,
    and read to the server's end of it, so the server is not left with work whose caller has
    gone (a cancelled stream's), which it would still be doing when the next load begins."""
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_process(
    spec: LoadSpec, share: Share, request: bytes | None, barrier: Any = None
) -> Part:
    channel = channel_for(spec)
    try:
        if request is None:
            request = await fetch_request(channel, spec)
        else:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=_READY_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"could not connect to {spec.target}") from None
        if barrier is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, barrier.wait, SPAWN_TIMEOUT_S)
        return await Runner(spec, share, channel, request).run()
    finally:
        await channel.close(grace=None)
        # Completions of the calls just cancelled still arrive, tagged with this loop; let them
        # land while it runs, or grpc's shared poller hands them to a closed loop later (noise
        # in whatever other grpc.aio loop the process runs, such as an in-process server).
        await asyncio.sleep(_SETTLE_S)


def run_sync(coroutine_function: Callable[..., Any], *args: Any) -> Any:
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
