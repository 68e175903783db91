"""The charts' probes, proven against running services.

For the control plane and the four service charts, `helm template` gives a Deployment; its
container's command and args run here as a local process, and the kubelet's probes it declares
(httpGet: a path on a named port) are sent as the kubelet would, with only what a pod has and
this machine has not remapped:

- ports: `--listen=0.0.0.0:<port>` → a free loopback port, and likewise `--metrics-listen` and
  `--health-listen`; a probe's named port → the container port of that name, which must be the
  one `--health-listen` binds; the ingress's `--http-listen` → any free loopback port;
- paths under a volume mount → a directory of this test: the TLS Secret's mount holds
  `tls.crt`, `tls.key` and `ca.crt` of the service's identity from a test CA
  (`meshserve.tools.certs.init_certs`), the model repository's is the demo repository, the
  control plane's data volume and /tmp are empty directories;
- upstreams (`--compute`, `--control-plane`, `--router`) → the loopback address of the process
  started for that service (in dependency order: control plane, compute, batcher, router,
  ingress);
- `meshserve` → this environment's console script.

The control plane is rendered with `endpointSlices.watch=false`: there is no Kubernetes API
here (in a cluster, its EndpointSlice watch registers batchers; readiness needs none).

Then: every startup and readiness probe answers 200 (bounded), liveness 200, each serves
Prometheus text on `/metrics` of its metrics port; once its compute is gone a batcher's
readiness answers 503 while its liveness stays 200; a stopped process (SIGSTOP) fails its
liveness probe within the probe's timeout and passes again on SIGCONT; every liveness probe
fails once its process has exited on SIGTERM. (A wedged event loop in a live process answers
503: tests/unit/test_probes.py.)
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshserve.tools import health
from meshserve.tools.certs import init_certs
from meshserve.tools.demo_repository import write_demo_repository
from tests.charts.chartlib import container, flag_values, public_ports
from tests.polling import suspend

# Start order: each one's upstreams first.
ORDER = ["control-plane", "compute", "batcher", "router", "ingress"]
RENDER_EXTRA = {"control-plane": ("--set", "endpointSlices.watch=false")}
# Flags that name another service's HOST:PORT, and which service that is.
UPSTREAM_FLAGS = {"--compute": "compute", "--control-plane": "control-plane",
                  "--router": "router"}
# Flags that bind a port of this service, and the local port each gets.
LISTEN_FLAGS = ("--listen", "--metrics-listen", "--health-listen")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PATHS = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
READY_WITHIN_S = 90.0
STOP_WITHIN_S = 15.0
CONSOLE_SCRIPT = Path(sys.executable).with_name("meshserve")
# What a failed probe reads as: no answer (refused, timed out) is the kubelet's failure too.
NO_ANSWER = 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Local:
    """One chart's container, run here."""

    service: str
    spec: dict  # the rendered container
    ports: dict[str, int]  # listen flag → local port
    mounts: dict[str, Path]  # mountPath in the pod → directory here
    addresses: dict[str, str]  # service → its loopback HOST:PORT
    log: Path
    process: subprocess.Popen | None = None
    tried: dict[str, int] = field(default_factory=dict)

    def container_port(self, name: str) -> int:
        [port] = [p["containerPort"] for p in self.spec["ports"] if p["name"] == name]
        return port

    @property
    def metrics_port(self) -> int:
        return self.ports["--metrics-listen"]

    def remap(self, token: str) -> str:
        """One word of a command line, as it must read on this machine."""
        if token == "meshserve":
            return str(CONSOLE_SCRIPT)
        flag, equals, value = token.partition("=")
        if equals and flag in LISTEN_FLAGS:
            return f"{flag}=127.0.0.1:{self.ports[flag]}"
        if equals and flag == "--http-listen":  # the ingress's HTTP/REST: any free port
            return "--http-listen=127.0.0.1:0"
        if equals and flag in UPSTREAM_FLAGS:
            return f"{flag}={self.addresses[UPSTREAM_FLAGS[flag]]}"
        prefix, text = (f"{flag}=", value) if equals and flag.startswith("--") else ("", token)
        for mount, local in self.mounts.items():
            if text == mount or text.startswith(mount.rstrip("/") + "/"):
                return prefix + str(local) + text[len(mount.rstrip("/")):]
        return token

    def command(self) -> list[str]:
        return [self.remap(word) for word in [*self.spec["command"], *self.spec["args"]]]

    def probe_url(self, probe: str) -> str:
        """The probe's httpGet, aimed where the kubelet's would land: its named port is the
        container port `--health-listen` binds, here remapped."""
        get = self.spec[probe]["httpGet"]
        [listen] = flag_values(self.spec["args"], "--health-listen")
        assert int(listen.rsplit(":", 1)[1]) == self.container_port(get["port"]), probe
        return f"http://127.0.0.1:{self.ports['--health-listen']}{get['path']}"

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

    def probe(self, probe: str) -> tuple[int, str]:
        """(HTTP status, body) of one probe within its timeoutSeconds; (NO_ANSWER, why) when
        nothing answered."""
        self.tried[probe] = self.tried.get(probe, 0) + 1
        timeout = self.spec[probe]["timeoutSeconds"]
        try:
            with urllib.request.urlopen(self.probe_url(probe), timeout=timeout) as reply:
                return reply.status, reply.read().decode().strip()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode().strip()
        except OSError as error:  # refused, reset, timed out
            return NO_ANSWER, str(error)

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL past STOP_WITHIN_S); the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGCONT)
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
    ports = {service: {flag: free_port() for flag in LISTEN_FLAGS} for service in ORDER}
    addresses = {service: f"127.0.0.1:{ports[service]['--listen']}" for service in ORDER}
    locals_: dict[str, Local] = {}
    for service in ORDER:
        spec = container(helm.render(service, (service,), RENDER_EXTRA.get(service, ())))
        home = root / service
        mounts: dict[str, Path] = {}
        for mount in spec["volumeMounts"]:
            name, path = mount["name"], mount["mountPath"]
            if name == "tls":  # the chart's identity is its service's name
                local = home / "tls"
                local.mkdir(parents=True)
                for source, target in [(f"{service}.crt", "tls.crt"),
                                       (f"{service}.key", "tls.key"), ("ca.crt", "ca.crt")]:
                    shutil.copyfile(certs / source, local / target)
            elif name == "models":
                local = demo_repository
            else:  # data, tmp: empty directories
                local = home / name
                local.mkdir(parents=True)
            mounts[path] = local
        locals_[service] = Local(service, spec, ports[service], mounts, addresses,
                                 log=root / f"{service}.log")
    try:
        for service in ORDER:
            start_listening(locals_[service], addresses)
        yield locals_
    finally:
        for service in reversed(ORDER):
            locals_[service].stop()


