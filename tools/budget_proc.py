"""The processes of a budget run: reading /proc, `meshserve up`, the bare server, py-spy.

`meshserve.tools.budget_run` drives them; the parsing of what /proc holds is in
`meshserve.tools.budget`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from meshserve.common import grpc_engine
from meshserve.tools.budget import (
    PROCESS_KINDS,
    ProcStat,
    Sample,
    ServiceProcess,
    model_cpu_seconds,
    parse_rss_mib,
    parse_stat,
    service_of,
)

PROC = Path("/proc")
SAMPLE_S = 0.1
# py-spy samples per second: six native profilers at 100/s fell seconds behind on 2 cores.
PROFILE_RATE = 20
_STOP_TIMEOUT_S = 30.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:  # the process is gone, or the file was never there
        return None


def cpu_ticks(pid: int, root: Path = PROC) -> int | None:
    text = _read(root / str(pid) / "stat")
    return None if text is None else parse_stat(text).cpu_ticks


def rss_mib(pid: int, root: Path = PROC) -> float | None:
    text = _read(root / str(pid) / "status")
    return None if text is None else parse_rss_mib(text)


def idle_cores(root: Path = Path("/sys")) -> str | None:
    """How this machine's idle cores sleep, where Linux says: cpuidle's driver and, in a
    virtual machine's guest, how long a core polls before it halts. A core that halts at once
    makes each process woken after a pause cost more (README, "Why concurrency 1 stays over
    its budget"), so the figures of two machines differ with it."""
    driver = _read(root / "devices/system/cpu/cpuidle/current_driver")
    if not driver:
        return None
    note = f"idle cores: cpuidle driver {driver.strip()}"
    polling = _read(root / "module/haltpoll/parameters/guest_halt_poll_ns")
    return note if polling is None else f"{note}, halt polling {polling.strip()} ns"


def process_stats(root: Path = PROC) -> dict[int, ProcStat]:
    """The stat line of every process alive now, by pid."""
    stats = {}
    for entry in root.iterdir():
        text = _read(entry / "stat") if entry.name.isdigit() else None
        if text is not None:
            stat = parse_stat(text)
            stats[stat.pid] = stat
    return stats


def tree_cpu_ticks(roots: Iterable[int], root: Path = PROC) -> int:
    """CPU ticks (user and system) of the processes `roots` and every descendant alive now: a
    server's whole tree (Triton's Python-backend stubs are its children)."""
    stats = process_stats(root)
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    ticks, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        ticks += stats[pid].cpu_ticks
        todo += children.get(pid, [])
    return ticks


def mesh_processes(up_pid: int, root: Path = PROC) -> list[ServiceProcess]:
    """`up` itself and every service it started: its children, named by their command line."""
    found = [ServiceProcess(up_pid, "up", "up")]
    for stat in sorted(process_stats(root).values(), key=lambda s: str(s.pid)):
        if stat.ppid != up_pid:
            continue
        argv = (_read(root / str(stat.pid) / "cmdline") or "").split("\0")
        process = service_of(stat.pid, [a for a in argv if a])
        if process is not None:
            found.append(process)
    return found


def compute_reading(processes: Iterable[ServiceProcess], run_dir: Path,
                    clock_ticks: int) -> tuple[float, float]:
    """(The CPU the computes' models took, the computes' CPU), in seconds, read now from
    each compute's metrics endpoint and /proc."""
    model = spent = 0.0
    for process in processes:
        if process.kind != "compute":
            continue
        port = _read(run_dir / f"{process.name}.metrics-port")
        if port:
            with urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/metrics",
                                        timeout=5) as answer:
                model += model_cpu_seconds(answer.read().decode())
        spent += (cpu_ticks(process.pid) or 0) / clock_ticks
    return model, spent


class Sampler:
    """Reads the CPU ticks and RSS of `pids` every `interval` seconds, in a thread, from
    entering until leaving (one reading at each end)."""

    def __init__(self, pids: Iterable[int], root: Path = PROC, interval: float = SAMPLE_S):
        self._pids = tuple(pids)
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="budget-sampler", daemon=True)
        self.samples: list[Sample] = []
        self.rss_max: dict[int, float] = {}

    def _read(self) -> None:
        at = time.time()
        ticks = {}
        for pid in self._pids:
            value = cpu_ticks(pid, self._root)
            if value is not None:
                ticks[pid] = value
            rss = rss_mib(pid, self._root)
            if rss is not None:
                self.rss_max[pid] = max(rss, self.rss_max.get(pid, 0.0))
        self.samples.append(Sample(at, ticks))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._read()

    def __enter__(self) -> Sampler:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


