"""A whole mesh started the way a user starts it: `meshserve up` in a subprocess."""

import contextlib
import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshserve.tools.certs import init_certs
from tests.integration.edge_servers import Edge
from tests.integration.flaky_model import write_flaky_model

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mesh:
    data_dir: Path
    endpoint: str
    process: subprocess.Popen

    @property
    def tls(self) -> Path:
        return self.data_dir / "tls"

    def internal_ports(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in (self.data_dir / "run").glob("*.port")
                if p.stem != "ingress"}


def meshserve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.tools.cli", *args],
                          capture_output=True, text=True, timeout=120, **kwargs)


def children_of(data_dir: Path) -> list[int]:
    """Processes whose command line names the data directory (every service `up` starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(data_dir).encode() in cmdline and b"meshserve" in cmdline:
            found.append(int(entry.name))
    return found


def start_up(data_dir: Path, timeout: float = 180.0, extra_args: tuple[str, ...] = (),
             extra_env: dict[str, str] | None = None) -> Mesh:
    """`meshserve up` on any free port; `extra_args` and `extra_env` go to it as given."""
    (data_dir / "run" / "endpoint").unlink(missing_ok=True)  # an earlier run's is stale
    log = open(data_dir.parent / f"{data_dir.name}-up.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "meshserve.tools.cli", "up", f"--data-dir={data_dir}",
         "--port=0", "--device=cpu", *extra_args], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    endpoint_file = data_dir / "run" / "endpoint"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if endpoint_file.exists():
            return Mesh(data_dir, endpoint_file.read_text().strip(), process)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    stop_up(Mesh(data_dir, "", process))
    raise RuntimeError("meshserve up did not become ready:\n" +
                       Path(log.name).read_text(errors="replace")[-4000:])


def stop_up(mesh: Mesh) -> int:
    """SIGTERM `up`; kill anything left behind so a failing test leaks no process."""
    if mesh.process.poll() is None:
        mesh.process.send_signal(signal.SIGTERM)
        try:
            mesh.process.wait(30)
        except subprocess.TimeoutExpired:
            mesh.process.kill()
            mesh.process.wait()
    leftovers = children_of(mesh.data_dir)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(leftovers)


@contextlib.contextmanager
def running_mesh(data_dir: Path, **options) -> Iterator[Mesh]:
    """`start_up(data_dir, **options)`, stopped (every process) however the block ends."""
    started = start_up(data_dir, **options)
    try:
        yield started
    finally:
        stop_up(started)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory) -> Mesh:
    """`meshserve up` with the demo models and `flaky` (version 2 deliberately faulty)."""
    data_dir = tmp_path_factory.mktemp("mesh") / "data"
    write_flaky_model(data_dir / "models")
    with running_mesh(data_dir) as started:
        yield started


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> Path:
    """A fresh development CA and every identity's certificate, for one test module."""
    directory = tmp_path_factory.mktemp("mesh-ca")
    init_certs(directory)
    return directory


@pytest.fixture(params=["grpc.aio", "http2"])
async def edge(request, cert_dir):
    """Servers of each kind in turn ("grpc.aio", then "http2"), and channels to them."""
    harness = Edge(request.param, cert_dir)
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
async def own(cert_dir):
    """Servers of the services' own kind ("http2") only, and channels to them."""
    harness = Edge("http2", cert_dir)
    try:
        yield harness
    finally:
        await harness.close()


@contextlib.contextmanager
def https_to(mesh, certificate: bool = True):
    """A connection to the ingress's HTTP/REST port, with the client certificate (without
    one: for callers with a token)."""
    context = ssl.create_default_context(cafile=str(mesh.tls / "ca.crt"))
    if certificate:
        context.load_cert_chain(mesh.tls / "client.crt", mesh.tls / "client.key")
    port = int((mesh.data_dir / "run" / "ingress.http-port").read_text())
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        yield connection
    finally:
        connection.close()
