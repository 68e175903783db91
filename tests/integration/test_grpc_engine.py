"""A service started by `meshserve <service>` does its socket work on gRPC's polling thread,
not on EventEngine threads (meshserve.common.grpc_engine), and an operator's own
`GRPC_EXPERIMENTS` is kept. Told apart by the CPU each of the service's threads spent while
it answered health checks over mutual TLS."""

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import health_pb2, health_pb2_grpc
from meshserve.tools.certs import init_certs

CALLS = 2000


def thread_ticks(pid: int) -> Counter:
    """CPU ticks (user and system) by thread name."""
    ticks: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[name] += int(fields[11]) + int(fields[12])
    return ticks


def start_router(tmp_path: Path, environ: dict[str, str]) -> tuple[subprocess.Popen, int]:
    tls = tmp_path / "tls"
    init_certs(tls)
    port_file = tmp_path / "router.port"
    log = open(tmp_path / "router.log", "wb")  # noqa: SIM115 — the child writes it
    process = subprocess.Popen(
        [sys.executable, "-m", "meshserve.tools.cli", "router", "--listen=127.0.0.1:0",
         f"--tls-cert={tls}/router.crt", f"--tls-key={tls}/router.key",
         f"--tls-ca={tls}/ca.crt", f"--port-file={port_file}",
         "--control-plane=127.0.0.1:1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the router did not start:\n"
                        + (tmp_path / "router.log").read_text(errors="replace")[-2000:])
        time.sleep(0.05)
    return process, int(port_file.read_text())


@pytest.mark.parametrize("experiments, on_event_engine", [(None, False), ("", True)],
                         ids=["default", "operator's empty GRPC_EXPERIMENTS"])
def test_where_a_service_does_its_socket_work(tmp_path, experiments, on_event_engine):
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if experiments is not None:
        environ["GRPC_EXPERIMENTS"] = experiments
    process, port = start_router(tmp_path, environ)
    try:
        credentials = channel_credentials(TlsFiles.for_identity(tmp_path / "tls", "client"))
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                 options=[("grpc.ssl_target_name_override", "router")]) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            before = thread_ticks(process.pid)
            for _ in range(CALLS):
                check(health_pb2.HealthCheckRequest(), timeout=10)
            after = thread_ticks(process.pid)
    finally:
        process.kill()
        process.wait(timeout=30)
    spent = after - before
    total = sum(spent.values())
    assert total >= 20, f"too little CPU to tell where it went: {dict(spent)}"
    share = spent["event_engine"] / total
    if on_event_engine:
        assert share >= 0.1, dict(spent)
    else:
        assert share <= 0.03, dict(spent)
