"""The charts' probes, proven against running services.

For the control plane and the four service charts, `helm template` gives a Deployment; its
container's command and args run here as a local process, and the exec probes it declares run
as they are written, with only what a pod has and this machine has not remapped:

- ports: `--listen=0.0.0.0:<port>` → a free loopback port; `localhost:<port>` (the probes) →
  that port; `--metrics-listen=0.0.0.0:<port>` → another free loopback port; the ingress's
  `--http-listen` → any free loopback port;
- paths under a volume mount → a directory of this test: the TLS Secret's mount holds
  `tls.crt`, `tls.key` and `ca.crt` of the service's identity from a test CA
  (`meshserve.tools.certs.init_certs`), the model repository's is the demo repository, the
  control plane's data volume and /tmp are empty directories;
- upstreams (`--compute`, `--control-plane`, `--router`) → the loopback address of the process
  started for that service (in dependency order: control plane, compute, batcher, router,
  ingress);
- `meshserve` → this environment's console script, `python3` → this interpreter.

The control plane is rendered with `endpointSlices.watch=false`: there is no Kubernetes API
here (in a cluster, its EndpointSlice watch registers batchers; readiness needs none).

Then: every startup and readiness probe passes (bounded), liveness passes while the service
runs, each serves Prometheus text on `/metrics` of its metrics port, a batcher's readiness
fails once its compute is gone, and every liveness probe fails (exit 1, not a usage error)
once its process has stopped on SIGTERM.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshserve.tools import health
from meshserve.tools.certs import init_certs
from meshserve.tools.demo_models import write_demo_repository
from tests.charts.chartlib import container, flag_values, public_ports

# Start order: each one's upstreams first.
ORDER = ["control-plane", "compute", "batcher", "router", "ingress"]
RENDER_EXTRA = {"control-plane": ("--set", "endpointSlices.watch=false")}
# Flags that name another service's HOST:PORT, and which service that is.
UPSTREAM_FLAGS = {"--compute": "compute", "--control-plane": "control-plane",
                  "--router": "router"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
READY_WITHIN_S = 90.0
PROBE_PROCESS_LIMIT_S = 20.0
STOP_WITHIN_S = 15.0
CONSOLE_SCRIPT = Path(sys.executable).with_name("meshserve")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Local:
    """One chart's container, run here."""

    service: str
    spec: dict  # the rendered container
    port: int
    metrics_port: int
    mounts: dict[str, Path]  # mountPath in the pod → directory here
    addresses: dict[str, str]  # service → its loopback HOST:PORT
    log: Path
    process: subprocess.Popen | None = None
    tried: dict[str, int] = field(default_factory=dict)

    @property
    def container_port(self) -> int:
        [port] = [p["containerPort"] for p in self.spec["ports"] if p["name"] == "grpc"]
        return port

    def remap(self, token: str) -> str:
        """One word of a command line, as it must read on this machine."""
        if token == "meshserve":
            return str(CONSOLE_SCRIPT)
        if token == "python3":
            return sys.executable
        flag, equals, value = token.partition("=")
        if equals and flag == "--listen":
            return f"--listen=127.0.0.1:{self.port}"
        if equals and flag == "--metrics-listen":
            return f"--metrics-listen=127.0.0.1:{self.metrics_port}"
        if equals and flag == "--http-listen":  # the ingress's HTTP/REST: any free port
            return "--http-listen=127.0.0.1:0"
        if equals and flag in UPSTREAM_FLAGS:
            return f"{flag}={self.addresses[UPSTREAM_FLAGS[flag]]}"
        prefix, text = (f"{flag}=", value) if equals and flag.startswith("--") else ("", token)
        if text == f"localhost:{self.container_port}":
            return f"{prefix}127.0.0.1:{self.port}"
        for mount, local in self.mounts.items():
            if text == mount or text.startswith(mount.rstrip("/") + "/"):
                return prefix + str(local) + text[len(mount.rstrip("/")):]
        return token

    def command(self) -> list[str]:
        return [self.remap(word) for word in [*self.spec["command"], *self.spec["args"]]]

    def probe_command(self, probe: str) -> list[str]:
        return [self.remap(word) for word in self.spec[probe]["exec"]["command"]]

    def environment(self) -> dict[str, str]:
        env = {**os.environ}
        for variable in self.spec.get("env", []):
            env[variable["name"]] = self.remap(variable["value"])
        return env

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(),
                                            start_new_session=True)

    def probe(self, probe: str) -> subprocess.CompletedProcess:
        self.tried[probe] = self.tried.get(probe, 0) + 1
        return subprocess.run(self.probe_command(probe), capture_output=True, text=True,
                              env=self.environment(), timeout=PROBE_PROCESS_LIMIT_S, check=False)

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL past STOP_WITHIN_S); the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_demo_repository(path)
    return path


