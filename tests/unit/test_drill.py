"""The drill's own logic: finding and killing a mesh's processes (real processes), comparing
what was backed up with what came back, timing the recovery, and its closing summary."""

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from meshserve.tools import cli
from meshserve.tools.drill import (
    Observed,
    Plan,
    Report,
    UpProcess,
    alive,
    copy_differences,
    differences,
    kill_all,
    restored_layout,
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


@pytest.mark.parametrize(("argv", "repository"), [
    (["up"], "/srv/data/models"),
    (["up", "--data-dir=/srv/data"], "/srv/data/models"),
    (["up", "--model-repository", "repo", "--port=0"], "/home/op/repo"),
    (["up", "--model-repository=/models", "--data-dir=/srv/data"], "/models"),
])
def test_the_repository_checked_is_the_one_up_serves(argv, repository) -> None:
    up = UpProcess(pid=1, cwd="/home/op", argv=argv, services=[])
    assert up.repository(Path("/srv/data")) == Path(repository)


def test_a_repository_outside_the_data_directory_is_restored_beside_it(tmp_path) -> None:
    """Inside DIR it is deleted with DIR and restored in place; outside, it survives, so its
    copy in the archive goes to the work directory and the repository is left alone."""
    data, work = tmp_path / "data", tmp_path / "work"
    assert restored_layout(data, data / "models", work).parts["models"] == data / "models"
    assert restored_layout(data, data / "repo", work).parts["models"] == data / "repo"
    outside = restored_layout(data, tmp_path / "repo", work)
    assert outside.parts["models"] == work / "restored-models"
    assert outside.data_dir == data and outside.parts["tls"] == data / "tls"


def test_the_archive_copy_of_the_repository_is_checked_file_by_file(tmp_path) -> None:
    (tmp_path / "mlp" / "1").mkdir(parents=True)
    (tmp_path / "mlp" / "1" / "model.pt").write_bytes(b"weights")
    (tmp_path / "mlp" / "config.pbtxt").write_bytes(b"config")
    digests = {"mlp/1/model.pt": "sha256:" + hashlib.sha256(b"weights").hexdigest(),
               "mlp/config.pbtxt": "sha256:" + hashlib.sha256(b"config").hexdigest()}
    assert copy_differences(replace(BEFORE, model_files=digests), tmp_path) == []
    assert copy_differences(BEFORE, tmp_path) == [
        f"model_files mlp/1/model.pt: backed up 'sha256:01', restored copy "
        f"'{digests['mlp/1/model.pt']}'",
        f"model_files mlp/config.pbtxt: backed up 'sha256:02', restored copy "
        f"'{digests['mlp/config.pbtxt']}'"]


def observed_with_v3(weights: dict[str, int], files: tuple[str, ...] = ("mlp/3/model.pt",),
                     canary: bool = True) -> Observed:
    """The restored mesh after a `models push` of mlp version 3 before the backup: `up`
    registers version 3 when it starts again."""
    route = {"model": "mlp", "weights": weights}
    return Observed(routes={"mlp": route},
                    canaries={"mlp": {"state": "promoted", "current": route}} if canary else {},
                    registry=BEFORE.registry,
                    model_files={**BEFORE.model_files, **{f: "sha256:03" for f in files}})


def test_a_pushed_version_registered_at_zero_after_the_restore_is_no_difference() -> None:
    before = observed_with_v3({"1": 90, "2": 10})
    assert differences(before, observed_with_v3({"2": 10, "3": 0, "1": 90})) == []
    assert differences(before, observed_with_v3({"1": 90, "2": 10, "3": 10})) != []  # weight
    assert differences(before, observed_with_v3({"1": 80, "2": 10, "3": 10})) == [
        "routes mlp: backed up {'model': 'mlp', 'weights': {'1': 90, '2': 10}}, now "
        "{'model': 'mlp', 'weights': {'1': 80, '2': 10, '3': 10}}",
        "canaries mlp: backed up {'state': 'promoted', 'current': {'model': 'mlp', 'weights': "
        "{'1': 90, '2': 10}}}, now {'state': 'promoted', 'current': {'model': 'mlp', "
        "'weights': {'1': 80, '2': 10, '3': 10}}}"]
    # A version at 0 % whose files did not come back is one.
    assert differences(observed_with_v3({"1": 90, "2": 10}, files=()),
                       observed_with_v3({"1": 90, "2": 10, "3": 0}, files=(), canary=False)) \
        == ["routes mlp: backed up {'model': 'mlp', 'weights': {'1': 90, '2': 10}}, now "
            "{'model': 'mlp', 'weights': {'1': 90, '2': 10, '3': 0}}",
            "canaries mlp: backed up {'state': 'promoted', 'current': {'model': 'mlp', "
            "'weights': {'1': 90, '2': 10}}}, now None"]


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


def sleeper(new_session: bool, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    """A process that looks like meshserve's: `args` end its command line, as `up`'s and the
    services' arguments end theirs."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "meshserve-drill-test", *args], start_new_session=new_session,
                            cwd=cwd)


def record_up(data_dir: Path, up: subprocess.Popen, argv: list[str], cwd: Path) -> None:
    """DIR/run/up.json as `meshserve up` writes it."""
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    (data_dir / "run" / "up.json").write_text(json.dumps(
        {"pid": up.pid, "cwd": str(cwd), "argv": argv}))


def test_a_copy_of_a_data_directory_is_not_the_mesh_it_records(tmp_path) -> None:
    original, copy = tmp_path / "d1", tmp_path / "d1copy"
    original.mkdir()
    argv = ["up", "--data-dir", "d1"]  # relative to the directory it was started in
    up = sleeper(False, *argv, cwd=tmp_path)
    service = sleeper(True, f"--port-file={original / 'run' / 'ingress.port'}")
    try:
        record_up(original, up, argv, tmp_path)
        (original / "run" / "ingress.pid").write_text(f"{service.pid}\n")
        found = UpProcess.find(original)
        assert (found.pid, found.services) == (up.pid, [service.pid])
        shutil.copytree(original, copy)
        with pytest.raises(SystemExit) as refused:
            UpProcess.find(copy)
        assert str(refused.value) == (
            f"no `meshserve up` is running on {copy}: the one recorded in "
            f"{copy / 'run' / 'up.json'} (pid {up.pid}) serves {original} (a copy of another "
            "data directory?)")
        with pytest.raises(SystemExit, match="no `meshserve up` is running on"):
            cli.main(["drill", "--data-dir", str(copy), "--quick"])
        assert copy.exists()
        assert alive(up.pid) and alive(service.pid)
        record_up(copy, up, ["up", "--data-dir", "d1", "--port", "0"], tmp_path)
        with pytest.raises(SystemExit, match=r"\(pid \d+\) is another process"):
            UpProcess.find(copy)  # a recorded command line that is not the process's
    finally:
        for process in (up, service):
            process.kill()
            process.wait(10)


def test_a_work_directory_that_cannot_be_one_is_refused_in_one_line(tmp_path, capsys) -> None:
    data_dir = tmp_path / "d1"
    up = sleeper(False, "up", "--data-dir", str(data_dir))
    try:
        record_up(data_dir, up, ["up", "--data-dir", str(data_dir)], Path("/"))
        a_file = tmp_path / "file"
        a_file.write_text("")
        assert cli.main(["drill", "--data-dir", str(data_dir), "--work-dir", str(a_file)]) == 2
        assert capsys.readouterr().err == (f"error: cannot make the work directory {a_file}: "
                                           "File exists\n")
        inside = data_dir / "drill"
        assert cli.main(["drill", "--data-dir", str(data_dir), "--work-dir", str(inside)]) == 2
        assert "is inside" in capsys.readouterr().err and not inside.exists()
        assert alive(up.pid)
    finally:
        up.kill()
        up.wait(10)


def test_kill_all_kills_up_and_every_service(tmp_path) -> None:
    run = tmp_path / "run"
    up = sleeper(False, "up", "--data-dir", str(tmp_path))
    services = [sleeper(True, f"--port-file={run / f'service-{n}.port'}") for n in range(2)]
    stranger = sleeper(True, "--port-file=/elsewhere/run/service-2.port")
    try:
        record_up(tmp_path, up, ["up", "--data-dir", str(tmp_path)], Path("/"))
        for n, service in enumerate([*services, stranger]):
            (run / f"service-{n}.pid").write_text(f"{service.pid}\n")
        found = UpProcess.find(tmp_path)
        assert (found.pid, sorted(found.services)) == (up.pid, sorted(s.pid for s in services))
        assert kill_all(found) == 3
        assert not any(alive(p.pid) for p in (up, *services))
        assert [p.wait(10) for p in (up, *services)] == [-9, -9, -9]
        assert alive(stranger.pid)  # a pid file naming another mesh's service
    finally:
        for process in (up, *services, stranger):
            process.kill()
            process.wait(10)
