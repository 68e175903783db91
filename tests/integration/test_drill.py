"""`meshserve drill --quick` on a `meshserve up` of its own, as CI runs it: back up under
load, kill everything, delete the data directory, restore, start again, check."""

import contextlib
import json
import os
import signal
import subprocess
import sys

from meshserve.common.repository import ModelRepository
from meshserve.tools.demo_models import build_model, torchscript_bytes
from meshserve.tools.drill import alive
from tests.integration.conftest import meshserve, start_up, stop_up
from tests.polling import until_sync


def test_the_drill_recovers_the_mesh_and_prints_its_recovery_time(tmp_path):
    """With a version pushed before the drill: the restarted `up` serves it (at 0 %, as
    after any restart), which is no difference from what was backed up."""
    data_dir = tmp_path / "data"
    mesh = start_up(data_dir)
    report_file = tmp_path / "drill.json"
    restarted = 0
    try:
        artifact = tmp_path / "mlp-3.pt"
        artifact.write_bytes(torchscript_bytes(build_model("mlp", 1)))
        pushed = meshserve("models", "push", str(artifact), "--name", "mlp", "--version", "3",
                           "--data-dir", str(data_dir))
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        done = subprocess.run(
            [sys.executable, "-m", "meshserve.tools.cli", "drill", f"--data-dir={data_dir}",
             "--quick", f"--work-dir={tmp_path / 'work'}", f"--report={report_file}"],
            capture_output=True, text=True, timeout=420, check=False)
        print(done.stdout, done.stderr, file=sys.stderr)
        report = json.loads(report_file.read_text())
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
        if restarted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restarted, signal.SIGTERM)
            with contextlib.suppress(AssertionError):  # stop_up kills what is left
                until_sync(lambda: not alive(restarted), 30)
        stop_up(mesh)  # and whatever either `up` left behind
