"""A Python model whose answers differ in shape from request to request, through the whole
mesh (`meshserve up --model-repository`): requests the dynamic batcher runs as one batch
each get their own answer, of their own shape, as in Triton."""

import asyncio
import json

import grpc
import numpy
import pytest

from meshserve.common.tls import channel_credentials
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.backends.python import import_model
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls, outputs_of
from tests.integration.conftest import running_mesh
from tests.python_models import write_python_model
from tests.ragged_models import BOXES_PY, boxes_config, count_request

# Three requests of one row each make the preferred batch; alone, one waits up to 30 s.
BATCHED = ("dynamic_batching { preferred_batch_size: [ 3 ] "
           "max_queue_delay_microseconds: 30000000 }")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged-batches")
    write_python_model(root / "models", "boxes", BOXES_PY, boxes_config(rest=BATCHED))
    with running_mesh(root / "data", extra_args=(f"--model-repository={root / 'models'}",)
                      ) as mesh:
        mesh.model_file = root / "models" / "boxes" / "1" / "model.py"
        yield mesh


def computed_alone(model_file, count: int) -> dict:
    """What the model's own code answers a request of one row of `count`, called alone."""
    model = import_model(BOXES_PY, model_file).TritonPythonModel()
    [response] = model.execute([pb_utils.InferenceRequest(
        inputs=[pb_utils.Tensor("COUNT", numpy.array([[count]], numpy.int32))],
        request_id="alone")])
    return {t.name(): (list(t.as_numpy().shape), t.as_numpy().tolist())
            for t in response.output_tensors() if t.name() != "CALL"}


async def test_a_batch_answers_each_request_its_own_shape(served):
    """Requests for 1, 4 and 2 boxes run in one execute call; each gets BOXES [1, n, 4] and
    LABELS [1, n] equal to what the model computes for it alone. (The batch failed INTERNAL
    naming BOXES: its rows of shapes [1, 4], [2, 4] and [4, 4] could not be joined.)"""
    counts = {"one": 1, "four": 4, "two": 2}
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        answers = await asyncio.wait_for(asyncio.gather(*(
            stub.ModelInfer(count_request(rid, count), timeout=60)
            for rid, count in counts.items())), 45)
    for (rid, count), answer in zip(counts.items(), answers):
        got = outputs_of(answer)
        assert answer.id == rid
        assert sorted(json.loads(got.pop("CALL")[0][0])) == sorted(counts)  # one batch
        assert {name: (list(array.shape), array.tolist()) for name, array in got.items()} == (
            computed_alone(served.model_file, count))
        assert [list(o.shape) for o in answer.outputs] == [[1, count, 4], [1, count], [1, 1]]
