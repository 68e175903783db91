"""Overload and failover against real processes: a batcher in front of two compute replicas
(one killed, one stopped), priority shedding in a real batcher, and the ingress byte budget.

Each test starts its own processes on port 0 with certificates made into tmp_path, and stops
every one of them in `finally`.
"""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy
import pytest
import torch

from meshserve.common.forwarding import CODE_NUMBER
from meshserve.common.liveness import CHECK_EVERY_S, CHECK_TIMEOUT_S
from meshserve.common.server import RETRY_AFTER_MS
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.mesh.readiness import BatcherHealth, Changes
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup
from meshserve.protocol.groups_pb2_grpc import GroupInferenceStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.certs import init_certs
from meshserve.tools.demo_models import MAX_QUEUE_SIZE, build_model
from meshserve.tools.demo_repository import write_demo_repository
from tests.polling import suspend, until

START_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Certificates in `tls/`, the demo repository in `models/`."""
    root = tmp_path_factory.mktemp("failover")
    init_certs(root / "tls")
    write_demo_repository(root / "models")
    return root


class Processes:
    """Services started as `meshserve <service> ...`, each on port 0; all stopped by `close`."""

    def __init__(self, root: Path, run: Path) -> None:
        self.root = root
        self.run = run
        self.children: dict[str, subprocess.Popen] = {}
        run.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, service: str, identity: str, *args: str,
              metrics: bool = False) -> None:
        tls = self.root / "tls"
        port_file = self.run / f"{name}.port"
        extra = (["--metrics-listen=127.0.0.1:0",
                  f"--metrics-port-file={self.run / f'{name}.metrics'}"] if metrics else [])
        command = [sys.executable, "-m", "meshserve.tools.cli", service, *args,
                   f"--tls-cert={tls / identity}.crt", f"--tls-key={tls / identity}.key",
                   f"--tls-ca={tls / 'ca.crt'}", f"--port-file={port_file}",
                   "--log-format=text", *extra]
        log = open(self.run / f"{name}.log", "wb")  # noqa: SIM115
        self.children[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        log.close()

    def address(self, name: str) -> str:
        port_file = self.run / f"{name}.port"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                return f"127.0.0.1:{int(port_file.read_text())}"
            if self.children[name].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start:\n" + self.log(name)[-3000:])

    def log(self, name: str) -> str:
        return (self.run / f"{name}.log").read_text(errors="replace")

    def metrics(self, name: str) -> str:
        port = int((self.run / f"{name}.metrics").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def signal(self, name: str, number: int) -> None:
        os.kill(self.children[name].pid, number)

    def suspend(self, name: str) -> None:
        suspend(self.children[name].pid)

    def close(self) -> None:
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGCONT)
                child.kill()
        for child in self.children.values():
            child.wait(10)


@pytest.fixture
def processes(world, tmp_path):
    started = Processes(world, tmp_path / "run")
    try:
        yield started
    finally:
        started.close()


def start_batcher(processes: Processes, computes: int, *args: str) -> str:
    models = processes.root / "models"
    common = [f"--model-repository={models}", "--model=mlp", "--version=1"]
    for index in range(computes):
        processes.start(f"compute-{index}", "compute", "compute", *common, "--device=cpu",
                        metrics=True)
    addresses = [processes.address(f"compute-{index}") for index in range(computes)]
    processes.start("batcher", "batcher", "batcher", *common,
                    *[f"--compute={address}" for address in addresses], *args, metrics=True)
    return processes.address("batcher")


def tls_of(world: Path, identity: str) -> TlsFiles:
    tls = world / "tls"
    return TlsFiles(cert=tls / f"{identity}.crt", key=tls / f"{identity}.key", ca=tls / "ca.crt")


def mlp_request(seed: int, rows: int = 1, priority: int = 0) -> pb.ModelInferRequest:
    x = numpy.random.default_rng(seed).standard_normal((rows, 256)).astype(numpy.float32)
    request = pb.ModelInferRequest(model_name="mlp", id=str(seed))
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(x.tobytes())
    if priority:
        request.parameters["priority"].int64_param = priority
    return request


MODEL = build_model("mlp", "1")


def expected_output(request: pb.ModelInferRequest) -> numpy.ndarray:
    rows = request.inputs[0].shape[0]
    x = numpy.frombuffer(request.raw_input_contents[0], numpy.float32).reshape(rows, 256)
    with torch.no_grad():
        return MODEL(torch.from_numpy(x.copy())).numpy()


def output_of(response: pb.ModelInferResponse) -> numpy.ndarray:
    return numpy.frombuffer(response.raw_output_contents[0], numpy.float32).reshape(-1, 10)


async def wait_ready(stub: GRPCInferenceServiceStub, processes: Processes) -> None:
    """Until the batcher is ready and has every compute replica in rotation."""
    replicas = [processes.address(name) for name in processes.children
                if name.startswith("compute-")]
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError, OSError):
            reply = await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1"),
                                          timeout=2)
            text = processes.metrics("batcher")
            if reply.ready and all(sample(text, "meshserve_batcher_replica_up", replica=r) == 1
                                   for r in replicas):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("batcher not ready:\n" + processes.log("batcher")[-3000:])


async def run_load(stub: GRPCInferenceServiceStub, requests: int, workers: int,
                   seed: int = 0, during=None,
                   outstanding: dict[int, float] | None = None) -> list[str]:
    """`requests` ModelInfer calls from `workers` concurrent callers (bounded in count and
    each by a 30 s deadline); `during(done)` is awaited once after each answer, and
    `outstanding`, when given, holds when each unanswered request was sent. Returns the
    failures as text (empty: every answer matched a local forward pass)."""
    failures: list[str] = []
    next_seed = iter(range(seed, seed + requests))
    done = 0
    sent = {} if outstanding is None else outstanding

    async def worker() -> None:
        nonlocal done
        for number in next_seed:
            request = mlp_request(number)
            sent[number] = time.monotonic()
            try:
                response = await stub.ModelInfer(request, timeout=30)
                if not numpy.allclose(output_of(response), expected_output(request), atol=1e-5):
                    failures.append(f"request {number}: wrong output")
            except grpc.aio.AioRpcError as error:
                failures.append(f"request {number}: {error.code().name} {error.details()}")
            del sent[number]
            done += 1
            if during is not None:
                await during(done)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failures


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when it is absent."""
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def computed(processes: Processes, name: str) -> float:
    """Batches compute replica `name` ran (its histogram's count)."""
    return sample(processes.metrics(name), "meshserve_compute_seconds_count") or 0.0


