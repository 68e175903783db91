"""`meshserve up` as a user runs it: ready, `meshserve infer` works, SIGTERM cleans up."""

import signal

from tests.integration.conftest import children_of, meshserve, start_up, stop_up


def test_up_serves_and_stops_cleanly(tmp_path):
    mesh = start_up(tmp_path / "data")
    try:
        children = [pid for pid in children_of(mesh.data_dir) if pid != mesh.process.pid]
        # control plane, 9 computes (two for each version of cnn, which asks for two instances),
        # 7 batchers (none for the classify ensemble), router, ingress
        assert len(children) == 19
        for model in ("mlp", "cnn"):
            done = meshserve("infer", model, "--version", "2", f"--data-dir={mesh.data_dir}",
                             f"--target={mesh.endpoint}")
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"model {model} version 2 answered in" in done.stdout
            assert "OUTPUT__0 float32 [1, 10]" in done.stdout
        for model, shown in (("mlp_onnx", "OUTPUT__0 float32 [1, 10]"),
                             ("classify", "LABELS object [1, 3]")):
            done = meshserve("infer", model, f"--data-dir={mesh.data_dir}",
                             f"--target={mesh.endpoint}")
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"model {model} version 1 answered in" in done.stdout
            assert shown in done.stdout
        mesh.process.send_signal(signal.SIGTERM)
        assert mesh.process.wait(30) == 0
        assert children_of(mesh.data_dir) == []
    finally:
        stop_up(mesh)
