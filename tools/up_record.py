"""What `meshserve up` records of itself in DIR/run (`up.json`: its pid, working directory
and arguments; `NAME.pid` for each service), and whether the processes recorded there are
still the ones that wrote it (read from /proc: a copy of a data directory, or an old record
whose pid was reused, names other processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshserve.tools.cli import parser_for

UP_FILE = "up.json"


def running_up(data_dir: Path) -> int | None:
    """The pid of a live `meshserve up`, other than this process, that serves `data_dir` as
    DIR/run/up.json records it; None when there is none."""
    try:
        record = json.loads((data_dir / "run" / UP_FILE).read_text())
        pid, argv = int(record["pid"]), list(record["argv"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not alive(pid) or argv[:1] != ["up"]:
        return None
    return pid if up_data_dir(pid, argv) == data_dir.resolve() else None


def command_line(pid: int) -> list[str]:
    try:
        return os.fsdecode(Path(f"/proc/{pid}/cmdline").read_bytes()).split("\0")[:-1]
    except OSError:
        return []


def up_data_dir(pid: int, argv: list[str]) -> Path | None:
    """The data directory of the `meshserve up` running as `pid` with `argv` (as it recorded
    them), from its command line and working directory; None when `pid` runs something else."""
    if not argv or command_line(pid)[-len(argv):] != argv:
        return None
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        args, _ = parser_for("up").parse_known_args(argv)
    except (OSError, SystemExit):
        return None
    return (cwd / args.data_dir).resolve()


def service_pid(pid_file: Path) -> int | None:
    """The pid in a service's pid file, when that process is alive and is the service `up`
    started with that run directory (its port file beside the pid file)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    port_file = f"--port-file={pid_file.with_suffix('.port')}"
    return pid if alive(pid) and port_file in command_line(pid) else None


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not) and a meshserve process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"meshserve" in cmdline