def batches_sent(processes: Processes) -> float:
    """Batches the batcher had answered by compute (Triton's execution count)."""
    return sample(processes.metrics("batcher"), "nv_inference_exec_count") or 0.0


# A request unanswered this long is held by the stopped replica (a batch takes milliseconds;
# the stall timeout is at least 1 s).
HELD_S = 0.3


async def test_killed_compute_replica_is_ejected_and_its_batch_retried(world, processes):
    # Ejected at its first failure: the batch it holds when it dies fails at once. The replica
    # is stopped first and killed once it surely holds a batch; killed while idle, its health
    # Watch would take it out of rotation instead, with no batch to fail.
    address = start_batcher(processes, 2, "--eject-after=1")
    dead = processes.address("compute-0")
    async with secure_channel(address, tls_of(world, "router"), "batcher") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await wait_ready(stub, processes)
        assert await run_load(stub, 100, 4) == []  # warm: both replicas in use
        assert computed(processes, "compute-0") > 0 and computed(processes, "compute-1") > 0
        outstanding: dict[int, float] = {}
        stopped = asyncio.Event()

        async def stop_once(done: int) -> None:
            if done == 50 and not stopped.is_set():
                processes.suspend("compute-0")
                stopped.set()

        async def kill_once_it_holds_a_batch() -> None:
            await stopped.wait()
            await until(lambda: any(time.monotonic() - at > HELD_S
                                    for at in list(outstanding.values())),
                        10.0, "a batch held by the stopped compute-0")
            processes.signal("compute-0", signal.SIGKILL)

        killer = asyncio.create_task(kill_once_it_holds_a_batch())
        failures = await run_load(stub, 400, 8, seed=1000, during=stop_once,
                                  outstanding=outstanding)
        await killer
    assert processes.children["compute-0"].wait(10) == -signal.SIGKILL
    assert failures == []
    text = processes.metrics("batcher")
    assert sample(text, "meshserve_batcher_replica_up", replica=dead) == 0
    assert sample(text, "meshserve_batcher_replica_ejections_total", replica=dead) == 1
    retried = sample(text, "meshserve_batcher_retries_total", outcome="ok") or 0
    assert 1 <= retried <= 3  # the in-flight batch, and at most the next ones sent to it
    assert f"compute replica {dead} ejected (failures)" in processes.log("batcher")