# ---------------------------------------------------------------------------------------------
# Processes: `up` and the bare server


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL when it outlives `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def port_file(run_dir: Path, name: str) -> Path:
    """The port file of `up`'s service `name`, or of its first replica (`name-0`) where `up`
    runs several (a model's instances)."""
    single = run_dir / f"{name}.port"
    return single if single.exists() else run_dir / f"{name}-0.port"


class MeshUp:
    """`meshserve up` in a subprocess with its own data directory, until `stop()`."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshserve.tools.cli", "up", f"--data-dir={data_dir}",
                 "--port=0", "--device=cpu"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.endpoint = ""
        self.processes: list[ServiceProcess] = []

    def wait_ready(self, timeout: float) -> None:
        endpoint = self.data_dir / "run" / "endpoint"
        deadline = time.monotonic() + timeout
        # `up` writes the file once every service is ready; read until it holds the address.
        while not (address := (_read(endpoint) or "").strip()):
            if self.process.poll() is not None:
                raise RuntimeError(f"meshserve up exited with {self.process.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"meshserve up was not ready after {timeout:.0f} s; "
                                   f"see {self.log}")
            time.sleep(0.2)
        self.endpoint = address
        self.processes = mesh_processes(self.process.pid)
        kinds = {p.kind for p in self.processes}
        missing = [k for k in PROCESS_KINDS if k not in kinds]
        if missing:
            raise RuntimeError(f"no {', '.join(missing)} process among up's children")

    def check_unchanged(self) -> None:
        """Fails when a service was restarted (a new pid would escape the readings)."""
        now = {(p.name, p.pid) for p in mesh_processes(self.process.pid)}
        before = {(p.name, p.pid) for p in self.processes}
        if now != before:
            raise RuntimeError(f"the mesh's processes changed during the run: "
                               f"{sorted(before ^ now)}; see {self.data_dir / 'run'}")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{int(port_file(self.data_dir / 'run', name).read_text())}"

    def stop(self) -> None:
        """SIGTERM `up` (it stops its services); kill what is left after a while."""
        stop_process(self.process, _STOP_TIMEOUT_S)
        for child in self.processes[1:]:  # only a process that still names our data dir
            cmdline = _read(PROC / str(child.pid) / "cmdline") or ""
            if str(self.data_dir) in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)


def start_server(argv: list[str], port_file: Path, log: Path,
                 what: str) -> tuple[subprocess.Popen, int]:
    """`python argv...` in a session of its own, on the services' gRPC engine, once it has
    written its port to `port_file` (at most 30 s); its output goes to `log`."""
    port_file.unlink(missing_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *argv], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True,
                                   env=grpc_engine.use(dict(os.environ)))
    deadline = time.monotonic() + 30
    while not port_file.exists():  # written whole, by a rename
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, 10.0)
            raise RuntimeError(f"{what} did not start:\n"
                               + log.read_text(errors="replace")[-2000:])
        time.sleep(0.05)
    return process, int(port_file.read_text())


class BareServer:
    """The bare server of `meshserve.tools.budget_bare` in a subprocess."""

    def __init__(self, tls_dir: Path, work_dir: Path) -> None:
        self.log = work_dir / "bare.log"
        port_file = work_dir / "bare.port"
        self.process, port = start_server(
            ["-m", "meshserve.tools.budget_bare", f"--tls-dir={tls_dir}",
             f"--port-file={port_file}"], port_file, self.log, "the bare server")
        self.address = f"127.0.0.1:{port}"
        self.process_info = ServiceProcess(self.process.pid, "bare", "bare")

    def stop(self) -> None:
        stop_process(self.process, 10.0)


# ---------------------------------------------------------------------------------------------
# Profiles


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def native_allowed(executable: str, pid: int) -> str:
    """"" when py-spy may read native frames of `pid` here, else why not."""
    done = subprocess.run([executable, "dump", "--native", "--pid", str(pid)],
                          capture_output=True, text=True, timeout=60)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()[-300:]


def record_profiles(processes: list[ServiceProcess], out_dir: Path, seconds: float,
                    load: Callable[[], dict]) -> list[str]:
    """py-spy flame graphs (SVG) of `processes` while `load()` runs: with native frames
    (``--native``) when py-spy may read them here, else Python frames only, said in the
    returned notes."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install -e '.[profile]'")
    out_dir.mkdir(parents=True, exist_ok=True)
    refused = native_allowed(executable, processes[0].pid)
    notes = [f"py-spy --native is not permitted here ({refused}); profiles have Python "
             f"frames only"] if refused else []
    recorders = []
    for process in processes:
        command = [executable, "record", "--pid", str(process.pid), "--duration",
                   str(round(seconds)), "--rate", str(PROFILE_RATE), "--format", "flamegraph",
                   "--output", str(out_dir / f"{process.name}.svg")]
        log = out_dir / f"{process.name}.log"
        with open(log, "wb") as out:
            recorders.append((process, log, subprocess.Popen(
                command + ([] if refused else ["--native"]), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
    try:
        load()
    finally:
        for process, log, recorder in recorders:
            try:
                recorder.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
            if recorder.returncode != 0:
                notes.append(f"py-spy failed for {process.name}: "
                             f"{log.read_text(errors='replace').strip()[-200:]}")
    return notes
