"""Answers that fit one message each but not together: a Python model whose every answer is
22 MiB, three requests batched as one. Triton answers each request on its own; the mesh
carried the batch's answer as one message between compute and the batcher, refused it past
the services' 64 MiB message limit, and every request of the batch failed RESOURCE_EXHAUSTED."""

import asyncio

import grpc
import numpy
import pytest

from meshserve.common.tls import channel_credentials
from meshserve.common.validation import MAX_MESSAGE
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls, outputs_of
from tests.integration.conftest import running_mesh
from tests.python_models import write_python_model

# Each row of Y holds COUNT elements, each equal to its request's FILL.
WIDE_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            count = pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()
            fill = pb_utils.get_input_tensor_by_name(request, "FILL").as_numpy()
            rows = len(count)
            wide = np.empty((rows, int(count.max())), dtype=np.float32)
            wide[:] = fill.reshape(rows, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("Y", wide)]))
        return responses
'''

# Three requests of one row make the preferred batch; alone, one waits up to 30 s.
WIDE_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "FILL" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 3 ] max_queue_delay_microseconds: 30000000 }
'''

ELEMENTS = 22 << 18  # 22 MiB of FP32 a request: three are past one message, each fits
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 128 << 20)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("big-answers")
    write_python_model(root / "models", "wide", WIDE_PY, WIDE_CONFIG)
    with running_mesh(root / "data", extra_args=(f"--model-repository={root / 'models'}",)
                      ) as mesh:
        yield mesh


def wide_request(rid: str, fill: float) -> ModelInferRequest:
    request = ModelInferRequest(model_name="wide", id=rid)
    for name, datatype, value in (("COUNT", "INT32", numpy.int32(ELEMENTS)),
                                  ("FILL", "FP32", numpy.float32(fill))):
        request.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        request.raw_input_contents.append(value.tobytes())
    return request


async def test_a_batch_whose_answers_together_pass_the_limit_answers_each_request(served):
    assert 3 * 4 * ELEMENTS > MAX_MESSAGE > 4 * ELEMENTS
    fills = {"a": 1.5, "b": -2.0, "c": 7.25}
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir)), options=CLIENT_OPTIONS) as channel:
        stub = GRPCInferenceServiceStub(channel)
        answers = await asyncio.wait_for(asyncio.gather(*(
            stub.ModelInfer(wide_request(rid, fill), timeout=90)
            for rid, fill in fills.items())), 100)
    for (rid, fill), answer in zip(fills.items(), answers):
        assert answer.id == rid
        [y] = outputs_of(answer).values()
        assert y.shape == (1, ELEMENTS)
        assert (y == numpy.float32(fill)).all()