async def test_stalled_compute_replica_is_ejected_then_put_back(world, processes):
    address = start_batcher(processes, 2, "--stall-timeout=1")
    stalled = processes.address("compute-0")
    async with secure_channel(address, tls_of(world, "router"), "batcher") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await wait_ready(stub, processes)
        assert await run_load(stub, 100, 4) == []

        async def stop_once(done: int) -> None:
            if done == 30 and not stop_once.sent:
                stop_once.sent = True
                processes.suspend("compute-0")

        stop_once.sent = False
        try:
            assert await run_load(stub, 200, 4, seed=2000, during=stop_once) == []
            text = processes.metrics("batcher")
            assert sample(text, "meshserve_batcher_replica_up", replica=stalled) == 0
            assert sample(text, "meshserve_batcher_replica_ejections_total",
                          replica=stalled) == 1
            assert f"compute replica {stalled} ejected (stall)" in processes.log("batcher")
        finally:
            processes.signal("compute-0", signal.SIGCONT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = processes.metrics("batcher")
            if sample(text, "meshserve_batcher_replica_up", replica=stalled) == 1:
                break
            await asyncio.sleep(0.2)
        assert sample(text, "meshserve_batcher_replica_up", replica=stalled) == 1
        before = computed(processes, "compute-0")
        assert await run_load(stub, 100, 4, seed=3000) == []
        assert computed(processes, "compute-0") > before
    assert f"compute replica {stalled} is back in rotation" in processes.log("batcher")


async def test_priority_sheds_low_first_in_a_real_batcher(world, processes):
    address = start_batcher(processes, 1)
    low, high = MAX_QUEUE_SIZE + 44, 10
    # One group: its requests reach the queue together, before any batch leaves.
    group = InferGroup(model_name="mlp", items=[
        GroupItem(request=mlp_request(n), request_id=str(n), priority=2 if n < low else 1)
        for n in range(low + high)])
    async with secure_channel(address, tls_of(world, "router"), "batcher") as channel:
        await wait_ready(GRPCInferenceServiceStub(channel), processes)
        reply = await GroupInferenceStub(channel).Infer(group, timeout=60)
    results = list(reply.results)
    exhausted = CODE_NUMBER["RESOURCE_EXHAUSTED"]
    for item, result in zip(group.items[low:], results[low:], strict=True):
        assert result.code == 0, result.message
        numpy.testing.assert_allclose(output_of(result.response),
                                      expected_output(item.request), atol=1e-5)
    refused = [r for r in results[:low] if r.code == exhausted]
    assert [r.code for r in results[:low]].count(0) == MAX_QUEUE_SIZE - high
    assert len(refused) == low - MAX_QUEUE_SIZE + high
    full = re.compile(r"queue of model 'mlp' version '1' is full \(max_queue_size 256; "
                      r"256 requests / \d+ bytes\); retry after \d+(\.\d+)? s$")
    shed = re.compile(r"shed: queue of model 'mlp' version '1' full \(256 requests / \d+ "
                      r"bytes\) and a more urgent request arrived; retry after \d+(\.\d+)? s$")
    assert sum(bool(full.match(r.message)) for r in refused) == low - MAX_QUEUE_SIZE
    assert sum(bool(shed.match(r.message)) for r in refused) == high
    # the shed ones are the newest low-priority requests
    assert all(r.code == exhausted for r in results[MAX_QUEUE_SIZE - high:low])
    text = processes.metrics("batcher")
    assert sample(text, "meshserve_shed_total", reason="queue_full") == low - MAX_QUEUE_SIZE
    assert sample(text, "meshserve_shed_total", reason="priority") == high


async def test_ingress_byte_budget_refuses_with_retry_hint(world, processes):
    batcher = start_batcher(processes, 1)
    one_row = len(mlp_request(1).raw_input_contents[0])  # the budget counts payload bytes
    address = start_ingress_before(processes, batcher,
                                   f"--max-inflight-bytes={one_row * 3 // 2}")
    async with secure_channel(address, tls_of(world, "client"), "localhost") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await ingress_ready(stub)
        request = mlp_request(7)
        response = await stub.ModelInfer(request, timeout=30)
        numpy.testing.assert_allclose(output_of(response), expected_output(request), atol=1e-5)
        big = mlp_request(8, rows=2)
        call = stub.ModelInfer(big, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (f"request of {2 * one_row} bytes exceeds max_inflight_bytes "
                               f"{one_row * 3 // 2}; retry after 0.05 s")
    assert dict(error.trailing_metadata())[RETRY_AFTER_MS] == "50"
    assert sample(processes.metrics("ingress"), "meshserve_shed_total", model="mlp",
                  reason="inflight_bytes") == 1


def start_ingress_before(processes: Processes, batcher: str, *args: str) -> str:
    """An ingress that talks straight to `batcher` (which speaks the router's group protocol),
    presenting the router's certificate, the identity a batcher accepts."""
    processes.start("ingress", "ingress", "router",
                    f"--model-repository={processes.root / 'models'}", f"--router={batcher}",
                    "--router-identity=batcher", *args, metrics=True)
    return processes.address("ingress")


async def ingress_ready(stub: GRPCInferenceServiceStub) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready:
        assert time.monotonic() < deadline, "ingress not ready"
        await asyncio.sleep(0.2)


async def first_done(calls: list[asyncio.Future], seconds: float = 30.0) -> None:
    """Until one of `calls` has its answer (a refusal, while compute is stopped)."""
    deadline = time.monotonic() + seconds
    while not any(call.done() for call in calls):
        assert time.monotonic() < deadline, "no refusal while the model was stalled"
        await asyncio.sleep(0.05)


async def test_a_burst_beyond_max_queue_size_is_refused_at_the_ingress(world, processes):
    batcher = start_batcher(processes, 1, "--stall-timeout=120")
    address = start_ingress_before(processes, batcher)
    low = [mlp_request(n) for n in range(MAX_QUEUE_SIZE + 40)]
    urgent = [mlp_request(1000 + n, priority=1) for n in range(3)]
    async with secure_channel(address, tls_of(world, "client"), "localhost") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await ingress_ready(stub)
        await stub.ModelInfer(mlp_request(0), timeout=30)
        # With compute stopped the first group never comes back: the rest wait at the ingress
        # until MAX_QUEUE_SIZE do, and every later one is refused there, at once.
        processes.suspend("compute-0")
        try:
            calls = [asyncio.ensure_future(stub.ModelInfer(r, timeout=60)) for r in low]
            await first_done(calls)
            # More urgent than the model's default level: never refused at the edge. The low
            # one sent after them is, once they have been let in.
            calls += [asyncio.ensure_future(stub.ModelInfer(r, timeout=60)) for r in urgent]
            sentinel = asyncio.ensure_future(stub.ModelInfer(mlp_request(2000), timeout=60))
            await first_done([sentinel])
            assert isinstance(sentinel.exception(), grpc.aio.AioRpcError)
        finally:
            processes.signal("compute-0", signal.SIGCONT)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    # The count is the bound, or above it by the urgent ones that were let in first: the
    # calls of a burst reach the ingress in no guaranteed order.
    edge = re.compile(rf"model 'mlp' is saturated: (\d+) requests wait at the ingress "
                      rf"\(max_queue_size {MAX_QUEUE_SIZE}\); retry after ")
    refused, shed = 0, 0
    for request, outcome in zip(low + urgent, outcomes, strict=True):
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.details()
            hint = int(dict(outcome.trailing_metadata())[RETRY_AFTER_MS])
            if found := edge.match(outcome.details()):
                assert MAX_QUEUE_SIZE <= int(found[1]) <= MAX_QUEUE_SIZE + len(urgent)
                assert hint >= 50
                refused += 1
            else:
                assert outcome.details().startswith("shed: "), outcome.details()
                shed += 1
        else:
            numpy.testing.assert_allclose(output_of(outcome), expected_output(request),
                                          atol=1e-5)
    assert refused >= 1
    sentinel_refused = bool(edge.match(sentinel.exception().details()))
    assert sample(processes.metrics("ingress"), "meshserve_shed_total", model="mlp",
                  reason="saturated") == refused + sentinel_refused  # counted where refused
    assert shed <= len(urgent)  # the batcher makes room for the urgent ones
    assert all(not isinstance(outcome, Exception) for outcome in outcomes[len(low):])


async def test_deadlines_reach_compute_and_expired_requests_are_never_computed(world,
                                                                               processes):
    # One batch at a time on the replica: A fills a batch by itself (32 rows), so B (1 row)
    # waits in the queue behind it.
    address = start_batcher(processes, 1, "--stall-timeout=30", "--batches-per-replica=1")
    first, second = mlp_request(1, rows=32), mlp_request(2)
    group = InferGroup(model_name="mlp", items=[
        GroupItem(request=first, request_id="a", timeout_us=800_000),
        GroupItem(request=second, request_id="b", timeout_us=800_000)])
    async with secure_channel(address, tls_of(world, "router"), "batcher") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await wait_ready(stub, processes)
        assert await run_load(stub, 20, 2) == []
        before = computed(processes, "compute-0")
        processes.suspend("compute-0")
        try:
            reply = await GroupInferenceStub(channel).Infer(group, timeout=20)
        finally:
            processes.signal("compute-0", signal.SIGCONT)
        a, b = reply.results
        # A's compute call carried A's remaining time, not the 30 s stall timeout.
        assert (a.code, a.message) == (CODE_NUMBER["DEADLINE_EXCEEDED"],
                                       "deadline exceeded before the model answered")
        assert (b.code, b.message) == (CODE_NUMBER["DEADLINE_EXCEEDED"],
                                       "deadline exceeded while queued for a batch "
                                       "(never computed)")
        # Compute resumed: it may still run A's batch, late, and then answers again. Every
        # batch it ran since is A's or one of the load's, which the batcher counts: never B.
        sent = batches_sent(processes)
        assert await run_load(stub, 20, 2, seed=100) == []
        load_batches = batches_sent(processes) - sent
        assert computed(processes, "compute-0") - before - load_batches <= 1
    text = processes.metrics("batcher")
    assert sample(text, "meshserve_shed_total", reason="deadline") == 1
    assert sample(text, "meshserve_batcher_replica_ejections_total") is None


async def test_no_replica_left_answers_unavailable_with_retry_hint_at_once(world, processes):
    address = start_batcher(processes, 2)
    async with secure_channel(address, tls_of(world, "router"), "batcher") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await wait_ready(stub, processes)
        assert await run_load(stub, 20, 2) == []
        for name in ("compute-0", "compute-1"):
            processes.signal(name, signal.SIGKILL)
        refusals = []
        for number in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(mlp_request(number), timeout=30)
            refusals.append(refused.value)
    for error in refusals:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert re.search(r"; retry after \d+(\.\d+)? s$", error.details()), error.details()
        assert int(dict(error.trailing_metadata())[RETRY_AFTER_MS]) >= 1
    text = processes.metrics("batcher")
    assert sample(text, "meshserve_batcher_retries_total", outcome="ok") is None


# A stopped process is noticed within CHECK_EVERY_S + CHECK_TIMEOUT_S; the rest is slack for
# the push from the batcher and a loaded test machine.
FROZEN_NOTICED_S = CHECK_EVERY_S + CHECK_TIMEOUT_S + 4.0


async def test_a_frozen_compute_or_batcher_is_not_ready_until_it_answers_again(world,
                                                                              processes):
    # A SIGSTOPped process keeps its connections, so the health Watch streams that follow it
    # neither move nor end: each hop's liveness check must notice it. The ingress calls the
    # batcher its router here, as it calls the router in a mesh (the same hop); the control
    # plane's side is `BatcherHealth`, run in this process.
    batcher = start_batcher(processes, 1)
    address = start_ingress_before(processes, batcher)
    changes = Changes()
    control_plane = BatcherHealth(tls_of(world, "control-plane"), "batcher", changes)
    async with secure_channel(address, tls_of(world, "client"), "localhost") as channel:
        stub = GRPCInferenceServiceStub(channel)
        await ingress_ready(stub)
        control_plane.follow([batcher])
        try:
            async def ready() -> bool:
                return (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready

            async def model_ready(timeout: float = 10) -> bool:
                request = pb.ModelReadyRequest(name="mlp", version="1")
                return (await stub.ModelReady(request, timeout=timeout)).ready

            def batcher_serving() -> bool:
                return control_plane.serving.get(batcher, False)

            await until(batcher_serving, START_TIMEOUT, "the batcher serving")
            for name in ("compute-0", "batcher"):
                processes.suspend(name)
                try:
                    await until(lambda: not batcher_serving(), FROZEN_NOTICED_S,
                                f"the batcher not serving with {name} stopped", interval=0.2)
                    await until(lambda: not_(ready), FROZEN_NOTICED_S,
                                f"ServerReady false with {name} stopped", interval=0.2)
                    # Not ready: the batcher says so, or, stopped, is known not to answer
                    # (answered at once, not after the ingress's 5 s wait on its router).
                    assert not await model_ready(timeout=2)
                finally:
                    processes.signal(name, signal.SIGCONT)
                await until(batcher_serving, FROZEN_NOTICED_S,
                            f"the batcher serving once {name} goes on", interval=0.2)
                await until(ready, FROZEN_NOTICED_S, f"ServerReady once {name} goes on",
                            interval=0.2)
                assert await model_ready()
        finally:
            await control_plane.close()
        assert await stub.ModelInfer(mlp_request(1), timeout=30)
    assert "did not answer a health check in time" in processes.log("batcher")


async def not_(check) -> bool:
    return not await check()
