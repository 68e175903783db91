"""Process wiring every service shares: common flags, uvloop, signals, graceful stop."""

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

from meshserve.common import heap
from meshserve.common.logs import (
    DEFAULT_ACCESS_LOG_MAX_PER_SECOND,
    DEFAULT_ACCESS_LOG_SAMPLE,
    formatter,
    lines_limit,
    sample_fraction,
)
from meshserve.common.metrics import Metrics, MetricsEndpoint, serve_metrics
from meshserve.common.probes import Heartbeat, ProbeEndpoint, serve_probes
from meshserve.common.server import Service
from meshserve.common.tls import TlsFiles

log = logging.getLogger(__name__)

# Set by `meshserve up` for the services it starts: its pid (see `stop_with_parent`).
PARENT_ENV = "MESHSERVE_UP_PID"
_PR_SET_PDEATHSIG = 1


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="address to serve on (port 0 picks a free port)")
    parser.add_argument("--tls-cert", type=Path, required=True,
                        help="this service's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, required=True,
                        help="CA that signs the mesh's certificates (PEM)")
    parser.add_argument("--port-file", type=Path,
                        help="write the bound port here once serving (for supervisors)")
    parser.add_argument("--drain-seconds", type=float, default=5.0,
                        help="on SIGTERM, time given to in-flight calls")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="json: one JSON object per line (default); text: plain lines")
    parser.add_argument("--access-log-sample", type=sample_fraction,
                        default=DEFAULT_ACCESS_LOG_SAMPLE,
                        help="fraction (0..1) of answered requests given an access-log line; "
                             f"failures always get one (default {DEFAULT_ACCESS_LOG_SAMPLE})")
    parser.add_argument("--access-log-max-per-second", type=lines_limit,
                        default=DEFAULT_ACCESS_LOG_MAX_PER_SECOND,
                        help="access-log lines written in any one second, at most; the lines "
                             "left out are counted on the next line written (0: no limit; "
                             f"default {DEFAULT_ACCESS_LOG_MAX_PER_SECOND})")
    parser.add_argument("--metrics-listen", default="",
                        help="serve Prometheus /metrics on HOST:PORT (port 0 picks a free "
                             "port; empty: not served)")
    parser.add_argument("--metrics-port-file", type=Path,
                        help="write the bound metrics port here once serving")
    parser.add_argument("--health-listen", default="",
                        help="answer the kubelet's HTTP probes, /livez and /readyz, on "
                             "HOST:PORT (plain HTTP, health only; port 0 picks a free port; "
                             "empty: not served)")
    parser.add_argument("--health-port-file", type=Path,
                        help="write the bound health port here once serving")


def url_without_password(hint: str) -> Callable[[str], str]:
    """An argparse type for URLs that refuses one holding a password (secrets never travel
    on a command line, where `ps` shows them); `hint` says where the password goes."""

    def checked(text: str) -> str:
        if urlsplit(text).password is not None:
            raise argparse.ArgumentTypeError(f"the URL must not hold a password; {hint}")
        return text

    return checked


def tls_files(args: argparse.Namespace) -> TlsFiles:
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def metrics_for(args: argparse.Namespace) -> Metrics | None:
    """The service's metrics, when it serves them (`--metrics-listen`); else none are
    recorded at all."""
    return Metrics() if args.metrics_listen else None


def metrics_endpoint(args: argparse.Namespace,
                     metrics: Metrics | None) -> MetricsEndpoint | None:
    """The service's registry and where to serve it; records its certificate's expiry."""
    if metrics is None:
        return None
    metrics.certificate_expiry(args.tls_cert)
    return MetricsEndpoint(metrics.registry, args.metrics_listen, args.metrics_port_file)


def configure_logging(service: str, level: str, fmt: str = "json") -> None:
    """Log to stderr at `level`, as JSON lines (`fmt="json"`) or plain text (`"text"`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(service, fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def write_port_file(path: Path | None, port: int) -> None:
    if path is None:
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port}\n")
    os.replace(temporary, path)


def serve(build: Callable[[], Awaitable[Service]], port_file: Path | None,
          drain_seconds: float, metrics: MetricsEndpoint | None = None,
          probes: ProbeEndpoint | None = None) -> int:
    """Run a service on uvloop until SIGTERM or SIGINT, then drain and stop.

    With `metrics.listen` set, `/metrics` is served over HTTP once the service is serving;
    with `probes.listen`, `/livez` and `/readyz` from the moment the service is built (not
    ready until it says so) until it has stopped.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stop_with_parent(stop.set)
        service = await build()
        prober = beating = None
        if probes is not None and probes.listen:
            heartbeat = Heartbeat()
            beating = asyncio.create_task(heartbeat.keep())
            prober = serve_probes(probes.listen, service.health.serving, heartbeat)
            write_port_file(probes.port_file, prober.port)
            log.info("probes on port %d (/livez, /readyz)", prober.port)
        port = await service.start()
        heap.settle()
        write_port_file(port_file, port)
        log.info("serving on port %d", port)
        exporter = None
        if metrics is not None and metrics.listen:
            exporter = serve_metrics(metrics.registry, metrics.listen)
            write_port_file(metrics.port_file, exporter.port)
            log.info("metrics on port %d (/metrics)", exporter.port)
        await stop.wait()
        log.info("stopping: draining for up to %.1f s", drain_seconds)
        await service.stop(drain_seconds)
        if exporter is not None:
            exporter.close()
        if prober is not None:
            beating.cancel()
            prober.close()

    uvloop.run(main())
    return 0


def stop_with_parent(stop: Callable[[], None]) -> None:
    """A service `meshserve up` started stops (as on SIGTERM: drained) when `up` dies,
    however it dies, SIGKILL and the OOM killer included: Linux sends the parent's death as
    SIGTERM. Without it the services went on, unsupervised, and a second `up` on the same data
    directory started beside them. Elsewhere, or not started by `up`: nothing."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # `up` died before the request took hold
        stop()


def run_service(name: str, args: argparse.Namespace, build_service, settings, *,
                traced: bool = True) -> int:
    """A service's main after its flags: metrics (when served), tracing (from `OTEL_*`,
    read once, here), then `build_service(settings, metrics[, tracing])` served until told
    to stop."""
    from meshserve.common.tracing import from_environment

    heap.keep_freed_memory()  # before anything large is allocated
    metrics = metrics_for(args)
    extra = (from_environment(name, os.environ),) if traced else ()

    async def build() -> Service:
        return build_service(settings, metrics, *extra)

    return serve(build, args.port_file, args.drain_seconds, metrics_endpoint(args, metrics),
                 ProbeEndpoint(args.health_listen, args.health_port_file))
