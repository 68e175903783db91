"""Load generator for any Open Inference Protocol (KServe v2 / Triton) gRPC server: `run_load`.

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
* Closed loop: a request counts when it was sent and answered inside the window. The few
  still in flight at the end are answered, not counted (up to ``DRAIN_S`` seconds, then
  cancelled), and each stream is half-closed and read to its end: a server is not left with
  cancelled work when the next load begins.
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

import contextlib
import time
import traceback
from typing import Any

import uvloop

from meshserve.tools.load_engine import SPAWN_TIMEOUT_S, run_process, run_sync
from meshserve.tools.load_results import summarize
from meshserve.tools.load_spec import DRAIN_S, LoadSpec, Part, Share, shares_of, validate
from meshserve.tools.load_wire import request_bytes


def _child_main(spec: LoadSpec, share: Share, request: bytes, barrier: Any, conn: Any) -> None:
    """Entry point of a spawned client process: runs its share and sends back a `Part`."""
    try:
        part = uvloop.run(run_process(spec, share, request, barrier))
    except BaseException:  # report anything, including a broken barrier, to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", part))
    finally:
        conn.close()


def _spawn(spec: LoadSpec, shares: list[Share], request: bytes) -> list[Part]:
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
    deadline = time.monotonic() + SPAWN_TIMEOUT_S + spec.warmup_s + spec.duration_s + DRAIN_S + 30
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


def run_load(spec: LoadSpec) -> dict:
    """Runs the load described by ``spec`` and returns the result (see the module docstring).

    Blocks until done (about ``warmup_s + duration_s``, bounded). ``processes > 1`` spawns that
    many client processes; otherwise the load runs in this process.
    """
    validate(spec)
    if spec.protocol == "http":
        from meshserve.tools import bench_http

        return bench_http.run_load(spec)
    shares = shares_of(spec)
    if len(shares) == 1:
        parts = [run_sync(run_process, spec, shares[0], spec.request or None)]
    else:
        request = spec.request or run_sync(request_bytes, spec)
        parts = _spawn(spec, shares, request)
    return summarize(spec, parts)
