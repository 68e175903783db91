"""Triton's dynamic batcher settings through the whole mesh (`meshserve up
--model-repository`): requests that come during the queue delay join the waiting batch, a
second instance takes a request while the first runs, a stream keeps a model's order when
its config asks, a queue timeout with timeout_action DELAY refuses nothing, and a model
without dynamic_batching runs each request alone."""

import asyncio
import json
import urllib.request

import grpc
import numpy
import pytest

from meshserve.common.tls import channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls, outputs_of
from tests.integration.conftest import running_mesh
from tests.polling import until
from tests.python_models import write_python_model

# Each request's answer (ECHO, BYTES [1] a row) says what execute saw: the call's request ids.
# X[0][0] is how long execute sleeps; the file <marker dir>/<id>.started says it began.
RECORDER_PY = '''\
import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.markers = Path(parameters["markers"]["string_value"])

    def execute(self, requests):
        ids = [request.request_id() for request in requests]
        for rid in ids:
            (self.markers / f"{rid}.started").touch()
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        time.sleep(float(xs[0][0][0]))
        echo = json.dumps({"ids": ids}).encode()
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("Y", x), pb_utils.Tensor("ECHO", np.array([[echo]] * len(x),
                                                                     dtype=np.object_))])
            for x in xs]
'''

CONFIG = '''\
backend: "python"
max_batch_size: {batch}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 2 ] }},
         {{ name: "ECHO" data_type: TYPE_STRING dims: [ 1 ] }} ]
parameters {{ key: "markers" value {{ string_value: "{markers}" }} }}
{rest}
'''

MODELS = {
    # Waits up to 30 s for a batch of its preferred size 4.
    "gather": (8, "dynamic_batching { preferred_batch_size: [ 4 ] "
                  "max_queue_delay_microseconds: 30000000 }"),
    "twice": (1, "instance_group [ { count: 2 } ]\ndynamic_batching { }"),
    "ordered": (1, "instance_group [ { count: 2 } ]\n"
                   "dynamic_batching { preserve_ordering: true }"),
    # A request queued longer than 100 ms waits behind the others, and is never refused.
    "patient": (1, "dynamic_batching { default_queue_policy { "
                   "default_timeout_microseconds: 100000 timeout_action: DELAY } }"),
    # No dynamic_batching: Triton's default scheduler runs each request alone.
    "alone": (8, ""),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic-batching")
    markers = root / "markers"
    markers.mkdir()
    for name, (batch, rest) in MODELS.items():
        write_python_model(root / "models", name, RECORDER_PY,
                           CONFIG.format(batch=batch, markers=markers, rest=rest))
    with running_mesh(root / "data", extra_args=(f"--model-repository={root / 'models'}",)
                      ) as mesh:
        mesh.markers = markers
        yield mesh


def request(model: str, rid: str, sleep: float = 0.0) -> pb.ModelInferRequest:
    built = pb.ModelInferRequest(model_name=model, id=rid)
    built.inputs.add(name="X", datatype="FP32", shape=[1, 2])
    built.raw_input_contents.append(numpy.full((1, 2), sleep, numpy.float32).tobytes())
    return built


def seen(response: pb.ModelInferResponse) -> list[str]:
    """The request ids of the execute call that answered `response`."""
    return json.loads(outputs_of(response)["ECHO"][0][0])["ids"]


def pending(mesh, model: str) -> float:
    """The model's batcher's queued requests, as its Prometheus metrics say."""
    port = (mesh.data_dir / "run" / f"batcher-{model}-1.metrics-port").read_text().strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("nv_inference_pending_request_count{"))


async def test_requests_that_come_during_the_queue_delay_join_the_waiting_batch(served):
    """A request waits (max_queue_delay_microseconds 30 s) for a batch of the preferred size;
    three more come while it waits and the four run as one batch at once, as in Triton.
    They used to wait at the ingress until the first one's group was answered: each
    request waited out the whole delay alone."""
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        first = asyncio.ensure_future(stub.ModelInfer(request("gather", "g0"), timeout=60))
        await until(lambda: pending(served, "gather") == 1, 20, "g0 queued at the batcher")
        rest = [stub.ModelInfer(request("gather", f"g{i}"), timeout=60) for i in (1, 2, 3)]
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), 15)
    assert [seen(answer) for answer in answers] == [["g0", "g1", "g2", "g3"]] * 4


async def test_a_second_instance_takes_a_request_while_the_first_runs(served):
    """instance_group count 2: while one instance runs a request for 5 s, the next request
    runs on the other at once, as in Triton, instead of waiting at the ingress for the first
    to finish."""
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        slow = asyncio.ensure_future(stub.ModelInfer(request("twice", "slow", 5.0), timeout=60))
        await until(lambda: (served.markers / "slow.started").exists(), 20, "slow running")
        quick = await asyncio.wait_for(stub.ModelInfer(request("twice", "quick"), timeout=60),
                                       20)
        assert not slow.done()
        assert seen(quick) == ["quick"]
        assert seen(await asyncio.wait_for(slow, 20)) == ["slow"]


async def test_a_stream_answers_a_model_that_preserves_ordering_in_order(served):
    """preserve_ordering: the first request takes 1 s on one instance, the second none on
    the other; the stream still answers the first first."""
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        requests = [request("ordered", "first", 1.0), request("ordered", "second")]
        answers = [a async for a in stub.ModelStreamInfer(iter(requests), timeout=60)]
    assert [(a.infer_response.id, a.error_message) for a in answers] == [("first", ""),
                                                                          ("second", "")]


async def test_a_queue_timeout_with_delay_action_refuses_nothing(served):
    """default_timeout_microseconds 100 ms with timeout_action DELAY, a model that takes
    0.5 s a request: every request is served. (The queue timeout bounded each request's
    compute call: all three failed DEADLINE_EXCEEDED, and DELAY was not applied.)"""
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        answers = await asyncio.wait_for(asyncio.gather(*(
            stub.ModelInfer(request("patient", f"p{i}", 0.5), timeout=60) for i in range(3))),
            30)
    assert sorted(seen(answer)[0] for answer in answers) == ["p0", "p1", "p2"]


async def test_a_model_without_dynamic_batching_runs_each_request_alone(served):
    """No dynamic_batching section: three requests that queue while the model's one instance
    runs another are each executed alone, as Triton's default scheduler runs them (they were
    merged into one batch, which a model whose rows are not independent answers wrongly)."""
    async with grpc.aio.secure_channel(served.endpoint, channel_credentials(
            client_tls(served.data_dir))) as channel:
        stub = GRPCInferenceServiceStub(channel)
        slow = asyncio.ensure_future(stub.ModelInfer(request("alone", "slow", 1.5), timeout=60))
        await until(lambda: (served.markers / "slow.started").exists(), 20, "slow running")
        queued = [stub.ModelInfer(request("alone", f"a{i}"), timeout=60) for i in range(3)]
        answers = await asyncio.wait_for(asyncio.gather(slow, *queued), 30)
    assert [seen(answer) for answer in answers] == [["slow"], ["a0"], ["a1"], ["a2"]]
