"""Ready means ready: ServerReady turns true only when every model version can answer.

`up` serves the demo models and `slow`, whose compute takes seconds to load (a long warm-up);
the test polls the ingress from the moment it listens, as a client or a load balancer would.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy
import pytest

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.chaos.slow_model import INPUT_DIM, write_slow_model
from tests.integration.conftest import Mesh, stop_up
from tests.polling import until

# Warm-up batches of `slow` (~50 ms each on one core): seconds of loading.
WARMUP = """model_warmup [ {{ name: "long" batch_size: 32 count: {count}
  inputs {{ key: "INPUT__0" value: {{ data_type: TYPE_FP32 dims: [ 16 ] zero_data: true }} }} }} ]
"""
VERSIONS = {"mlp": ("1", "2"), "cnn": ("1", "2"), "slow": ("1",)}


def write_slow_loading_model(models: Path, warmup_batches: int) -> None:
    write_slow_model(models)
    config = models / "slow" / "config.pbtxt"
    config.write_text(config.read_text() + WARMUP.format(count=warmup_batches))


def start(data_dir: Path, *args: str, warmup_batches: int = 60) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_slow_loading_model(data_dir / "models", warmup_batches)
    log = open(data_dir.parent / "up.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "meshserve.tools.cli", "up", f"--data-dir={data_dir}",
         "--port=0", "--device=cpu", *args], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def ingress_stub(data_dir: Path, process: subprocess.Popen, timeout: float = 120.0):
    """A channel and stub to the ingress as soon as it listens."""
    port_file = data_dir / "run" / "ingress.port"
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        assert process.poll() is None, "meshserve up exited"
        assert time.monotonic() < deadline, "the ingress never listened"
        await asyncio.sleep(0.05)
    tls = data_dir / "tls"
    credentials = grpc.ssl_channel_credentials(
        (tls / "ca.crt").read_bytes(), (tls / "client.key").read_bytes(),
        (tls / "client.crt").read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port_file.read_text().strip()}",
                                      credentials,
                                      options=[("grpc.ssl_target_name_override", "ingress")])
    return channel, GRPCInferenceServiceStub(channel)


async def answer(call, timeout: float = 2.0):
    """The reply, or None while the ingress cannot answer yet."""
    try:
        return await call(timeout=timeout)
    except grpc.aio.AioRpcError:
        return None


@dataclass
class Timeline:
    """When (seconds after `up` started) each signal was first seen true."""

    started: float
    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.seen.setdefault(name, time.monotonic() - self.started)


def request_for(model: str, version: str) -> pb.ModelInferRequest:
    shape = {"mlp": [1, 256], "cnn": [1, 3, 64, 64], "slow": [1, INPUT_DIM]}[model]
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="INPUT__0", datatype="FP32", shape=shape)
    message.raw_input_contents.append(numpy.zeros(shape, numpy.float32).tobytes())
    return message


async def model_ready(stub, model: str, version: str) -> bool:
    reply = await answer(lambda timeout: stub.ModelReady(
        pb.ModelReadyRequest(name=model, version=version), timeout=timeout))
    return bool(reply and reply.ready)


async def server_ready(stub) -> bool:
    reply = await answer(lambda timeout: stub.ServerReady(pb.ServerReadyRequest(),
                                                          timeout=timeout))
    return bool(reply and reply.ready)


async def versions_ready(stub, timeline: Timeline) -> dict:
    """Which versions are ready now (each seen ready is marked on the timeline)."""
    ready = {}
    for model, versions in VERSIONS.items():
        for version in versions:
            ready[model, version] = await model_ready(stub, model, version)
            if ready[model, version]:
                timeline.mark(f"ModelReady {model}/{version}")
    return ready


async def watch_until_ready(stub, timeline: Timeline, timeout: float = 240.0) -> dict:
    """Poll until ServerReady; return which versions were ready just after it turned (read
    again then: a version may have turned ready between the last look and ServerReady)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"never ready: {timeline.seen}"
        if await answer(lambda timeout: stub.ServerLive(pb.ServerLiveRequest(),
                                                        timeout=timeout)):
            timeline.mark("ServerLive")
        await versions_ready(stub, timeline)
        if await server_ready(stub):
            ready = await versions_ready(stub, timeline)
            timeline.mark("ServerReady")  # after the versions it waited for, within a poll
            return ready
        await asyncio.sleep(0.05)


