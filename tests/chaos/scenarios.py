"""The chaos scenarios: each runs bounded load through a live `meshserve up` (two compute
replicas and two batchers per model version), injects one fault, waits for the mesh to
recover, and returns its report row. `max_failed` is the number of failures the fault makes
unavoidable (zero everywhere: no scenario kills the only copy of something with requests
inside it without a drain); lost requests are never allowed.
"""

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.chaos import faults, fuzz
from tests.chaos.load import Reference, bare_burst_p99_ms, burst, capacity, connect, run_load
from tests.chaos.outcomes import Row, Tally
from tests.polling import until

LOAD_LIMIT = 90.0  # seconds: the longest any load runs, whatever its fault does


@dataclass(frozen=True)
class Plan:
    """How hard each scenario pushes: the short plan runs in CI, the full one by hand."""

    seconds: float  # load after each fault has finished (and for plain loads)
    count: int  # most requests per load
    concurrency: int
    stall_seconds: float
    burst_cap: int  # most requests in the 10× burst
    fuzz_examples: int
    sigterm_all: bool  # SIGTERM every service, or one of each kind

    @classmethod
    def named(cls, name: str) -> "Plan":
        if name == "full":
            return cls(seconds=10.0, count=200_000, concurrency=32, stall_seconds=6.0,
                       burst_cap=20_000, fuzz_examples=2_000, sigterm_all=True)
        return cls(seconds=2.0, count=40_000, concurrency=16, stall_seconds=3.0,
                   burst_cap=6_000, fuzz_examples=200, sigterm_all=False)


def references(models: Path) -> dict[str, Reference]:
    """Local forward passes of the models the scenarios load."""
    return {model: Reference.compute(models, model) for model in ("mlp", "slow")}


@dataclass
class Chaos:
    """A running mesh, a channel to its ingress (made on the running event loop), and the
    local reference outputs."""

    data_dir: Path
    plan: Plan
    references: dict[str, Reference]
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = connect(self.data_dir)
        self.stub = GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def load(self, tally: Tally, model: str = "mlp", **overrides) -> None:
        options = {"count": self.plan.count, "seconds": self.plan.seconds,
                   "concurrency": self.plan.concurrency, **overrides}
        await run_load(self.stub, self.references[model], tally, **options)

    async def under_load(self, name: str, fault: Callable[[], Awaitable[None]],
                         model: str = "mlp") -> Tally:
        """Load from before `fault` (once 20 requests have succeeded) until `plan.seconds`
        after it has finished (the fault's coroutine returns once the mesh has recovered),
        within `plan.count` requests and `LOAD_LIMIT` seconds; then every service must be
        ready again."""
        tally = Tally(name)
        stop = asyncio.Event()
        load = asyncio.create_task(self.load(tally, model, seconds=LOAD_LIMIT, stop=stop))
        try:
            await until(lambda: tally.succeeded >= 20 or load.done(), 30, f"{name}: load")
            assert not load.done(), f"{name}: the load ended before the fault"
            await fault()
            await asyncio.sleep(self.plan.seconds)
        finally:
            stop.set()
            await load
        await faults.wait_all_ready(self.data_dir)
        return tally

    async def restart(self, service: str, sig: signal.Signals) -> None:
        """Signal `service` and wait until `up` has it back and ready."""
        pid = faults.send(self.data_dir, service, sig)
        await faults.wait_back(self.data_dir, service, pid)


Scenario = Callable[[Chaos], Awaitable[Row | list[Row]]]


async def kill9_compute(chaos: Chaos) -> Row:
    tally = await chaos.under_load(
        "kill9-compute", lambda: chaos.restart("compute-mlp-1-0", signal.SIGKILL))
    return Row(tally, "SIGKILL compute-mlp-1-0 (of 2 replicas) under load")