@pytest.fixture(scope="module")
def mesh(helm, tmp_path_factory, demo_repository):
    """Every chart's container running here, started in dependency order; stopped after."""
    root = tmp_path_factory.mktemp("probes")
    certs = root / "tls"
    init_certs(certs)
    addresses: dict[str, str] = {}
    ports = {service: free_port() for service in ORDER}
    addresses.update({service: f"127.0.0.1:{port}" for service, port in ports.items()})
    locals_: dict[str, Local] = {}
    for service in ORDER:
        objects = helm.render(service, (service,), RENDER_EXTRA.get(service, ()))
        spec = container(objects)
        identity = next(a.split("=", 1)[1] for a in spec["readinessProbe"]["exec"]["command"]
                        if a.startswith("--identity="))
        home = root / service
        mounts: dict[str, Path] = {}
        for mount in spec["volumeMounts"]:
            name, path = mount["name"], mount["mountPath"]
            if name == "tls":
                local = home / "tls"
                local.mkdir(parents=True)
                for source, target in [(f"{identity}.crt", "tls.crt"),
                                       (f"{identity}.key", "tls.key"), ("ca.crt", "ca.crt")]:
                    shutil.copyfile(certs / source, local / target)
            elif name == "models":
                local = demo_repository
            else:  # data, tmp: empty directories
                local = home / name
                local.mkdir(parents=True)
            mounts[path] = local
        locals_[service] = Local(service, spec, ports[service], free_port(), mounts, addresses,
                                 log=root / f"{service}.log")
    try:
        for service in ORDER:
            locals_[service].start()
        yield locals_
    finally:
        for service in reversed(ORDER):
            locals_[service].stop()


def wait_for(local: Local, probe: str, deadline: float) -> subprocess.CompletedProcess:
    """Run the probe until it succeeds or the deadline passes; the last run."""
    while True:
        if local.process.poll() is not None:
            pytest.fail(f"{local.service} exited with {local.process.returncode}:\n"
                        f"{local.log_tail()}")
        done = local.probe(probe)
        if done.returncode == 0 or time.monotonic() > deadline:
            return done
        time.sleep(0.25)


