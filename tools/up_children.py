"""The service processes `meshserve up` runs: each started with its certificate and its log,
waited on until it has bound its port and answers SERVING (a compute that refused its model
says why; an ingress that is not ready in time, which versions it waits for), and all stopped
in order."""

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import admin_pb2, grpc_service_pb2, health_pb2
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.protocol.health_pb2_grpc import HealthStub
from meshserve.tools.traffic import admin_channel

HOST = "127.0.0.1"


@dataclass
class Child:
    """One service process, its log and the port it bound."""

    name: str
    identity: str
    args: list[str]
    run_dir: Path
    model: str = ""
    version: str = ""
    metrics: bool = True
    process: subprocess.Popen | None = None
    port: int | None = None
    started: float = 0.0  # monotonic time of the last start
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.run_dir / f"{self.name}.log"

    @property
    def port_file(self) -> Path:
        return self.run_dir / f"{self.name}.port"

    @property
    def metrics_port_file(self) -> Path:
        return self.run_dir / f"{self.name}.metrics-port"

    def bound_metrics_port(self) -> int | None:
        """The port this service serves metrics on (None until it has written it)."""
        try:
            return int(self.metrics_port_file.read_text())
        except (OSError, ValueError):
            return None

    def metrics_url(self) -> str:
        """Where this service serves Prometheus metrics ("" until it has written its port)."""
        port = self.bound_metrics_port()
        return "" if port is None else f"http://{HOST}:{port}/metrics"

    def start(self, tls_dir: Path) -> None:
        """Start the service; started again, its metrics stay on the port they had (where
        a scraper was pointed), as its gRPC port does (`supervise`)."""
        self.port_file.unlink(missing_ok=True)
        restart = self.process is not None  # (a file of an earlier `up` names no port of ours)
        metrics_port = (self.bound_metrics_port() if restart else None) or 0
        self.metrics_port_file.unlink(missing_ok=True)
        tls = [f"--tls-cert={tls_dir / self.identity}.crt",
               f"--tls-key={tls_dir / self.identity}.key", f"--tls-ca={tls_dir / 'ca.crt'}"]
        metrics = ([f"--metrics-listen={HOST}:{metrics_port}",
                    f"--metrics-port-file={self.metrics_port_file}"] if self.metrics else [])
        command = [sys.executable, "-m", "meshserve.tools.cli", self.identity, *self.args,
                   *tls, f"--port-file={self.port_file}", *metrics]
        with open(self.log, "ab") as log:
            # A session of its own: the terminal's Ctrl-C reaches `up`, which stops the
            # children in order.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        self.pid_file.write_text(f"{self.process.pid}\n")

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited() is not None:
                raise RuntimeError(f"{self.name} exited with {self.exited()}; see {self.log}")
            if self.port_file.exists():
                self.port = int(self.port_file.read_text())
                return self.port
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} did not bind a port in {timeout:.0f} s; see {self.log}")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class Refused(Exception):
    """A compute that stays up, not serving, because it refused its model; says why."""


async def wait_ready(child: Child, tls: TlsFiles, timeout: float,
                     refusal_tls: TlsFiles | None = None) -> float:
    """Poll grpc.health.v1 until SERVING (for at most `timeout` seconds); returns the seconds
    from the start of the process to then. With `refusal_tls` (a compute's caller's
    certificate), raise Refused as soon as the compute says it refused its model."""
    start = time.monotonic()
    options = [("grpc.ssl_target_name_override", child.identity)]
    async with grpc.aio.secure_channel(child.address, channel_credentials(tls),
                                       options=options) as channel:
        health = HealthStub(channel)
        while time.monotonic() - start < timeout:
            if child.exited() is not None:
                raise RuntimeError(f"{child.name} exited with {child.exited()}; "
                                   f"see {child.log}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - (child.started or start)
            if refusal_tls is not None:
                await raise_if_refused(child, refusal_tls)
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{child.name} not ready after {timeout:.0f} s; see {child.log}")


async def raise_if_refused(compute: Child, tls: TlsFiles) -> None:
    """A compute that refused its model answers FAILED_PRECONDITION with the reason (one
    still loading, UNAVAILABLE)."""
    options = [("grpc.ssl_target_name_override", compute.identity)]
    async with grpc.aio.secure_channel(compute.address, channel_credentials(tls),
                                       options=options) as channel:
        try:
            await GRPCInferenceServiceStub(channel).ModelInfer(grpc_service_pb2.ModelInferRequest(
                model_name=compute.model, model_version=compute.version), timeout=1)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise Refused(error.details()) from None


def not_ready_lines(table: admin_pb2.Readiness, status: admin_pb2.StatusResponse,
                    served: Collection[str]) -> list[str]:
    """Each version of the `served` models the control plane reports not ready (what keeps a
    strict ingress from being ready), with its share of the traffic and why: what its batcher
    said, or that it has none registered (a version the repository does not hold that still
    carries weight)."""
    registered = {(model.policy.model, version.version) for model in status.models
                  for version in model.versions if version.endpoints}
    lines = []
    for state in table.versions:
        if state.ready or state.model not in served:
            continue
        why = state.reason or (
            "none of its batchers answers SERVING" if (state.model, state.version) in registered
            else "no batcher of it is registered (the repository serves no such version; give its "
                 "weight to another with `meshserve traffic set`)")
        lines.append(f"model '{state.model}' version {state.version} ({state.weight} % of its "
                     f"traffic): {why}")
    return lines


def ingress_timeout(ingress: Child, timeout: float, waiting: list[str]) -> str:
    """Why the start failed: the ingress was not ready in time, and what it waits for."""
    what = f": not ready: {'; '.join(waiting)}" if waiting else ""
    return f"{ingress.name} not ready after {timeout:.0f} s{what}; see {ingress.log}"


async def versions_not_ready(control_plane: Child, tls: TlsFiles, served: Collection[str],
                             timeout: float = 10.0) -> list[str]:
    """`not_ready_lines` of the control plane's readiness table now ([] when it cannot say)."""
    async with admin_channel(control_plane.address, tls) as channel:
        admin = AdminStub(channel)
        stream = admin.WatchReadiness(admin_pb2.ReadinessRequest(), timeout=timeout)
        try:
            table = await stream.read()
            status = await admin.Status(admin_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return []
        finally:
            stream.cancel()
    return [] if table is grpc.aio.EOF else not_ready_lines(table, status, served)


def stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM in order (ingress first), then SIGKILL whatever outlives `grace`."""
    for child in children:
        if child.exited() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