async def kill9_batcher(chaos: Chaos) -> Row:
    """SIGKILL one of the two batchers of mlp v1: its groups in flight end UNAVAILABLE at
    the router, whose xDS retry policy sends each once more to the other endpoint (round
    robin skips a subchannel whose connection broke); the restarted batcher answers
    UNAVAILABLE until ready, which is retried the same way. Bound: failed 0, lost 0, and at
    most one group refused (UNAVAILABLE with a message, should its retry fail too): the
    router keeps one group of a model in flight, at most `plan.concurrency` requests.
    Measured: none refused."""
    killed, sibling = "batcher-mlp-1-0", "batcher-mlp-1-1"
    before = await faults.inferences(chaos.data_dir, killed)
    sibling_at_kill = 0.0

    async def answered_since_start() -> bool:
        return await faults.inferences(chaos.data_dir, killed) > before

    async def kill() -> None:
        nonlocal sibling_at_kill
        # The killed batcher has work when it dies: the load reaches it (round robin) before
        # the kill, however the first groups fell.
        await until(answered_since_start, 30, f"{killed} answering under load")
        sibling_at_kill = await faults.inferences(chaos.data_dir, sibling)
        await chaos.restart(killed, signal.SIGKILL)

    tally = await chaos.under_load("kill9-batcher", kill)
    assert await faults.inferences(chaos.data_dir, sibling) > sibling_at_kill, \
        f"{sibling} answered nothing after {killed} was killed"
    return Row(tally, "SIGKILL batcher-mlp-1-0 (of 2 batchers) under load",
               max_refused=chaos.plan.concurrency)


