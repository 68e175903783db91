"""`meshserve up` and the processes it records: a second `up` on a data directory a live one
serves is refused, and a service `up` started stops when `up` dies, SIGKILL included."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshserve.common import runtime
from meshserve.tools import cli
from meshserve.tools.up_record import running_up
from tests.unit.test_drill import record_up, sleeper


def test_a_second_up_on_a_data_directory_a_live_one_serves_is_refused(tmp_path, capsys):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    argv = ["up", "--data-dir", "d"]
    up = sleeper(False, *argv, cwd=tmp_path)
    try:
        assert running_up(data_dir) is None  # nothing recorded
        record_up(data_dir, up, argv, tmp_path)
        assert running_up(data_dir) == up.pid
        assert running_up(tmp_path / "other") is None
        assert cli.main(["up", "--data-dir", str(data_dir), "--port", "0"]) == 1
        assert capsys.readouterr().err == (
            f"error: another `meshserve up` (pid {up.pid}) serves {data_dir}: stop it first "
            f"(Ctrl-C, or kill {up.pid})\n")
        assert not (data_dir / "tls").exists()  # refused before anything was made
    finally:
        up.kill()
        up.wait(10)
    assert running_up(data_dir) is None  # a record of an `up` that has gone


CHILD = """
import asyncio, sys
from meshserve.common import runtime
async def main():
    stopped = asyncio.Event()
    runtime.stop_with_parent(stopped.set)
    print("ready", flush=True)
    await asyncio.wait_for(stopped.wait(), 30)
asyncio.run(main())
"""

PARENT = """
import os, subprocess, sys, time
from meshserve.common import runtime
os.environ[runtime.PARENT_ENV] = str(os.getpid())
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE,
                         start_new_session=True, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_service_stops_when_up_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    try:
        assert Path(f"/proc/{child}").exists()
        parent.kill()  # SIGKILL: nothing of the parent's runs
        parent.wait(10)
        until = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < until:
            time.sleep(0.02)  # gone once it stopped and init reaped it
        assert not Path(f"/proc/{child}").exists()
    finally:
        if Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)


def test_a_process_up_did_not_start_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv(runtime.PARENT_ENV, raising=False)
    stopped = []
    runtime.stop_with_parent(lambda: stopped.append(True))
    assert stopped == []
