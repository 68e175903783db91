"""Fault injection into a running `meshserve up`: find a service's process, signal it, and
wait until `up`'s supervisor has brought it back and it reports ready."""

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.common.upstream import Upstream


def identity_of(service: str) -> str:
    """The certificate identity of a service named as `up` names it (`compute-mlp-2-0`)."""
    for identity in ("control-plane", "compute", "batcher"):
        if service.startswith(identity):
            return identity
    return service


def pid_of(data_dir: Path, service: str) -> int | None:
    """The process serving `service`: its command line names its port file."""
    marker = f"--port-file={data_dir / 'run' / service}.port".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in arguments:
            return int(entry.name)
    return None


def services(data_dir: Path) -> list[str]:
    """Every service `up` runs (from the port files it asked them to write)."""
    return sorted(p.stem for p in (data_dir / "run").glob("*.port"))


def send(data_dir: Path, service: str, sig: signal.Signals) -> int:
    pid = pid_of(data_dir, service)
    if pid is None:
        raise LookupError(f"no process serves {service}")
    os.kill(pid, sig)
    return pid


def channel_to(data_dir: Path, service: str, caller: str) -> grpc.aio.Channel:
    """A channel to `service` presenting the certificate of the identity `caller`."""
    address = f"127.0.0.1:{int((data_dir / 'run' / f'{service}.port').read_text())}"
    return secure_channel(address, TlsFiles.for_identity(data_dir / "tls", caller),
                          identity_of(service))


def _inferences(data_dir: Path, service: str) -> float:
    port = int((data_dir / "run" / f"{service}.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "nv_inference_count")


async def inferences(data_dir: Path, service: str) -> float:
    """The requests `service` has answered since it started (its `nv_inference_count`)."""
    return await asyncio.to_thread(_inferences, data_dir, service)


async def ready(data_dir: Path, service: str, timeout: float = 1.0) -> bool:
    port_file = data_dir / "run" / f"{service}.port"
    if not port_file.exists():
        return False
    address = f"127.0.0.1:{int(port_file.read_text())}"
    upstream = Upstream(address, TlsFiles.for_identity(data_dir / "tls", "client"),
                        identity_of(service))
    try:
        return await upstream.check(timeout)
    finally:
        await upstream.close()


async def wait_back(data_dir: Path, service: str, old_pid: int, timeout: float = 60.0) -> float:
    """Seconds until a new process serves `service` and reports ready."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pid = pid_of(data_dir, service)
        if pid not in (None, old_pid) and await ready(data_dir, service):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{service} was not back and ready within {timeout:.0f} s")


async def wait_all_ready(data_dir: Path, timeout: float = 60.0) -> None:
    start = time.monotonic()
    waiting = services(data_dir)
    while waiting and time.monotonic() - start < timeout:
        waiting = [s for s in waiting if not await ready(data_dir, s)]
        if waiting:
            await asyncio.sleep(0.2)
    if waiting:
        raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(waiting)}")
