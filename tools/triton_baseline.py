"""NVIDIA Triton as a side-by-side baseline for `meshserve bench compare`.

`install(root)` makes a cache virtual environment (default ``~/.cache/meshserve/triton``) with
``torch==2.13.0`` and ``nvidia-pytriton``, whose wheel ships a real ``tritonserver`` binary
and its Python backend. Torch is installed first and then pinned with a constraints file while
nvidia-pytriton installs, so pip never swaps it for another build. Nothing is installed until
a comparison asks for it; the environment is reused afterwards.

`meshserve.tools.triton_repository` writes the Triton mirror of meshserve's models that it
serves.

`TritonServer` starts ``tritonserver`` on free loopback ports with ``PATH`` and
``LD_LIBRARY_PATH`` pointing at the cache environment's interpreter (the Python backend stub
embeds the ``libpython`` it finds first; without this it loads the system one, which has no
torch), waits until the server and its models answer ready over plaintext gRPC, and stops it
(its whole process group: the backend stubs too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshserve.protocol import grpc_service_pb2 as pb

HOST = "127.0.0.1"
DEFAULT_ROOT = Path.home() / ".cache" / "meshserve" / "triton"
TORCH_REQUIREMENT = "torch==2.13.0"
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
_MARKER = "meshserve-triton.json"
_PIP_TIMEOUT_S = 900
_STOP_GRACE_S = 10.0


# ---------------------------------------------------------------------------------------------
# Installation


@dataclass(frozen=True)
class TritonInstall:
    """A cache environment with torch and nvidia-pytriton."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def _site_packages(self) -> Path:
        matches = sorted((self.venv / "lib").glob("python3.*/site-packages"))
        if not matches:
            raise RuntimeError(f"no site-packages under {self.venv}")
        return matches[0]

    @property
    def tritonserver_dir(self) -> Path:
        return self._site_packages() / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.tritonserver_dir / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        """The shared libraries the wheel bundles for tritonserver."""
        return self._site_packages() / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        return self.tritonserver_dir / "backends"

    def python_version(self) -> str:
        """"3.11" for the cache environment's interpreter."""
        return self._site_packages().parent.name.removeprefix("python")

    def stub(self) -> Path:
        """The Python backend stub built for the cache environment's Python version."""
        return (
            self.tritonserver_dir
            / "python_backend_stubs"
            / self.python_version()
            / "triton_python_backend_stub"
        )

    def libdir(self) -> str:
        """Directory of the cache interpreter's libpython (its LIBDIR)."""
        out = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def complete(self) -> bool:
        return all(path.is_file() for path in (self.root / _MARKER, self.tritonserver, self.stub()))


def pip_install(python: Path, args: list[str], say: Callable[[str], None]) -> None:
    """``python -m pip install ARGS``; RuntimeError with the end of pip's output on failure."""
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    say("  $ " + " ".join(command[2:]))
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"pip install {' '.join(args)} failed ({result.returncode}):\n{tail}")