def test_probes_pass_then_liveness_fails_once_stopped(mesh):
    started = time.monotonic()
    deadline = started + READY_WITHIN_S
    # Startup, then readiness, of each, upstreams first (readiness waits for upstreams).
    for service in ORDER:
        local = mesh[service]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            done = wait_for(local, probe, deadline)
            assert done.returncode == 0, (
                f"{service} {probe} still failing after {time.monotonic() - started:.0f} s "
                f"({local.tried[probe]} tries): {done.stdout}{done.stderr}\n"
                f"command: {local.probe_command(probe)}\nlog:\n{local.log_tail()}")
            assert done.stdout.strip() == "SERVING", (service, probe, done.stdout)

    # The metrics port the chart renders (--metrics-listen, remapped) serves Prometheus text.
    for service in ORDER:
        local = mesh[service]
        with urllib.request.urlopen(f"http://127.0.0.1:{local.metrics_port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200, service
            body = response.read().decode()
        assert "# TYPE " in body, (service, body[:500])

    # Readiness means "can serve now": a batcher whose compute is gone is not ready.
    assert mesh["compute"].stop() == 0
    done = mesh["compute"].probe("livenessProbe")
    assert done.returncode == health.EXIT_NOT_SERVING, done.stdout + done.stderr
    assert done.stdout.startswith("UNAVAILABLE"), done.stdout
    batcher = mesh["batcher"]
    until = time.monotonic() + 10
    while (done := batcher.probe("readinessProbe")).returncode == 0 and time.monotonic() < until:
        time.sleep(0.25)
    assert done.returncode == health.EXIT_NOT_SERVING, "batcher ready without a compute"
    assert done.stdout.strip() == "NOT_SERVING", done.stdout

    # Every process stops on SIGTERM within its drain; then its liveness probe fails (exit 1:
    # the command itself is well formed, the server is gone).
    for service in reversed(ORDER):
        local = mesh[service]
        if service != "compute":
            assert local.stop() == 0, f"{service} did not exit cleanly:\n{local.log_tail()}"
        done = local.probe("livenessProbe")
        assert done.returncode == health.EXIT_NOT_SERVING, (service, done.stdout, done.stderr)
        assert done.stdout.startswith("UNAVAILABLE"), (service, done.stdout)


def test_every_container_was_run_with_its_probes(helm):
    """The services under test are the five charts, each with all three probes as exec."""
    for service in ORDER:
        spec = container(helm.render(service, (service,), RENDER_EXTRA.get(service, ())))
        assert spec["command"][0] == "meshserve"
        for probe in PROBES:
            assert "exec" in spec[probe], (service, probe)
            assert spec[probe]["exec"]["command"][:2] == [
                "meshserve", "health"], (service, probe)
        assert flag_values(spec["args"], "--listen")
        assert flag_values(spec["args"], "--metrics-listen")
        assert [p["name"] for p in spec["ports"]] == [*public_ports(service), "metrics"]


# --- meshserve health on its own: exit statuses ------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("health-tls")
    init_certs(path)
    return path


def health_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.tools.health", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def tls_args(certs: Path, identity: str = "router") -> list[str]:
    return [f"--tls-cert={certs / identity}.crt", f"--tls-key={certs / identity}.key",
            f"--tls-ca={certs / 'ca.crt'}"]


@pytest.mark.parametrize(("args", "message"), [
    (["not-an-address"], "HOST:PORT"),
    (["127.0.0.1:0"], "HOST:PORT"),
    (["127.0.0.1:7000", "--timeout=0"], "--timeout"),
], ids=["no-port", "port-0", "timeout-0"])
def test_health_usage_errors_exit_2(certs, args, message):
    done = health_run(*args, *tls_args(certs))
    assert done.returncode == health.EXIT_USAGE
    assert message in done.stderr


def test_health_unreadable_certificate_exits_2(certs, tmp_path):
    done = health_run("127.0.0.1:7000", f"--tls-cert={tmp_path / 'missing.crt'}",
                      f"--tls-key={certs / 'router.key'}", f"--tls-ca={certs / 'ca.crt'}")
    assert done.returncode == health.EXIT_USAGE
    assert "missing.crt" in done.stderr


def test_health_missing_flags_exit_2():
    done = health_run("127.0.0.1:7000")
    assert done.returncode == health.EXIT_USAGE
    assert "--tls-cert" in done.stderr


def test_health_nothing_listening_exits_1(certs):
    done = health_run(f"127.0.0.1:{free_port()}", *tls_args(certs), "--timeout=2")
    assert done.returncode == health.EXIT_NOT_SERVING
    assert done.stdout.startswith("UNAVAILABLE")


def test_health_is_a_meshserve_command(certs):
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", "health", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for flag in ("--tls-cert", "--tls-key", "--tls-ca", "--identity", "--service", "--timeout"):
        assert flag in done.stdout
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", "health",
                           "bad address", *tls_args(certs)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == health.EXIT_USAGE


def test_health_default_identity_is_the_certificates(certs):
    assert health.own_identity(certs / "compute.crt") == "compute"
    with pytest.raises(health.UsageError, match="--identity"):
        health.own_identity(certs / "ca.crt")
