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

    async def step(request, remaining, traceparent, partial=None):
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

    async def slow(request, remaining, traceparent, partial=None):
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


async def test_every_request_parameter_reaches_each_step(runner):
    """As Triton sets the ensemble request's parameters on each step's request: a Python
    step reads the client's own parameters (a tokenizer's `lowercase`), not only priority
    and timeout."""
    request = greet_request(1.0)
    request.parameters["lowercase"].bool_param = True
    request.parameters["tag"].string_param = "t-1"
    await runner.infer(request, remaining=None)
    [(step, _, _)] = runner.seen
    assert dict(step.parameters) == dict(request.parameters)


# Models the runner reads only the configs of; `PlusOne` answers their requests.
PLUS = """
backend: "python"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "EXTRA" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
PLUS_UNBATCHED = """
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
"""


def plus_step(model: str, reads: str, writes: str, extra: str = "") -> str:
    extra_map = f'input_map {{ key: "EXTRA" value: "{extra}" }} ' if extra else ""
    return (f'{{ model_name: "{model}" model_version: -1 input_map {{ key: "IN" value: '
            f'"{reads}" }} {extra_map}output_map {{ key: "OUT" value: "{writes}" }} }}')


def fp32_tensors(names: str, dims: str) -> str:
    """Config entries of FP32 tensors `names` (comma-separated; "B?" is optional)."""
    return ", ".join(
        f'{{ name: "{name.rstrip("?")}" data_type: TYPE_FP32 dims: [ {dims} ]'
        f'{" optional: true" if name.endswith("?") else ""} }}' for name in names.split(","))


def plus_ensemble(max_batch_size: int, dims: str, inputs: str, outputs: str,
                  steps: list[str]) -> str:
    return (f'platform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            f"input [ {fp32_tensors(inputs, dims)} ]\noutput [ {fp32_tensors(outputs, dims)} ]\n"
            f"ensemble_scheduling {{ step [ {', '.join(steps)} ] }}\n")


class PlusOne:
    """Answers a step as its model would (OUT = IN + 1, + EXTRA when given), keeping each
    request."""

    def __init__(self) -> None:
        self.seen: list[pb.ModelInferRequest] = []

    async def __call__(self, request, remaining, traceparent, partial=None):
        self.seen.append(request)
        given = {t.name: numpy.frombuffer(raw, numpy.float32).reshape(t.shape)
                 for t, raw in zip(request.inputs, request.raw_input_contents)}
        out = given["IN"] + 1 + given.get("EXTRA", 0)
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="OUT", datatype="FP32", shape=out.shape)
        response.raw_output_contents.append(out.tobytes())
        return response


def repository_of(root, configs: dict[str, str]) -> ModelRepository:
    """A repository at `root` of models (version 1) with these configs, none refused."""
    for name, config in configs.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
    repository = ModelRepository.load(root)
    assert not repository.refused
    return repository


@pytest.fixture
def plus(tmp_path):
    """A runner over `plus` (batching) and `plus_unbatched` models and ensembles of them."""
    configs = {
        "plus": PLUS, "plus_unbatched": PLUS_UNBATCHED,
        "optional": plus_ensemble(8, "4", "X,B?", "Y", [plus_step("plus", "X", "Y", "B")]),
        "branches": plus_ensemble(8, "4", "X", "L,R", [
            plus_step("plus", "X", "t"), plus_step("plus", "t", "L"),
            plus_step("plus", "X", "R"), plus_step("plus", "R", "unread")]),
        # A step without batching in a batching ensemble, and an ensemble without batching
        # over a batching step, as Triton allows.
        "mixed": plus_ensemble(4, "4", "X", "Y", [
            plus_step("plus_unbatched", "X", "m"), plus_step("plus", "m", "Y")]),
        "flat": plus_ensemble(0, "4", "X", "Y", [plus_step("plus", "X", "Y")]),
    }
    steps = PlusOne()
    runner = EnsembleRunner(repository_of(tmp_path, configs), steps)
    runner.seen = steps.seen
    return runner


def plus_request(model: str, x: numpy.ndarray, outputs=(), **others) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in {"X": x, **others}.items():
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.astype(numpy.float32).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


async def test_an_optional_input_the_request_leaves_out_is_left_out_of_its_step(plus):
    x = numpy.zeros((2, 4))
    response = await plus.infer(plus_request("optional", x), remaining=None)
    assert outputs_of(response)["Y"].tolist() == [[1.0] * 4] * 2
    assert [t.name for t in plus.seen[0].inputs] == ["IN"]
    response = await plus.infer(plus_request("optional", x, B=x + 5), remaining=None)
    assert outputs_of(response)["Y"].tolist() == [[6.0] * 4] * 2


async def test_a_step_that_no_requested_output_needs_does_not_run(plus):
    """As Triton prunes them: asking for L runs the two steps that lead to it (reading X = 0,
    then t = 1); for R, its step alone; asking for none or for all runs every step (the last
    one, which reads R = 1 and writes what nothing reads, too)."""

    async def read_by_steps(outputs: list[str]) -> list[float]:
        """What each step that ran read of IN (one value of it)."""
        plus.seen.clear()
        request = plus_request("branches", numpy.zeros((1, 4)), outputs)
        response = await plus.infer(request, remaining=None)
        assert [t.name for t in response.outputs] == (outputs or ["L", "R"])
        return sorted(numpy.frombuffer(s.raw_input_contents[0], numpy.float32)[0]
                      for s in plus.seen)

    assert await read_by_steps(["L"]) == [0.0, 1.0]
    assert await read_by_steps(["R"]) == [0.0]
    assert await read_by_steps([]) == await read_by_steps(["L", "R"]) == [0.0, 0.0, 1.0, 1.0]


async def test_tensors_pass_between_batching_and_non_batching_models_as_in_triton(plus):
    # A batch of 2 goes through the step without batching as the [2, 4] its dims describe.
    response = await plus.infer(plus_request("mixed", numpy.zeros((2, 4))), remaining=None)
    assert outputs_of(response)["Y"].tolist() == [[2.0] * 4] * 2
    assert [s.inputs[0].shape for s in plus.seen] == [[2, 4], [2, 4]]
    plus.seen.clear()
    # A [4] without a batch reaches the batching step as a batch of one, and comes back [4].
    response = await plus.infer(plus_request("flat", numpy.zeros(4)), remaining=None)
    assert [s.inputs[0].shape for s in plus.seen] == [[1, 4]]
    assert list(response.outputs[0].shape) == [4]
    assert outputs_of(response)["Y"].tolist() == [1.0] * 4