def install(root: Path | None = None, say: Callable[[str], None] = print) -> TritonInstall:
    """The Triton cache environment at `root`, created on first use (idempotent)."""
    found = TritonInstall(Path(root or DEFAULT_ROOT).expanduser().resolve())
    with contextlib.suppress(RuntimeError):
        if found.complete():
            return found
    started = time.monotonic()
    say(f"installing Triton (nvidia-pytriton) into {found.venv}")
    found.root.mkdir(parents=True, exist_ok=True)
    if not found.python.is_file():
        subprocess.run(
            [sys.executable, "-m", "venv", str(found.venv)],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    pip_install(found.python, [TORCH_REQUIREMENT], say)
    constraints = found.root / "constraints.txt"
    constraints.write_text(TORCH_REQUIREMENT + "\n", "utf-8")
    pip_install(found.python, ["-c", str(constraints), PYTRITON_REQUIREMENT], say)
    check = subprocess.run(
        [str(found.python), "-c", "import torch, numpy; print(torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check.returncode != 0 or not check.stdout.startswith(TORCH_REQUIREMENT.split("==")[1]):
        raise RuntimeError(f"torch in {found.venv} is not usable: {check.stdout}{check.stderr}")
    for needed in (found.tritonserver, found.stub(), found.backends / "python"):
        if not needed.exists():
            raise RuntimeError(f"nvidia-pytriton installed, but {needed} is missing")
    (found.root / _MARKER).write_text(
        json.dumps({"torch": check.stdout.strip(), "pytriton": PYTRITON_REQUIREMENT}) + "\n",
        "utf-8",
    )
    say(f"installed Triton in {time.monotonic() - started:.0f} s")
    return found


def backend_directory(install_: TritonInstall, destination: Path) -> Path:
    """A backend directory whose ``python/`` holds the backend and the stub for our Python.

    The Python backend looks for ``triton_python_backend_stub`` beside itself; the wheel keeps
    one per Python version elsewhere, so the backend and the matching stub are copied into
    `destination` (the installed package stays untouched).
    """
    python_dir = destination / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (install_.backends / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    shutil.copy2(install_.stub(), python_dir / "triton_python_backend_stub")
    return destination


# ---------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    """A port the OS reports free on the loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_environment(install_: TritonInstall, base: dict[str, str] | None = None) -> dict:
    """Environment for tritonserver: the cache interpreter first on PATH and LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(install_.venv / "bin"), env.get("PATH", "/usr/bin:/bin")])
    libraries = [install_.libdir(), env.get("LD_LIBRARY_PATH", ""), str(install_.libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
    env["VIRTUAL_ENV"] = str(install_.venv)
    return env


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group that `process` leads (started with
    ``start_new_session=True``), SIGKILL after `grace_s`, then SIGKILL to whatever is left in
    the group (children that would otherwise idle forever)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class StartedProcess:
    """A context manager over ``start()`` and ``stop()``: stopped again when start fails."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TritonServer(StartedProcess):
    """A tritonserver process on free loopback ports; use as a context manager."""

    def __init__(
        self,
        install_: TritonInstall,
        repository: Path,
        backends: Path,
        log: Path,
        models: Iterable[str],
        timeout_s: float = 180.0,
    ) -> None:
        self.install = install_
        self.repository = repository
        self.backends = backends
        self.log = log
        self.models = tuple(models)
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.grpc_port = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def command(self) -> list[str]:
        self.grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        return [
            str(self.install.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={HOST}",
            f"--http-port={http_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={metrics_port}",
            "--allow-metrics=false",
            "--log-verbose=0",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=5",
        ]

    def start(self) -> None:
        env = server_environment(self.install)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.repository,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self) -> float:
        """Polls ServerReady and ModelReady (plaintext gRPC); returns the seconds it took."""
        started = time.monotonic()
        channel = grpc.insecure_channel(self.address)
        try:
            server_ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=pb.ServerReadyRequest.SerializeToString,
                response_deserializer=pb.ServerReadyResponse.FromString,
            )
            model_ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelReady",
                request_serializer=pb.ModelReadyRequest.SerializeToString,
                response_deserializer=pb.ModelReadyResponse.FromString,
            )
            while time.monotonic() - started < self.timeout_s:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with {self.process.returncode}; "
                        f"see {self.log}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    if server_ready(pb.ServerReadyRequest(), timeout=1).ready and all(
                        model_ready(pb.ModelReadyRequest(name=name), timeout=1).ready
                        for name in self.models
                    ):
                        return time.monotonic() - started
                time.sleep(0.2)
        finally:
            channel.close()
        raise TimeoutError(
            f"tritonserver not ready after {self.timeout_s:.0f} s; see {self.log}:\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Stops the server and its backend stubs (its whole process group)."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, _STOP_GRACE_S)


__all__ = [
    "DEFAULT_ROOT",
    "StartedProcess",
    "TritonInstall",
    "TritonServer",
    "backend_directory",
    "free_port",
    "install",
    "pip_install",
    "server_environment",
    "stop_process_group",
]
