"""The ingress's ensemble runner, its steps run by the real Python model in this process
(the mesh between them is the integration test's)."""

import asyncio

import numpy
import pytest

from meshserve.common.datatypes import serialize_bytes
from meshserve.common.errors import InvalidArgument, NotFound
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.ingress.ensembles import EnsembleRunner
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.python_models import ADD_SUB_CONFIG, ADD_SUB_PY, GREET, write_python_model


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runner(tmp_path):
    write_python_model(tmp_path, "add_sub", ADD_SUB_PY, ADD_SUB_CONFIG)
    (tmp_path / "greet" / "1").mkdir(parents=True)
    (tmp_path / "greet" / "config.pbtxt").write_text(GREET)
    repository = ModelRepository.load(tmp_path)
    entry = repository.get("add_sub")
    model = load_model(entry.config, entry.path / "1" / "model.py", entry.path / "1", "cpu", 1)
    clock = Clock()
    seen = []

    async def step(request, remaining, traceparent):
        seen.append((request, remaining, traceparent))
        clock.now += 0.25  # each step takes a quarter of a second
        return model.run(request, request.model_version or "1")[0]

    runner = EnsembleRunner(repository, step, clock=clock)
    runner.seen = seen
    return runner


def greet_request(a: float, rows: int = 2) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="greet", id="e-1")
    values = numpy.full((rows, 4), a, numpy.float32)
    request.inputs.add(name="A", datatype="FP32", shape=[rows, 4])
    request.inputs.add(name="B", datatype="FP32", shape=[rows, 4])
    request.inputs.add(name="NAME", datatype="BYTES", shape=[rows, 1])
    request.raw_input_contents.extend([values.tobytes(), values.tobytes(),
                                       serialize_bytes([f"n{i}" for i in range(rows)])])
    request.parameters["priority"].int64_param = 1
    return request


async def test_steps_get_the_mapped_tensors_and_the_answer_carries_the_outputs(runner):
    response = await runner.infer(greet_request(1.5), remaining=2.0, traceparent="00-t-s-01")
    outputs = outputs_of(response)
    assert outputs["SUM"].tolist() == [[3.0] * 4] * 2
    assert outputs["GREETING"].tolist() == [[b"hello n0"], [b"hello n1"]]
    assert (response.model_name, response.model_version, response.id) == ("greet", "1", "e-1")
    [(step, remaining, traceparent)] = runner.seen
    assert (step.model_name, step.model_version) == ("add_sub", "1")
    assert [o.name for o in step.outputs] == ["GREETING", "SUM"]
    assert step.parameters["priority"].int64_param == 1
    assert remaining == 2.0 and traceparent == "00-t-s-01"
    [stats] = runner.statistics("greet")
    assert (stats.inference_count, stats.execution_count) == (2, 1)
    assert stats.inference_stats.success.count == 1
    assert stats.inference_stats.success.ns == 250_000_000


async def test_an_output_asked_for_as_classes_comes_back_as_its_top_classes(runner):
    request = greet_request(1.5, rows=1)
    request.outputs.add(name="SUM").parameters["classification"].int64_param = 2
    response = await runner.infer(request, remaining=None)
    assert outputs_of(response)["SUM"].tolist() == [[b"3.000000:0", b"3.000000:1"]]


async def test_only_the_requested_outputs_come_back(runner):
    request = greet_request(1.0)
    request.outputs.add(name="GREETING")
    response = await runner.infer(request, remaining=None)
    assert [t.name for t in response.outputs] == ["GREETING"]


async def test_a_failing_step_is_named_and_keeps_its_status(runner):
    with pytest.raises(InvalidArgument) as raised:
        await runner.infer(greet_request(-1.0), remaining=None)
    assert raised.value.message == ("ensemble 'greet' step 1 ('add_sub' version 1): model "
                                    "'add_sub' version 1: A must not be negative")
    [stats] = runner.statistics("greet")
    assert stats.inference_stats.fail.count == 1 and stats.inference_count == 0


async def test_the_ensembles_own_request_is_validated_and_admitted_first(runner):
    request = greet_request(1.0)
    request.inputs[0].datatype = "FP64"
    with pytest.raises(InvalidArgument, match="input 'A' has datatype FP64; model 'greet'"):
        await runner.infer(request, remaining=None)
    refused = []

    def admit():
        refused.append(True)
        raise InvalidArgument("not you")

    with pytest.raises(InvalidArgument, match="not you"):
        await runner.infer(greet_request(1.0), remaining=None, admit=admit)
    assert refused and not runner.seen
    assert "greet" in runner and "add_sub" not in runner


async def test_ready_when_every_step_is(runner):
    asked = []

    async def check(model, version):
        asked.append((model, version))
        return model == "add_sub"

    assert await runner.ready("greet", check) is True
    assert asked == [("add_sub", "1")]


class Requests:
    """What the runner tells `record`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def record(self, model: str, version: str, code: str, arrived: float) -> None:
        self.seen.append((model, version, code))


async def test_requests_it_cannot_answer_are_counted_too(tmp_path):
    """An unknown version, and a call whose caller left while a step ran, are counted as a
    failure as every answered request is counted."""
    write_python_model(tmp_path, "add_sub", ADD_SUB_PY, ADD_SUB_CONFIG)
    (tmp_path / "greet" / "1").mkdir(parents=True)
    (tmp_path / "greet" / "config.pbtxt").write_text(GREET)

    async def slow(request, remaining, traceparent):
        await asyncio.sleep(10)

    counted = Requests()
    runner = EnsembleRunner(ModelRepository.load(tmp_path), slow, counted.record)
    with pytest.raises(NotFound):
        await runner.infer(pb.ModelInferRequest(model_name="greet", model_version="9"), None)
    call = asyncio.create_task(runner.infer(greet_request(1.0), remaining=None))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert counted.seen == [("greet", "", "NOT_FOUND"), ("greet", "1", "CANCELLED")]
