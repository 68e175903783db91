"""A compute whose model cannot load, for whatever reason, refuses its version saying why
(logged, and answered to every request), and stays up NOT_SERVING: it never hangs."""

import logging
from dataclasses import replace

import numpy
import pytest
import torch

from meshserve.common.errors import FailedPrecondition
from meshserve.common.server import HealthServicer
from meshserve.common.tls import TlsFiles
from meshserve.compute.service import Compute, ComputeSettings
from meshserve.protocol import grpc_service_pb2 as pb


class One(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1


CONFIG = """\
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] }%s ]
"""


def settings(repo, model: str) -> ComputeSettings:
    return ComputeSettings(listen="127.0.0.1:0", tls=TlsFiles.for_identity(repo, "compute"),
                           repository=repo, model=model, version="1", device="cpu")


async def loaded(repo, model: str) -> tuple[Compute, HealthServicer]:
    compute, health = Compute(settings(repo, model)), HealthServicer()
    await compute.load(health)
    return compute, health


def request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(numpy.zeros((1, 2), "f4").tobytes())
    return request


def write(repo, name: str, artifact: bytes, extra_output: str = "") -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG % extra_output)
    (repo / name / "1" / "model.pt").write_bytes(artifact)


def scripted(module: torch.nn.Module, tmp_path) -> bytes:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    return path.read_bytes()


async def test_an_exception_at_load_refuses_the_version_naming_file_and_reason(tmp_path,
                                                                                caplog):
    write(tmp_path, "corrupt", b"not a TorchScript archive")  # torch.jit.load: RuntimeError
    caplog.set_level(logging.ERROR)
    compute, health = await loaded(tmp_path, "corrupt")
    path = tmp_path / "corrupt" / "1" / "model.pt"
    assert compute.refused.startswith(f"refusing model 'corrupt' version 1: {path}: "
                                      "RuntimeError: ")
    assert compute.refused in caplog.text
    assert not health.serving() and compute.model is None
    assert health.answer().reason == compute.refused  # what its batcher hears, and passes on
    with pytest.raises(FailedPrecondition) as info:
        await compute.infer(request("corrupt"))
    assert info.value.message == compute.refused
    await compute.close()


async def test_a_warm_up_that_fails_refuses_the_version_saying_why(tmp_path):
    write(tmp_path, "short", scripted(One(), tmp_path),
          ', { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 2 ] }')
    compute, health = await loaded(tmp_path, "short")
    path = tmp_path / "short" / "1" / "model.pt"
    assert compute.refused == (
        f"refusing model 'short' version 1: {path}: warm-up failed: model 'short' version 1: "
        "the model returned 1 outputs; config.pbtxt declares 2")
    assert not health.serving()
    await compute.close()


async def test_a_model_that_loads_serves(tmp_path):
    write(tmp_path, "one", scripted(One(), tmp_path))
    compute, health = await loaded(tmp_path, "one")
    assert not compute.refused and health.serving()
    response = await compute.infer(request("one"))
    assert numpy.frombuffer(response.raw_output_contents[0], "f4").tolist() == [1.0, 1.0]
    await compute.close()


async def test_a_version_without_its_model_file_is_refused_saying_so(tmp_path):
    (tmp_path / "empty" / "1").mkdir(parents=True)
    (tmp_path / "empty" / "config.pbtxt").write_text(CONFIG % "")
    compute = Compute(replace(settings(tmp_path, "empty"), require_signed=True))
    health = HealthServicer()
    await compute.load(health)
    assert compute.refused == ("refusing model 'empty' version 1: no model file "
                               f"{tmp_path / 'empty' / '1' / 'model.pt'}")
    assert not health.serving()
    await compute.close()


class NoZeros(torch.nn.Module):
    """Refuses a batch of zeros: it warms up only on the data its warm-up file holds."""

    def forward(self, x: torch.Tensor):
        if bool((x == 0).all()):
            raise ValueError("a batch of zeros")
        return x + 1


WARMUP = """
model_warmup [ { name: "real" batch_size: 3 inputs { key: "INPUT__0" value {
  data_type: TYPE_FP32 dims: [ 2 ] input_data_file: "row.bin" } } } ]
"""


def write_no_zeros(repo, tmp_path, row: bytes | None) -> None:
    write(repo, "nozeros", scripted(NoZeros(), tmp_path))
    config = repo / "nozeros" / "config.pbtxt"
    config.write_text(config.read_text() + WARMUP)
    if row is not None:
        (repo / "nozeros" / "warmup").mkdir()
        (repo / "nozeros" / "warmup" / "row.bin").write_bytes(row)


async def test_a_warm_up_runs_the_data_its_input_data_file_holds(tmp_path):
    repo = tmp_path / "repo"
    write_no_zeros(repo, tmp_path, numpy.array([1.5, -2.0], "f4").tobytes())
    compute, health = await loaded(repo, "nozeros")
    assert not compute.refused and health.serving()
    await compute.close()


@pytest.mark.parametrize(("row", "reason"), [
    (None, "cannot be read ({file}): No such file or directory"),
    (b"\0\0\x80?", "holds 4 bytes; dims [2] of FP32 need 8"),
], ids=["missing", "short"])
async def test_a_warm_up_file_missing_or_short_refuses_the_version_naming_it(tmp_path, row,
                                                                            reason):
    repo = tmp_path / "repo"
    write_no_zeros(repo, tmp_path, row)
    compute, health = await loaded(repo, "nozeros")
    file = repo / "nozeros" / "warmup" / "row.bin"
    assert compute.refused == (
        "refusing model 'nozeros' version 1: model_warmup 'real' input 'INPUT__0': "
        "input_data_file 'row.bin' " + reason.format(file=file))
    assert not health.serving()
    await compute.close()