async def stall_compute(chaos: Chaos) -> Row:
    async def stall() -> None:
        pid = faults.send(chaos.data_dir, "compute-mlp-1-0", signal.SIGSTOP)
        try:
            await asyncio.sleep(chaos.plan.stall_seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    tally = await chaos.under_load("stall-compute", stall)
    return Row(tally, f"SIGSTOP compute-mlp-1-0 for {chaos.plan.stall_seconds:.0f} s, "
                      "then SIGCONT")


async def kill_control_plane(chaos: Chaos) -> Row:
    tally = await chaos.under_load(
        "kill-control-plane", lambda: chaos.restart("control-plane", signal.SIGKILL))
    return Row(tally, "SIGKILL the control plane; routers keep their last xDS config")


async def burst_10x(chaos: Chaos) -> Row:
    reference = chaos.references["mlp"]
    rate = await capacity(chaos.stub, reference, concurrency=chaos.plan.concurrency)
    count = min(chaos.plan.burst_cap, max(1, round(10 * rate)))
    tally = Tally("burst-10x")
    await burst(chaos.stub, reference, tally, count)
    bare = await bare_burst_p99_ms(chaos.data_dir, reference, count)
    return Row(tally, f"{count} requests at once (10 × {rate:.0f} answered/s"
                      f"{', capped' if count < 10 * rate else ''}); the same burst to a bare "
                      f"server: p99 {bare:.0f} ms")


async def slow_model(chaos: Chaos) -> Row:
    """`slow` (~50 ms a batch); every other request carries a 20 ms server-side timeout,
    which it cannot meet: those must be refused with DEADLINE_EXCEEDED, never lost."""
    tally = Tally("slow-model")
    await chaos.load(tally, "slow", seconds=chaos.plan.seconds * 2.5,
                     timeouts_us=(0, 20_000))
    return Row(tally, "model at ~50 ms a batch; half the requests with a 20 ms timeout")


async def fuzz_ingress(chaos: Chaos) -> Row:
    ingress = faults.pid_of(chaos.data_dir, "ingress")
    tally = Tally("fuzz-ingress")
    payloads = fuzz.draw_payloads(chaos.plan.fuzz_examples)
    leaks = await fuzz.send_all(chaos.channel, payloads, tally)
    assert leaks == [], f"stack traces leaked to callers: {leaks[:3]}"
    after = Tally("after-fuzz")
    await chaos.load(after, count=20, seconds=10.0, concurrency=4)
    assert after.succeeded == 20, f"the ingress stopped answering after fuzzing: {after}"
    assert faults.pid_of(chaos.data_dir, "ingress") == ingress, "the ingress process died"
    return Row(tally, f"{len(payloads)} random and malformed ModelInfer messages "
                      "(hypothesis), then 20 valid requests")


async def fuzz_internal(chaos: Chaos) -> list[Row]:
    """The hops behind the ingress trust its validation; a caller with the right identity
    (a compromised or buggy neighbour) must still get a clear status for anything, and the
    service must stay up and keep serving."""
    examples = max(20, chaos.plan.fuzz_examples // 2)
    targets = [("batcher-mlp-1-0", "router", fuzz.GROUP_INFER, fuzz.group_payloads),
               ("batcher-mlp-1-0", "router", fuzz.MODEL_INFER, fuzz.payloads),
               ("compute-mlp-1-0", "batcher", fuzz.MODEL_INFER, fuzz.payloads)]
    rows = []
    for service, caller, method, strategy in targets:
        pid = faults.pid_of(chaos.data_dir, service)
        tally = Tally(f"fuzz {service} {method.rsplit('/', 1)[1]}")
        async with faults.channel_to(chaos.data_dir, service, caller) as channel:
            leaks = await fuzz.send_all(channel, fuzz.draw_payloads(examples, strategy), tally,
                                        method=method)
        assert leaks == [], f"stack traces leaked to callers: {leaks[:3]}"
        assert faults.pid_of(chaos.data_dir, service) == pid, f"{service} died"
        rows.append(Row(tally, f"{examples} random and malformed messages as '{caller}'"))
    await faults.wait_all_ready(chaos.data_dir)
    after = Tally("after-fuzz-internal")
    await chaos.load(after, count=20, seconds=10.0, concurrency=4)
    assert after.succeeded == 20, f"the mesh stopped answering after fuzzing: {after}"
    return rows


def sigterm_targets(chaos: Chaos) -> list[str]:
    everything = faults.services(chaos.data_dir)
    if chaos.plan.sigterm_all:
        return everything
    return ["control-plane", "compute-mlp-1-1", "batcher-mlp-1-1", "router", "ingress"]


async def sigterm_each(chaos: Chaos) -> list[Row]:
    """SIGTERM each service in turn under load: it drains (not-ready, in-flight work
    finished) and exits; `up` restarts it on the same port. One row per service.

    The one unavoidable failure: gRPC core answers CANCELLED (no message) to calls that
    reach a server after its shutdown has begun and before the client has seen its GOAWAY
    (a bare grpc.aio server does the same: 5 of ~780 calls at concurrency 16). Behind the
    ingress every hop turns that into UNAVAILABLE with a message, and the mesh's route
    retries a CANCELLED group on the batcher's sibling, so a batcher with a sibling may
    cause at most one group's refusals (`plan.concurrency` requests; measured: none); at
    the ingress the client sees it, at most once per caller with a call in flight."""
    rows = []
    for service in sigterm_targets(chaos):
        tally = await chaos.under_load(f"sigterm {service}", lambda s=service: chaos.restart(
            s, signal.SIGTERM))
        edge = service == "ingress"
        sibling = faults.identity_of(service) == "batcher"  # every batcher here has one
        rows.append(Row(tally, f"SIGTERM {service}; `up` restarts it",
                        max_failed=chaos.plan.concurrency if edge else 0,
                        tolerated="CANCELLED" if edge else "",
                        max_refused=chaos.plan.concurrency if sibling else None))
    return rows


SCENARIOS: dict[str, Scenario] = {
    "kill9-compute": kill9_compute,
    "kill9-batcher": kill9_batcher,
    "stall-compute": stall_compute,
    "kill-control-plane": kill_control_plane,
    "burst-10x": burst_10x,
    "slow-model": slow_model,
    "fuzz-ingress": fuzz_ingress,
    "fuzz-internal": fuzz_internal,
    "sigterm-each": sigterm_each,
}

