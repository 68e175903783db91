"""Tracing works whatever order pip wrote xds-protos and opentelemetry-proto in.

xds-protos ships an old copy of opentelemetry-proto's files under the same paths; installed
after opentelemetry-proto, it leaves its copy on disk. This builds meshserve's wheel, makes a
venv, installs opentelemetry-proto and then xds-protos into it (the order that leaves the old
files), then the wheel, and starts a compute from that venv with
`OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a local OTLP receiver: its `compute.infer` span
arrives. No step runs after pip.

To stay lean, the venv installs only the wheel and the packages that share the
`opentelemetry` folder (those two and the OpenTelemetry API and SDK, small); the rest (torch,
grpcio, numpy, ...) it reads from this environment's site-packages, through a .pth file that
puts them after its own.
"""

import asyncio
import importlib.metadata
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy
import pytest

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.certs import init_certs
from tests.integration.test_cache import request_for, write_model
from tests.otlp_receiver import receiving

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "services", "mesh", "tools")
PIP_TIMEOUT_S = 300
READY_WITHIN_S = 90.0
SPAN_WITHIN_S = 20.0


def run(*command: str | Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          timeout=PIP_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding meshserve's wheel over xds-protos' copy of the OTLP protos."""
    root = tmp_path_factory.mktemp("install-order")
    source = root / "source"  # a copy, so the build leaves the checkout as it was
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copyfile(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", root / "wheels", source)
    [wheel] = (root / "wheels").glob("meshserve-*.whl")

    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    own = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
               .stdout.strip())
    (own / "zz-borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    otel = importlib.metadata.version("opentelemetry-sdk")
    semconv = importlib.metadata.version("opentelemetry-semantic-conventions")
    install = (python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed")
    run(*install, f"opentelemetry-proto=={otel}")
    run(*install, f"xds-protos=={importlib.metadata.version('xds-protos')}")
    run(*install, f"opentelemetry-api=={otel}", f"opentelemetry-sdk=={otel}",
        f"opentelemetry-semantic-conventions=={semconv}")
    run(*install, wheel)
    return venv


def test_the_venv_holds_the_old_protos_and_the_wheel(venv):
    """The situation is the one that broke tracing: opentelemetry-proto's modules on disk are
    xds-protos' old ones, and meshserve is the wheel's, not this checkout."""
    python = venv / "bin" / "python"
    stale = subprocess.run(
        [python, "-c", "from opentelemetry.proto.collector.trace.v1.trace_service_pb2 "
                       "import ExportTracePartialSuccess"],
        capture_output=True, text=True, timeout=60, check=False)
    assert stale.returncode != 0 and "ImportError" in stale.stderr, stale.stderr
    where = run(python, "-c", "import meshserve; print(meshserve.__file__)").stdout
    assert where.startswith(str(venv)), where


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


async def test_a_span_reaches_the_collector(venv, tmp_path):
    init_certs(tmp_path / "tls")
    write_model(tmp_path / "models")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tls = [f"--tls-cert={tmp_path / 'tls' / 'compute.crt'}",
           f"--tls-key={tmp_path / 'tls' / 'compute.key'}",
           f"--tls-ca={tmp_path / 'tls' / 'ca.crt'}"]
    with receiving() as (receiver, otlp_port), open(run_dir / "compute.log", "wb") as log:
        environment = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                       "OTEL_BSP_SCHEDULE_DELAY": "100"}
        compute = subprocess.Popen(
            [venv / "bin" / "meshserve", "compute", f"--model-repository={tmp_path / 'models'}",
             "--model=cached", "--version=1", "--device=cpu", "--listen=127.0.0.1:0",
             f"--port-file={run_dir / 'port'}", "--health-listen=127.0.0.1:0",
             f"--health-port-file={run_dir / 'health-port'}", *tls],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment)
        try:
            deadline = time.monotonic() + READY_WITHIN_S
            while not ((run_dir / "port").exists() and (run_dir / "health-port").exists()
                       and get(f"http://127.0.0.1:{(run_dir / 'health-port').read_text().strip()}"
                               "/readyz") == 200):
                assert compute.poll() is None, (run_dir / "compute.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "compute never became ready"
                await asyncio.sleep(0.1)

            trace_id = secrets.token_bytes(16)
            traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
            x = numpy.ones((2, 16), numpy.float32)
            caller = TlsFiles.for_identity(tmp_path / "tls", "batcher")
            port = (run_dir / "port").read_text().strip()
            async with secure_channel(f"127.0.0.1:{port}", caller, "compute") as channel:
                reply = await GRPCInferenceServiceStub(channel).ModelInfer(
                    request_for(x), timeout=30, metadata=(("traceparent", traceparent),))
            assert reply.model_version == "1"

            deadline = time.monotonic() + SPAN_WITHIN_S
            while not receiver.of_trace(trace_id):
                assert time.monotonic() < deadline, (
                    "no span arrived; compute log:\n"
                    + (run_dir / "compute.log").read_text()[-3000:])
                await asyncio.sleep(0.1)
            [(service, span)] = receiver.of_trace(trace_id)
            assert (service, span.name) == ("compute", "compute.infer")
        finally:
            compute.send_signal(signal.SIGTERM)
            try:
                compute.wait(15)
            except subprocess.TimeoutExpired:
                compute.kill()
                compute.wait()
