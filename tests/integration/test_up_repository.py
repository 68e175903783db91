"""`meshserve up --model-repository` on a data directory that served another repository: the
mesh serves exactly the repository given. Traffic policies of models it no longer holds stay
in the store, inert; a version that still carries weight without a batcher keeps the ingress
from being ready, and `up` says so; its start-up output is each line once, with each
service's own time."""

import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.integration.conftest import Mesh, meshserve, start_up, stop_up

CONFIG = """platform: "pytorch_libtorch"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def linear(repository: Path, name: str, versions: tuple[str, ...]) -> None:
    """A TorchScript model of the README's worked example (Linear(3, 2))."""
    for version in versions:
        (repository / name / version).mkdir(parents=True)
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)),
                       str(repository / name / version / "model.pt"))
    (repository / name / "config.pbtxt").write_text(CONFIG)


def up_until_it_exits(data_dir: Path, repository: Path, *flags: str) -> tuple[int, str]:
    """`meshserve up` that is expected to give up: its status and output."""
    process = subprocess.Popen(
        [sys.executable, "-m", "meshserve.tools.cli", "up", f"--data-dir={data_dir}",
         "--port=0", "--device=cpu", f"--model-repository={repository}", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_up(Mesh(data_dir, "", process))
    return process.returncode, output


def test_up_serves_exactly_the_repository_it_is_given(tmp_path):
    data_dir = tmp_path / "data"
    first = tmp_path / "first"
    linear(first, "alpha", ("1", "2"))
    linear(first, "beta", ("1",))
    mesh = start_up(data_dir, extra_args=(f"--model-repository={first}",))
    try:
        shifted = meshserve("traffic", "set", "alpha", "1=50", "2=50",
                            f"--data-dir={data_dir}")
        assert shifted.returncode == 0, shifted.stdout + shifted.stderr
    finally:
        stop_up(mesh)

    # alpha without its version 2 (half of its traffic), beta gone; a model refused for its
    # config and a directory that is no version, each reported once.
    second = tmp_path / "second"
    linear(second, "alpha", ("1",))
    (second / "alpha" / "01").mkdir()
    (second / "broken" / "1").mkdir(parents=True)
    (second / "broken" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch" max_batch_size: oops\n')
    status, output = up_until_it_exits(data_dir, second, "--timeout=40")
    assert status == 1, output
    [error] = [line for line in output.splitlines() if line.startswith("error: ")]
    assert error.startswith(
        "error: ingress not ready after 40 s: not ready: model 'alpha' version 2 (50 % of its "
        "traffic): no batcher of it is registered"), output
    assert error.endswith(f"; see {data_dir.resolve() / 'run' / 'ingress.log'}")
    assert "beta" not in error
    assert output.count("ignoring directory") == 1, output
    assert output.count("model 'broken'") == 1, output

    # Both versions of alpha, beta still gone: ready, beta's policy holding nothing.
    third = tmp_path / "third"
    linear(third, "alpha", ("1", "2"))
    up_log = data_dir.parent / f"{data_dir.name}-up.log"
    mesh = start_up(data_dir, extra_args=(f"--model-repository={third}",))
    try:
        done = meshserve("infer", "alpha", f"--data-dir={data_dir}",
                         f"--target={mesh.endpoint}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "OUTPUT__0 float32 [1, 2]" in done.stdout
        # Each figure from the service's own start: none is found ready in no time.
        seconds = re.findall(r"^  ready  (\S+) .*\((\d+\.\d) s\)$", up_log.read_text(),
                             re.MULTILINE)
        assert {name for name, _ in seconds} == {
            "control-plane", "compute-alpha-1", "compute-alpha-2", "batcher-alpha-1",
            "batcher-alpha-2", "router", "ingress"}, up_log.read_text()
        assert all(float(figure) > 0 for _, figure in seconds), seconds
    finally:
        stop_up(mesh)