def pid_of(data_dir: Path, name: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (str(data_dir).encode() in b" ".join(command) and b"compute" in command
                    and f"--port-file={data_dir}/run/{name}.port".encode() in command):
                return int(entry.name)
    raise AssertionError(f"no process {name}")


async def test_server_ready_waits_for_every_version_and_follows_a_lost_compute(tmp_path):
    data_dir = tmp_path / "data"
    timeline = Timeline(time.monotonic())
    process = start(data_dir)
    channel = None
    try:
        channel, stub = await ingress_stub(data_dir, process)
        ready = await watch_until_ready(stub, timeline)
        # The moment it turned: every version said ready and every one answers.
        assert all(ready.values()), ready
        replies = await asyncio.gather(*(
            stub.ModelInfer(request_for(model, version), timeout=30)
            for model, versions in VERSIONS.items() for version in versions))
        assert [r.model_version for r in replies] == [
            v for versions in VERSIONS.values() for v in versions]
        assert timeline.seen["ServerReady"] >= timeline.seen["ModelReady slow/1"]
        print("\ntimes after up started (s):", {k: round(v, 2) for k, v in
                                                sorted(timeline.seen.items(),
                                                       key=lambda kv: kv[1])})

        # The only compute of slow/1 dies: not ready within a second, a pinned request is
        # refused at the ingress at once; ready again once `up` has restarted it. `up`
        # restarts services once its start is done (it has written the endpoint); a service
        # lost before, while it still checks the others one by one, fails the start instead.
        await until((data_dir / "run" / "endpoint").exists, seconds=120,
                    what="the end of up's start")
        metrics_port = data_dir / "run" / "compute-slow-1.metrics-port"
        scraped_on = metrics_port.read_text()
        os.kill(pid_of(data_dir, "compute-slow-1"), signal.SIGKILL)
        lost = await until(lambda: _not(server_ready(stub)), seconds=1.0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request_for("slow", "1"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'slow' version '1' is not ready" in refused.value.details()
        assert ("retry-after-ms", "1000") in tuple(refused.value.trailing_metadata())
        back = await until(lambda: server_ready(stub), seconds=240)
        print(f"not ready {lost:.2f} s after the kill; ready again {back:.2f} s later")
        assert (await stub.ModelInfer(request_for("slow", "1"), timeout=30)).model_version == "1"
        # Restarted, its metrics are where a scraper was pointed, as its gRPC port is.
        await until(metrics_port.exists, seconds=30, what="the restarted compute's metrics")
        assert metrics_port.read_text() == scraped_on
    finally:
        if channel is not None:
            await channel.close()
        stop_up(Mesh(data_dir, "", process))


async def _not(check) -> bool:
    return not await check


async def test_a_service_lost_during_the_start_is_restarted(tmp_path):
    """`up` checks its services one by one; one lost after it was found ready, while the
    others are still checked, is restarted, and the start completes."""
    data_dir = tmp_path / "data"
    up_log = data_dir.parent / "up.log"
    process = start(data_dir, "--timeout=60")
    channel = None
    try:
        await until(lambda: "ready  compute-cnn-1-0 " in up_log.read_text(), seconds=120,
                    what="compute-cnn-1-0 found ready")
        os.kill(pid_of(data_dir, "compute-cnn-1-0"), signal.SIGKILL)
        # slow/1 takes seconds to load: the start is still checking the others.
        assert "meshserve is ready" not in up_log.read_text()

        def start_done() -> bool:
            assert process.poll() is None, f"meshserve up exited:\n{up_log.read_text()}"
            return (data_dir / "run" / "endpoint").exists()

        await until(start_done, seconds=120, what="the end of up's start")
        assert "compute-cnn-1-0 exited with -9; restarting" in up_log.read_text()
        channel, stub = await ingress_stub(data_dir, process)
        reply = await stub.ModelInfer(request_for("cnn", "1"), timeout=30)
        assert reply.model_version == "1"
        assert len(reply.raw_output_contents[0]) == 10 * 4
    finally:
        if channel is not None:
            await channel.close()
        stop_up(Mesh(data_dir, "", process))


async def test_with_readiness_any_the_server_is_ready_before_a_slow_version(tmp_path):
    data_dir = tmp_path / "data"
    timeline = Timeline(time.monotonic())
    process = start(data_dir, "--readiness=any", warmup_batches=3000)  # minutes of loading
    channel = None
    try:
        channel, stub = await ingress_stub(data_dir, process)
        ready = await watch_until_ready(stub, timeline)
        # Ready as soon as one version can answer, while slow/1 still loads: that version
        # answers, slow's requests are refused at once.
        assert not await model_ready(stub, "slow", "1")
        model, version = next(key for key, up in ready.items() if up)
        answer_ = await stub.ModelInfer(request_for(model, version), timeout=30)
        assert answer_.model_version == version
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request_for("slow", ""), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if channel is not None:
            await channel.close()
        stop_up(Mesh(data_dir, "", process))
