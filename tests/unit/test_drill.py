"""The drill's own logic: finding and killing a mesh's processes (real processes), comparing
what was backed up with what came back, timing the recovery, and its closing summary."""

import json
import subprocess
import sys

import pytest

from meshserve.tools.drill import (
    Observed,
    Plan,
    Report,
    UpProcess,
    alive,
    differences,
    kill_all,
    summary,
)
from meshserve.tools.drill_load import Load

BEFORE = Observed(routes={"mlp": {"model": "mlp", "weights": {"1": 90, "2": 10}}},
                  canaries={}, registry={"mlp/3": "sha256:aa"},
                  model_files={"mlp/1/model.pt": "sha256:01", "mlp/config.pbtxt": "sha256:02"})


def test_differences_name_what_did_not_come_back() -> None:
    assert differences(BEFORE, BEFORE) == []
    after = Observed(routes={"mlp": {"model": "mlp", "weights": {"1": 100}}},
                     canaries={"mlp": {"state": "running"}}, registry={},
                     model_files={**BEFORE.model_files, "mlp/1/model.pt": "sha256:ff"})
    assert differences(BEFORE, after) == [
        "routes mlp: backed up {'model': 'mlp', 'weights': {'1': 90, '2': 10}}, now "
        "{'model': 'mlp', 'weights': {'1': 100}}",
        "canaries mlp: backed up None, now {'state': 'running'}",
        "registry mlp/3: backed up 'sha256:aa', now None",
        "model_files mlp/1/model.pt: backed up 'sha256:01', now 'sha256:ff'"]


def test_recovery_runs_from_the_kill_to_the_first_success_after_it() -> None:
    load = Load(connection=None, request=None, pause_s=Plan().pause_s)
    load.outcomes = [(0.9, 1.0, "OK"), (1.2, 2.0, "UNAVAILABLE"), (3.0, 3.0, "NO_ENDPOINT"),
                     (1.4, 1.6, "OK"),  # sent before the kill, answered after it: the old mesh
                     (4.0, 4.5, "OK"), (4.9, 5.0, "OK")]
    assert load.first_success_after(1.5) == 4.5
    assert load.first_success_after(5.0) is None
    assert load.counts() == {"OK": 4, "UNAVAILABLE": 1, "NO_ENDPOINT": 1}


def test_the_summary_gives_the_figures_and_the_verdict() -> None:
    report = Report(ok=True, recovery_s=31.25, restored_s=0.6, archive="/w/a.tar",
                    archive_bytes=12_697_600, recovery_point="2026-12-02T08:27:21Z, audit entry 10",
                    submissions_before=20, submissions_kept=20, submissions_after=5,
                    submissions_after_lost=5, load={"OK": 150, "UNAVAILABLE": 9}, up_pid=42)
    text = summary(report)
    assert "recovery time (kill -> first successful inference): 31.25 s (state restored " \
           "0.60 s after the kill" in text
    assert "submissions kept: 20 of 20 accepted before the backup; 5 of 5 accepted after it " \
           "lost (past the recovery point)" in text
    assert "archive: 12,697,600 bytes (/w/a.tar)" in text
    assert "load during the drill: OK 150, UNAVAILABLE 9" in text
    assert text.splitlines()[-2:] == ["drill passed", "meshserve up runs again (pid 42); stop "
                                                      "it with kill -TERM 42"]
    failed = summary(Report(problems=["audit chain: entry 3 was altered"]))
    assert "recovery time (kill -> first successful inference): none" in failed
    assert "PROBLEM: audit chain: entry 3 was altered\ndrill FAILED" in failed


def test_a_data_directory_without_a_running_up_is_refused(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no `meshserve up` recorded"):
        UpProcess.find(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "up.json").write_text(json.dumps(
        {"pid": 2 ** 22 + 1, "cwd": "/", "argv": ["up"]}))
    with pytest.raises(SystemExit, match=r"\(pid 4194305\) is not running"):
        UpProcess.find(tmp_path)


def sleeper(new_session: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "meshserve-drill-test"], start_new_session=new_session)


def test_kill_all_kills_up_and_every_service(tmp_path) -> None:
    up, services = sleeper(False), [sleeper(True), sleeper(True)]
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "up.json").write_text(json.dumps({"pid": up.pid, "cwd": "/", "argv": ["up"]}))
        for n, service in enumerate(services):
            (run / f"service-{n}.pid").write_text(f"{service.pid}\n")
        found = UpProcess.find(tmp_path)
        assert (found.pid, sorted(found.services)) == (up.pid, sorted(s.pid for s in services))
        assert kill_all(found) == 3
        assert not any(alive(p.pid) for p in (up, *services))
        assert [p.wait(10) for p in (up, *services)] == [-9, -9, -9]
    finally:
        for process in (up, *services):
            process.kill()
            process.wait(10)
