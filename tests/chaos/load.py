"""The chaos suite's load driver: bounded load at the ingress, every request accounted for.

Requests go over mutual TLS (the development client certificate of `meshserve up`) with a
client deadline long enough that a request without an answer by then counts as lost. The
load stops at `count` requests or after `seconds`, whichever comes first; the driver then
waits for every call it started, bounded by the deadline plus a margin, and counts any
that never completed as lost.
"""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy
import torch

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.budget_proc import BareServer
from meshserve.tools.load_results import percentiles
from tests.chaos.outcomes import Outcome, Tally, classify

DEADLINE = 30.0  # seconds: an answer later than this is a lost request
INPUT_DIMS = {"mlp": (256,), "cnn": (3, 64, 64), "slow": (16,)}
POOL = 8  # distinct inputs per model
REFUSAL_PAUSE = 0.05  # seconds a caller waits after a refusal that names no retry time


def connect(data_dir: Path) -> grpc.aio.Channel:
    endpoint = (data_dir / "run" / "endpoint").read_text().strip()
    tls = TlsFiles.for_identity(data_dir / "tls", "client")
    # A restarted ingress comes back on the same port: reconnect quickly.
    options = [("grpc.initial_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 500)]
    return grpc.aio.secure_channel(endpoint, channel_credentials(tls), options=options)


@dataclass(frozen=True)
class Reference:
    """Seeded inputs of one model and, per version, the local forward pass of each."""

    model: str
    inputs: list[numpy.ndarray]
    expected: dict[str, list[numpy.ndarray]]

    @classmethod
    def compute(cls, models: Path, model: str) -> "Reference":
        generator = numpy.random.default_rng(11)
        inputs = [generator.standard_normal((1, *INPUT_DIMS[model])).astype(numpy.float32)
                  for _ in range(POOL)]
        expected = {}
        for version_dir in sorted(p for p in (models / model).iterdir() if p.is_dir()):
            module = torch.jit.load(str(version_dir / "model.pt")).eval()
            with torch.inference_mode():
                expected[version_dir.name] = [module(torch.from_numpy(x)).numpy()
                                              for x in inputs]
        return cls(model, inputs, expected)

    def request(self, n: int, timeout_us: int = 0) -> pb.ModelInferRequest:
        """Request `n` (input n mod POOL); `timeout_us`: Triton's server-side timeout."""
        x = self.inputs[n % len(self.inputs)]
        request = pb.ModelInferRequest(model_name=self.model, id=str(n))
        if timeout_us:
            request.parameters["timeout"].int64_param = timeout_us
        request.inputs.add(name="INPUT__0", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        return request

    def matches(self, n: int, response: pb.ModelInferResponse) -> bool:
        expected = self.expected.get(response.model_version)
        if expected is None or len(response.raw_output_contents) != 1:
            return False
        want = expected[n % len(self.inputs)]
        got = numpy.frombuffer(response.raw_output_contents[0], numpy.float32)
        return got.size == want.size and bool(
            numpy.allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5))


async def call_once(stub: GRPCInferenceServiceStub, reference: Reference, n: int,
                    tally: Tally, deadline: float = DEADLINE, timeout_us: int = 0) -> float:
    """One request, classified into `tally`; returns the seconds a polite client waits
    before its next request (the server's `retry-after-ms`, or REFUSAL_PAUSE, after a
    refusal; else 0)."""
    start = time.monotonic()
    try:
        response = await stub.ModelInfer(reference.request(n, timeout_us), timeout=deadline)
    except grpc.aio.AioRpcError as error:
        elapsed = time.monotonic() - start
        code, message = error.code().name, error.details() or ""
        outcome = classify(code, message, elapsed, deadline)
        tally.record(outcome, code, message, elapsed)
        return retry_after(error) if outcome is Outcome.REFUSED else 0.0
    elapsed = time.monotonic() - start
    ok = reference.matches(n, response)
    tally.record(classify("OK", "", elapsed, deadline, ok),
                 "OK" if ok else "WRONG_OUTPUT", "" if ok else f"version {response.model_version}",
                 elapsed)
    return 0.0


def retry_after(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms" and value.isdigit():
            return min(int(value), 1000) / 1e3
    return REFUSAL_PAUSE


async def run_load(stub: GRPCInferenceServiceStub, reference: Reference, tally: Tally, *,
                   count: int, seconds: float, concurrency: int,
                   deadline: float = DEADLINE, timeouts_us: tuple[int, ...] = (0,),
                   stop: asyncio.Event | None = None) -> None:
    """`concurrency` callers, each sending one request after another, until `count` have
    been sent, `seconds` have passed or `stop` is set; returns once every call has an
    outcome. Request n carries the server-side timeout `timeouts_us[n % len(timeouts_us)]`
    (0: none)."""
    stop_at = time.monotonic() + seconds
    started = 0

    async def caller() -> None:
        nonlocal started
        while (started < count and time.monotonic() < stop_at
               and not (stop is not None and stop.is_set())):
            n = started
            started += 1
            tally.sent += 1
            pause = await call_once(stub, reference, n, tally, deadline,
                                    timeouts_us[n % len(timeouts_us)])
            if pause:
                await asyncio.sleep(pause)

    await settle([asyncio.create_task(caller()) for _ in range(concurrency)], tally, deadline)


async def burst(stub: GRPCInferenceServiceStub, reference: Reference, tally: Tally,
                count: int, deadline: float = DEADLINE) -> None:
    """`count` requests at once."""
    tally.sent += count
    tasks = [asyncio.create_task(call_once(stub, reference, n, tally, deadline))
             for n in range(count)]
    await settle(tasks, tally, deadline)


async def bare_burst_p99_ms(data_dir: Path, reference: Reference, count: int) -> float:
    """The p99 latency (ms) of `count` requests at once to the bare server of `bench budget`
    (mutual TLS, a constant answer, nothing else), from this client: what the client and gRPC
    alone take to carry such a burst, whatever the server does."""
    server = BareServer(data_dir / "tls", data_dir)
    tls = TlsFiles.for_identity(data_dir / "tls", "client")
    try:
        async with grpc.aio.secure_channel(server.address, channel_credentials(tls)) as channel:
            stub = GRPCInferenceServiceStub(channel)

            async def one(n: int) -> float:
                start = time.monotonic()
                await stub.ModelInfer(reference.request(n), timeout=DEADLINE)
                return (time.monotonic() - start) * 1000

            seconds = await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        server.stop()
    return percentiles(seconds)["p99"]


async def settle(tasks: list[asyncio.Task], tally: Tally, deadline: float) -> None:
    """Wait for `tasks` (bounded); whatever `tally` sent but has no outcome counts as lost
    (so one tally serves one load at a time)."""
    done, pending = await asyncio.wait(tasks, timeout=deadline + 30.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    missing = tally.sent - sum(tally.outcomes.values())
    if missing > 0:
        tally.never_answered(missing)


async def capacity(stub: GRPCInferenceServiceStub, reference: Reference, *,
                   seconds: float = 2.0, concurrency: int = 32) -> float:
    """Requests per second the mesh answered OK under a short closed-loop load."""
    tally = Tally("capacity")
    start = time.monotonic()
    await run_load(stub, reference, tally, count=100_000, seconds=seconds,
                   concurrency=concurrency)
    return tally.succeeded / (time.monotonic() - start)

