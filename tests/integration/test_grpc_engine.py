"""gRPC in a meshserve process does its socket work on its polling thread, not on
EventEngine threads (meshserve.common.grpc_engine), and an operator's own `GRPC_EXPERIMENTS`
is kept. The services' channels and the benchmarks' reference servers run gRPC so (their
servers are meshserve's own); told apart here by the CPU each thread of the bare reference
server (`meshserve.tools.budget_bare`, started as the budget starts it) spent while it
answered calls over mutual TLS."""

from collections import Counter
from pathlib import Path

import grpc
import pytest

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.tools.budget_bare import SERVICE
from meshserve.tools.budget_proc import start_server, stop_process
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


@pytest.mark.parametrize("experiments, on_event_engine", [(None, False), ("", True)],
                         ids=["default", "operator's empty GRPC_EXPERIMENTS"])
def test_where_grpc_does_its_socket_work(tmp_path, monkeypatch, experiments,
                                         on_event_engine):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    if experiments is not None:
        monkeypatch.setenv("GRPC_EXPERIMENTS", experiments)
    tls = tmp_path / "tls"
    init_certs(tls)
    process, port = start_server(
        ["-m", "meshserve.tools.budget_bare", f"--tls-dir={tls}", "--identity=router",
         f"--port-file={tmp_path / 'bare.port'}"], tmp_path / "bare.port",
        tmp_path / "bare.log", "the bare server")
    try:
        credentials = channel_credentials(TlsFiles.for_identity(tls, "client"))
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                 options=[("grpc.ssl_target_name_override", "router")]) as ch:
            infer = ch.unary_unary(f"/{SERVICE}/ModelInfer")
            infer(b"", timeout=10)  # connected
            before = thread_ticks(process.pid)
            for _ in range(CALLS):
                infer(b"", timeout=10)
            after = thread_ticks(process.pid)
    finally:
        stop_process(process, 10.0)
    spent = after - before
    total = sum(spent.values())
    assert total >= 20, f"too little CPU to tell where it went: {dict(spent)}"
    share = spent["event_engine"] / total
    if on_event_engine:
        assert share >= 0.1, dict(spent)
    else:
        assert share <= 0.03, dict(spent)
