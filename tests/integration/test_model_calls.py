"""A Python model that calls another model from `execute` (Triton's BLS), written against
the documented `triton_python_backend_utils` API as a model for Triton would be, through the
whole mesh (`meshserve up --model-repository`): the call goes to the ingress as an ordinary
request (principal `compute`), and its answer, or its error, comes back to the model."""

import urllib.request

import grpc
import numpy
import pytest

from meshserve.common.batch_requests import parameter_values
from meshserve.common.tls import channel_credentials
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelStatisticsRequest
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls, outputs_of
from tests.integration.conftest import running_mesh
from tests.python_models import write_python_model

DOUBLE_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.rows = pb_utils.MetricFamily(
            "double_rows", "Rows doubled", pb_utils.MetricFamily.COUNTER).Metric(
            labels={"model": args["model_name"]})

    def execute(self, requests):
        for r in requests:
            self.rows.increment(len(pb_utils.get_input_tensor_by_name(r, "X").as_numpy()))
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "Y", 2 * pb_utils.get_input_tensor_by_name(r, "X").as_numpy())],
            parameters={"doubled_by": "double"}) for r in requests]
'''

# Asks `double` (or the model its TARGET names) for 2X and answers 2X + 1, with the call's
# response parameters and "called" (the target); an error of the call is answered as this
# request's own error, prefixed "called: ".
CALLER_PY = '''\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy()
            target = target.reshape(-1)[0].decode()
            call = pb_utils.InferenceRequest(
                model_name=target, requested_output_names=["Y"],
                inputs=[pb_utils.Tensor("X", x)])
            answer = CALL(call)
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "called: " + answer.error().message(), answer.error().code())))
                continue
            y = pb_utils.get_output_tensor_by_name(answer, "Y").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("Z", y + 1)],
                parameters={**json.loads(answer.parameters()), "called": target}))
        return responses
'''
SYNC_CALL = "def CALL(call):\n    return call.exec()\n\n"
ASYNC_CALLER_PY = CALLER_PY.replace("    def execute(", "    async def execute(").replace(
    "answer = CALL(call)", "answer = await call.async_exec()")

DOUBLE_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
'''
CALLER_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "TARGET" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-calls")
    models = root / "models"
    write_python_model(models, "double", DOUBLE_PY, DOUBLE_CONFIG)
    write_python_model(models, "caller", CALLER_PY.replace(
        "class TritonPythonModel", SYNC_CALL + "class TritonPythonModel"), CALLER_CONFIG)
    write_python_model(models, "async_caller", ASYNC_CALLER_PY, CALLER_CONFIG)
    with running_mesh(root / "data", extra_args=(f"--model-repository={models}",)) as mesh:
        yield mesh


def caller_request(model: str, x, target: str = "double") -> ModelInferRequest:
    x = numpy.asarray(x, numpy.float32)
    request = ModelInferRequest(model_name=model, id=f"{model}-{target}")
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    name = target.encode()
    request.inputs.add(name="TARGET", datatype="BYTES", shape=[len(x), 1])
    request.raw_input_contents.append(
        b"".join(len(name).to_bytes(4, "little") + name for _ in range(len(x))))
    return request


async def infer(served, request: ModelInferRequest):
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        return await GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


async def successes(served, model: str) -> int:
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        statistics = await GRPCInferenceServiceStub(channel).ModelStatistics(
            ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_stats.success.count for s in statistics.model_stats)


@pytest.mark.parametrize("model", ["caller", "async_caller"])
async def test_a_model_calls_another_through_the_mesh(served, model):
    before = await successes(served, "double")
    # Twice: a quick batch ran on compute's event loop from the second on, where an async
    # execute could not run (asyncio.run inside a running loop) and a call would block it.
    for shift in (3.5, -1.0):
        x = numpy.arange(8, dtype=numpy.float32).reshape(2, 4) - shift
        answer = await infer(served, caller_request(model, x))
        assert outputs_of(answer)["Z"].tolist() == (2 * x + 1).tolist()
    # Each call was an ordinary request of the callee's, counted as one.
    assert await successes(served, "double") == before + 2


async def test_a_call_that_fails_answers_the_model_with_its_error(served):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await infer(served, caller_request("caller", numpy.zeros((1, 4)), target="nowhere"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == (
        "model 'caller' version 1: called: unknown model 'nowhere'"), refused.value.details()


async def test_a_responses_parameters_reach_the_client_and_the_calling_model(served):
    x = numpy.ones((1, 4), numpy.float32)
    direct = ModelInferRequest(model_name="double", id="direct")
    direct.inputs.add(name="X", datatype="FP32", shape=x.shape)
    direct.raw_input_contents.append(x.tobytes())
    answer = await infer(served, direct)
    assert parameter_values(answer.parameters) == {"doubled_by": "double"}
    # The caller read its call's parameters (response.parameters()) and answered them on.
    called = await infer(served, caller_request("async_caller", x))
    assert parameter_values(called.parameters) == {"doubled_by": "double", "called": "double"}


def double_rows(served) -> float:
    """The `double_rows` counter its compute serves with its own metrics."""
    port = int((served.data_dir / "run" / "compute-double-1.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    [line] = [line for line in text.splitlines() if line.startswith("double_rows{")]
    assert line.startswith('double_rows{model="double"} '), line
    return float(line.split()[-1])


async def test_a_models_own_metrics_are_served_by_its_compute(served):
    before = double_rows(served)
    x = numpy.ones((3, 4), numpy.float32)
    request = ModelInferRequest(model_name="double")
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    await infer(served, request)
    assert double_rows(served) == before + 3
