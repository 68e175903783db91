"""`meshserve drill --quick` on a `meshserve up` of its own, as CI runs it: back up under
load, kill everything, delete the data directory, restore, start again, check."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from meshserve.common.repository import ModelRepository
from meshserve.tools.demo_models import build_model, torchscript_bytes
from meshserve.tools.drill import alive
from tests.integration.conftest import meshserve, start_up, stop_up
from tests.integration.test_up_repository import linear
from tests.polling import until_sync


def drill(tmp_path: Path, data_dir: Path, *flags: str) -> tuple[subprocess.CompletedProcess,
                                                                  dict]:
    """`meshserve drill --quick` on the `up` of `data_dir`: its output and its report."""
    report_file = tmp_path / "drill.json"
    done = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "drill", f"--data-dir={data_dir}",
         "--quick", f"--work-dir={tmp_path / 'work'}", f"--report={report_file}", *flags],
        capture_output=True, text=True, timeout=420, check=False)
    print(done.stdout, done.stderr, file=sys.stderr)
    return done, json.loads(report_file.read_text())


def stop_both(mesh, restarted: int) -> None:
    """The restarted `up` (SIGTERM), then the first and whatever either left behind."""
    if restarted:
        with contextlib.suppress(ProcessLookupError):
            os.kill(restarted, signal.SIGTERM)
        with contextlib.suppress(AssertionError):  # stop_up kills what is left
            until_sync(lambda: not alive(restarted), 30)
    stop_up(mesh)


def push(tmp_path: Path, data_dir: Path, model: torch.nn.Module, name: str,
         version: str) -> None:
    artifact = tmp_path / f"{name}-{version}.pt"
    artifact.write_bytes(torchscript_bytes(model))
    pushed = meshserve("models", "push", str(artifact), "--name", name, "--version", version,
                       "--data-dir", str(data_dir))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr


def test_the_drill_recovers_the_mesh_and_prints_its_recovery_time(tmp_path):
    """With a version pushed before the drill: the restarted `up` serves it (at 0 %, as
    after any restart), which is no difference from what was backed up."""
    data_dir = tmp_path / "data"
    mesh = start_up(data_dir)
    restarted = 0
    try:
        push(tmp_path, data_dir, build_model("mlp", 1), "mlp", "3")
        done, report = drill(tmp_path, data_dir)
        restarted = report["up_pid"]
        assert done.returncode == 0, done.stdout + done.stderr
        assert "drill passed" in done.stdout
        assert f"recovery time (kill -> first successful inference): " \
               f"{report['recovery_s']:.2f} s" in done.stdout
        assert report["problems"] == [] and report["recovery_s"] > 0
        assert report["submissions_kept"] == report["submissions_before"] == 20
        assert report["submissions_after_lost"] == report["submissions_after"] == 5
        assert report["archive_bytes"] == (tmp_path / "work" / report["archive"].split("/")[-1]
                                           ).stat().st_size
        demo = ModelRepository.load(data_dir / "models")
        assert report["versions_ready"] == sum(len(m.versions) for m in demo.models.values())
        assert report["load"]["OK"] > 0
        assert mesh.process.wait(10) == -signal.SIGKILL  # the first `up` was killed
        # The restarted mesh answers, and its audit chain verifies offline too.
        until_sync((data_dir / "run" / "endpoint").exists, 60, "the restarted mesh's endpoint")
        endpoint = (data_dir / "run" / "endpoint").read_text().strip()
        infer = meshserve("infer", "mlp", f"--data-dir={data_dir}", f"--target={endpoint}")
        assert infer.returncode == 0 and "OUTPUT__0" in infer.stdout, infer.stderr
        verify = meshserve("audit", "verify", f"--store={data_dir / 'mesh.db'}")
        assert verify.returncode == 0 and "audit log intact" in verify.stdout
    finally:
        stop_both(mesh, restarted)


def test_the_drill_backs_up_and_checks_the_repository_up_serves(tmp_path):
    """`up --model-repository X`: the drill backs up X, with a version pushed into it, and
    checks X, not DIR/models; X, outside the data directory, outlives the deletion, and the
    archive's copy of it is checked against it."""
    data_dir = tmp_path / "data"
    repository = tmp_path / "repo"
    linear(repository, "alpha", ("1",))
    mesh = start_up(data_dir, extra_args=(f"--model-repository={repository}",))
    restarted = 0
    try:
        push(tmp_path, data_dir, torch.nn.Linear(3, 2), "alpha", "2")
        assert (repository / "alpha" / "2" / "model.pt").is_file()
        done, report = drill(tmp_path, data_dir, "--model=alpha")
        restarted = report["up_pid"]
        assert done.returncode == 0, done.stdout + done.stderr
        assert report["problems"] == [] and "drill passed" in done.stdout
        assert report["versions_ready"] == 2  # alpha 1, and 2 at 0 % after the restart
        assert report["submissions_kept"] == report["submissions_before"] == 20
        with tarfile.open(report["archive"]) as archive:
            members = set(archive.getnames())
        assert {"files/models/alpha/config.pbtxt", "files/models/alpha/1/model.pt",
                "files/models/alpha/2/model.pt", "files/models/alpha/2/manifest.sig"} <= members
        assert not (data_dir / "models").exists()
        assert not (tmp_path / "work" / "restored-models").exists()
        until_sync((data_dir / "run" / "endpoint").exists, 60, "the restarted mesh's endpoint")
        endpoint = (data_dir / "run" / "endpoint").read_text().strip()
        infer = meshserve("infer", "alpha", "--version=2", f"--data-dir={data_dir}",
                          f"--target={endpoint}")
        assert infer.returncode == 0 and "OUTPUT__0" in infer.stdout, infer.stderr
    finally:
        stop_both(mesh, restarted)
