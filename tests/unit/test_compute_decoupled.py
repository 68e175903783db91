"""Compute running a decoupled Python model's batch (`Compute.stream`): each answer goes back
as an early answer to its request's position as the model sends it, an early answer without
results once `execute` has returned with requests still open, and the last answer only when
every request has had its final flag; `execute` raising answers the requests still open. A
batch given up (cancelled) tells its requests, decoupled or not."""

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.batcher.batch import merge
from meshserve.common.forwarding import CODE_NAME
from meshserve.common.server import HealthServicer
from meshserve.common.tls import TlsFiles
from meshserve.common.tracing import Tracing
from meshserve.compute.service import Compute, ComputeSettings
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.groups_pb2 import InferGroupResult
from tests.polling import until
from tests.python_models import DECOUPLED_CONFIG, echo_request, write_python_model

# Request "now" is answered in execute (one answer, then the final flag); request "later" by
# a thread that waits for RELEASE first; request "boom" makes execute raise after "now" is
# answered.
LATER_PY = '''\
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

RELEASE = threading.Event()


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            y = pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(request, "X").as_numpy())
            if request.request_id() == "now":
                sender.send(pb_utils.InferenceResponse(output_tensors=[y]))
                sender.close()
            elif request.request_id() == "boom":
                raise RuntimeError("boom")
            else:
                threading.Thread(target=self.later, args=(sender, y), daemon=True).start()
        return None

    def later(self, sender, y):
        RELEASE.wait(30)
        sender.send(pb_utils.InferenceResponse(output_tensors=[y]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


# Answers each request once, then waits (at most 30 s) until the request is cancelled, and
# records how it ended: (request id, request.is_cancelled(), sender.is_cancelled()).
# UNTIL_CANCELLED_PLAIN_PY: the same wait in a model that is not decoupled, then its answers.
UNTIL_CANCELLED_PY = '''\
import time

import triton_python_backend_utils as pb_utils

ENDED = []


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            y = pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(request, "X").as_numpy())
            sender.send(pb_utils.InferenceResponse(output_tensors=[y]))
            give_up = time.monotonic() + 30
            while not request.is_cancelled() and time.monotonic() < give_up:
                time.sleep(0.005)
            ENDED.append((request.request_id(), request.is_cancelled(), sender.is_cancelled()))
            sender.close()
        return None
'''


UNTIL_CANCELLED_PLAIN_PY = '''\
import time

import triton_python_backend_utils as pb_utils

STARTED, ENDED = [], []


class TritonPythonModel:
    def execute(self, requests):
        STARTED.extend(r.request_id() for r in requests)
        give_up = time.monotonic() + 30
        while not all(r.is_cancelled() for r in requests) and time.monotonic() < give_up:
            time.sleep(0.005)
        ENDED.extend((r.request_id(), r.is_cancelled()) for r in requests)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]) for r in requests]
'''
PLAIN_CONFIG = DECOUPLED_CONFIG.replace("model_transaction_policy { decoupled: true }\n", "")


async def compute_of(tmp_path, name: str = "later", source: str = LATER_PY,
                     config: str = DECOUPLED_CONFIG) -> Compute:
    write_python_model(tmp_path, name, source, config)
    compute = Compute(ComputeSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tmp_path, "compute"),
        repository=tmp_path, model=name, version="1", device="cpu"))
    await compute.load(HealthServicer())
    assert compute.model is not None, compute.refused
    return compute


def batch_of(*ids: str, model: str = "later") -> pb.ModelInferRequest:
    requests = [echo_request(rid, [[i, i]]) for i, rid in enumerate(ids)]
    for request in requests:
        request.model_name = model
    return pb.ModelInferRequest.FromString(b"".join(
        merge(requests, [1] * len(ids), [None] * len(ids), "1", per_request=True)))


def said(answer: InferGroupResult) -> list:
    return [(p, r.more, CODE_NAME[r.code], r.response.id) for p, r in
            zip(answer.items, answer.results)]


async def test_answers_go_back_as_sent_and_the_batch_ends_with_the_last_final(tmp_path):
    compute = await compute_of(tmp_path)
    heard: list = []
    returned = asyncio.Event()

    async def early(body: bytes) -> None:
        answer = InferGroupResult.FromString(body)
        heard.append(said(answer) if answer.results else "execute returned")
        if not answer.results:
            returned.set()

    task = asyncio.create_task(compute.stream(batch_of("now", "later"), early))
    await asyncio.wait_for(returned.wait(), 30)
    assert heard == [[(0, True, "OK", "now")], [(0, False, "OK", "now")], "execute returned"]
    assert not task.done()  # "later" has had no final flag yet
    type(compute.model.instance).execute.__globals__["RELEASE"].set()  # model.py's own
    last = await asyncio.wait_for(task, 30)
    assert heard[3:] == [[(1, False, "OK", "later")]]
    assert last.code == 0 and last.response.parameters["compute_infer_ns"].int64_param > 0
    await compute.close()


async def test_execute_raising_answers_the_requests_still_open(tmp_path):
    compute = await compute_of(tmp_path)
    heard: list = []

    async def early(body: bytes) -> None:
        heard.extend(said(InferGroupResult.FromString(body)))

    last = await asyncio.wait_for(compute.stream(batch_of("now", "boom", "later"), early), 30)
    # "now" had its answers before execute raised; the two others get its error
    assert heard == [(0, True, "OK", "now"), (0, False, "OK", "now"),
                     (1, False, "INTERNAL", ""), (2, False, "INTERNAL", "")]
    assert last.code == 0
    await compute.close()


async def test_a_traced_batch_is_one_compute_span_to_its_last_answer(tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    compute = await compute_of(tmp_path)
    batch = batch_of("now")

    async def early(body: bytes) -> None:
        assert not exporter.get_finished_spans()  # open until the batch's last answer

    last = await compute.streamed(batch, early, Tracing(provider), "")
    [span] = exporter.get_finished_spans()
    assert (span.name, span.attributes["batch.size"], last.code) == ("compute.infer", 1, 0)
    await compute.close()


async def test_a_batch_given_up_tells_the_models_requests_they_are_cancelled(tmp_path):
    compute = await compute_of(tmp_path, "until_cancelled", UNTIL_CANCELLED_PY)
    ended = type(compute.model.instance).execute.__globals__["ENDED"]  # model.py's own
    answered = asyncio.Event()

    async def early(body: bytes) -> None:
        answered.set()

    task = asyncio.create_task(compute.stream(batch_of("c0", model="until_cancelled"), early))
    await asyncio.wait_for(answered.wait(), 30)
    assert ended == []
    task.cancel()  # as the batcher's cancel frame does
    await until(lambda: ended, 10, "the model seeing its request cancelled")
    assert ended == [("c0", True, True)]
    await compute.close()


async def test_a_batch_given_up_tells_a_models_requests_that_is_not_decoupled(tmp_path):
    compute = await compute_of(tmp_path, "plain", UNTIL_CANCELLED_PLAIN_PY, PLAIN_CONFIG)
    model_globals = type(compute.model.instance).execute.__globals__
    started, ended = model_globals["STARTED"], model_globals["ENDED"]
    task = asyncio.create_task(compute.infer(batch_of("p0", "p1", model="plain")))
    await until(lambda: started, 10, "the batch running")
    assert ended == []
    task.cancel()
    await until(lambda: ended, 10, "the model seeing its requests cancelled")
    assert ended == [("p0", True), ("p1", True)]
    await compute.close()