def listening(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(1.0)
        return client.connect_ex(("127.0.0.1", port)) == 0


def start_listening(local: Local, addresses: dict[str, str], tries: int = 3) -> None:
    """Start `local` and wait until its gRPC port listens (or it exits: the test then says
    why). A port that another process took between free_port() and the service's bind is
    not the chart's fault: the service starts again on fresh ports, which the services
    started after it are given."""
    for _ in range(tries):
        local.start()
        deadline = time.monotonic() + READY_WITHIN_S
        while local.process.poll() is None and time.monotonic() < deadline:
            if listening(local.ports["--listen"]):
                return
            time.sleep(0.1)
        if local.process.poll() is None or "Address already in use" not in local.log_tail():
            return
        local.ports = {flag: free_port() for flag in LISTEN_FLAGS}
        addresses[local.service] = f"127.0.0.1:{local.ports['--listen']}"


def wait_for(local: Local, probe: str, status: int, deadline: float) -> tuple[int, str]:
    """Send the probe until it answers `status` or the deadline passes; the last answer."""
    while True:
        if local.process.poll() is not None:
            pytest.fail(f"{local.service} exited with {local.process.returncode}:\n"
                        f"{local.log_tail()}")
        answer = local.probe(probe)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.25)


def test_probes_answer_as_the_kubelet_expects(mesh):
    started = time.monotonic()
    deadline = started + READY_WITHIN_S
    # Startup, then readiness, of each, upstreams first (readiness waits for upstreams).
    for service in ORDER:
        local = mesh[service]
        for probe in PROBES:
            answer = wait_for(local, probe, 200, deadline)
            assert answer[0] == 200, (
                f"{service} {probe} still failing after {time.monotonic() - started:.0f} s "
                f"({local.tried[probe]} tries): {answer}\nlog:\n{local.log_tail()}")
            assert answer[1] == ("ok" if probe == "livenessProbe" else "SERVING")

    # The metrics port the chart renders (--metrics-listen, remapped) serves Prometheus text.
    for service in ORDER:
        with urllib.request.urlopen(f"http://127.0.0.1:{mesh[service].metrics_port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200, service
            body = response.read().decode()
        assert "# TYPE " in body, (service, body[:500])

    # A stopped process answers nothing: liveness fails within its timeout; SIGCONT, it passes.
    router = mesh["router"]
    suspend(router.process.pid)
    try:
        status, why = router.probe("livenessProbe")
        assert status == NO_ANSWER and "timed out" in why, (status, why)
    finally:
        router.process.send_signal(signal.SIGCONT)
    assert wait_for(router, "livenessProbe", 200, time.monotonic() + 10)[0] == 200

    # Readiness means "can serve now": a batcher whose compute is gone answers 503, and stays
    # live (restarting it would not bring the compute back).
    assert mesh["compute"].stop() == 0
    assert mesh["compute"].probe("livenessProbe")[0] == NO_ANSWER  # refused: it has exited
    batcher = mesh["batcher"]
    answer = wait_for(batcher, "readinessProbe", 503, time.monotonic() + 10)
    assert answer == (503, "NOT_SERVING"), "batcher ready without a compute"
    assert batcher.probe("livenessProbe") == (200, "ok")

    # Every process stops on SIGTERM within its drain; then nothing answers its probes.
    for service in reversed(ORDER):
        local = mesh[service]
        if service != "compute":
            assert local.stop() == 0, f"{service} did not exit cleanly:\n{local.log_tail()}"
        for probe in PROBES:
            assert local.probe(probe)[0] == NO_ANSWER, (service, probe)


def test_every_probe_is_an_http_get_on_the_health_port(helm):
    """The services under test are the five charts; no probe execs anything."""
    for service in ORDER:
        spec = container(helm.render(service, (service,), RENDER_EXTRA.get(service, ())))
        assert spec["command"] == ["meshserve", service]
        for probe in PROBES:
            assert spec[probe]["httpGet"] == {"path": PATHS[probe], "port": "health"}
            assert "exec" not in spec[probe] and "grpc" not in spec[probe]
        for flag in LISTEN_FLAGS:
            assert flag_values(spec["args"], flag), (service, flag)
        assert [p["name"] for p in spec["ports"]] == [*public_ports(service), "metrics", "health"]


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
