"""Asynchronous requests (Submit/Result on the ingress), against a `meshserve up` of their own.

A burst is stored and answered in full; requests accepted before the ingress is killed with
SIGKILL (while the router is stopped, so none can have been answered) are all answered
after `up` restarts it; every answer equals a local forward pass of the version that served
it; each request is counted in the ingress's metrics under the protocol it was submitted by;
a request is seen only by the principal that submitted it and by operators.
"""

import asyncio
import collections
import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import numpy
import pytest
import torch

from meshserve.common.tls import channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2 import (
    CancelRequest,
    ResultRequest,
    ResultResponse,
)
from meshserve.protocol.async_inference_pb2_grpc import AsyncInferenceStub
from meshserve.tools.client import client_tls
from meshserve.tools.demo_models import build_model
from meshserve.tools.tokens import issue
from tests.integration.conftest import children_of, https_to, meshserve, start_up, stop_up
from tests.integration.test_metrics import metrics_url, scrape, total
from tests.polling import suspend

BURST = 300
KILLED = 60


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("async") / "data"
    started = start_up(data_dir)
    try:
        yield started
    finally:
        for pid in service_pids(data_dir, "router"):  # a failed test may leave it stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop_up(started)


def service_pids(data_dir: Path, identity: str) -> list[int]:
    """Processes of one service of this mesh (`... meshserve.tools.cli IDENTITY ...`)."""
    found = []
    for pid in children_of(data_dir):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[3:4] == [identity.encode()]:
                found.append(pid)
    return found


@contextlib.asynccontextmanager
async def stub_for(mesh):
    async with grpc.aio.secure_channel(
            mesh.endpoint, channel_credentials(client_tls(mesh.data_dir))) as channel:
        yield AsyncInferenceStub(channel)


def mlp_request(seed: int) -> tuple[pb.ModelInferRequest, numpy.ndarray]:
    x = numpy.random.default_rng(seed).standard_normal((1, 256)).astype(numpy.float32)
    request = pb.ModelInferRequest(model_name="mlp", id=f"req-{seed}")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(x.tobytes())
    return request, x


MODELS = {version: build_model("mlp", version) for version in ("1", "2")}


def check_answer(answer: ResultResponse, x: numpy.ndarray, seed: int) -> None:
    assert answer.state == ResultResponse.DONE, (answer.state, answer.code, answer.message)
    response = answer.response
    assert (response.model_name, response.id) == ("mlp", f"req-{seed}")
    got = numpy.frombuffer(response.raw_output_contents[0], numpy.float32).reshape(1, 10)
    with torch.no_grad():
        expected = MODELS[response.model_version](torch.from_numpy(x)).numpy()
    numpy.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


async def result(stub, submission_id: str, limit_s: float = 120.0,
                 metadata: tuple = ()) -> ResultResponse:
    """Result, waiting for it to finish; rides out the ingress restarting (bounded)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            answer = await stub.Result(ResultRequest(id=submission_id, wait_ms=20_000),
                                       metadata=metadata, timeout=30)
            if answer.state in (ResultResponse.DONE, ResultResponse.FAILED):
                return answer
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)
        assert time.monotonic() < deadline, f"{submission_id} not finished in {limit_s} s"


async def test_a_burst_is_stored_and_every_request_answered(mesh):
    requests = [mlp_request(seed) for seed in range(BURST)]
    async with stub_for(mesh) as stub:
        submitted = await asyncio.gather(*(stub.Submit(r, timeout=60) for r, _ in requests))
        ids = [s.id for s in submitted]
        assert len(set(ids)) == BURST and all(ids)
        answers = await asyncio.gather(*(result(stub, i) for i in ids))
    for seed, ((_, x), answer) in enumerate(zip(requests, answers, strict=True)):
        assert answer.id == ids[seed]
        check_answer(answer, x, seed)


def http_call(connection, method: str, path: str, body: bytes | None = None,
              metadata: tuple = ()):
    connection.request(method, path, body, headers=dict(metadata))
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())


async def test_each_request_is_counted_under_the_protocol_it_was_submitted_by(mesh):
    """One Submit over HTTP/REST, one over gRPC, each result then fetched over both: the
    ingress counts one answered request per protocol, and fetching counts nothing."""
    url = metrics_url(mesh, "ingress")
    before = scrape(url)
    by_grpc, x = mlp_request(2001)
    x_http = numpy.random.default_rng(2002).standard_normal((1, 256)).astype(numpy.float32)
    body = json.dumps({"id": "by-http", "inputs": [
        {"name": "INPUT__0", "datatype": "FP32", "shape": [1, 256],
         "data": x_http.ravel().tolist()}]}).encode()
    with https_to(mesh) as https:
        status, submitted = http_call(https, "POST", "/v2/models/mlp/infer/async", body)
        assert status == 202, submitted
        ids = {"http": submitted["id"]}
        async with stub_for(mesh) as stub:
            ids["grpc"] = (await stub.Submit(by_grpc, timeout=30)).id
            answers = {door: await result(stub, i) for door, i in ids.items()}
        for door, i in ids.items():
            status, fetched = http_call(https, "GET", f"/v2/async/{i}?wait_ms=30000")
            assert (status, fetched["state"]) == (200, "DONE"), (door, fetched)
    check_answer(answers["grpc"], x, 2001)
    assert answers["http"].state == ResultResponse.DONE and \
        answers["http"].response.id == "by-http", answers["http"]
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, model="mlp", **labels) - total(before, name, model="mlp",
                                                                 **labels)

    counted = {door: (delta("nv_inference_request_success", protocol=door),
                      delta("meshserve_request_duration_seconds_count", protocol=door))
               for door in ("grpc", "http")}
    assert counted == {"grpc": (1, 1), "http": (1, 1)}
    assert delta("nv_inference_request_failure") == 0


async def test_nothing_accepted_is_lost_when_the_ingress_is_killed(mesh):
    [router] = service_pids(mesh.data_dir, "router")
    [ingress] = service_pids(mesh.data_dir, "ingress")
    requests = [mlp_request(seed) for seed in range(1000, 1000 + KILLED)]
    suspend(router)  # nothing submitted now can be answered
    try:
        async with stub_for(mesh) as stub:
            ids = [(await stub.Submit(r, timeout=30)).id for r, _ in requests]
        os.kill(ingress, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ingress in service_pids(mesh.data_dir, "ingress"):
            assert time.monotonic() < deadline, "the killed ingress is still there"
            await asyncio.sleep(0.05)
        with contextlib.closing(sqlite3.connect(mesh.data_dir / "async.db")) as db:
            rows = dict(db.execute("SELECT id, state FROM submissions").fetchall())
        states = collections.Counter(rows[i] for i in ids if i in rows)
        assert sum(states.values()) == KILLED and "DONE" not in states, states
    finally:
        os.kill(router, signal.SIGCONT)
    async with stub_for(mesh) as stub:
        answers = [await result(stub, i) for i in ids]
    assert service_pids(mesh.data_dir, "ingress") not in ([], [ingress])  # restarted by up
    for (_, x), answer, seed in zip(requests, answers, range(1000, 1000 + KILLED), strict=True):
        check_answer(answer, x, seed)


async def running(stub, submission_id: str, limit_s: float = 30.0) -> None:
    """Once the request is RUNNING (polled for at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while (await stub.Result(ResultRequest(id=submission_id), timeout=10)).state != \
            ResultResponse.RUNNING:
        assert time.monotonic() < deadline, f"{submission_id} not running in {limit_s} s"
        await asyncio.sleep(0.02)


async def test_cancel_gives_up_running_requests_for_good(mesh):
    """With the router stopped, three requests are RUNNING (the ingress's calls wait on it):
    Cancel over gRPC and POST /v2/async/ID/cancel over HTTP end two as CANCELLED at once, and
    they stay so once the router runs again, while the third is answered; a finished
    request's Cancel answers it as it was."""
    [router] = service_pids(mesh.data_dir, "router")
    requests = [mlp_request(seed) for seed in (3001, 3002, 3003)]
    suspend(router)
    try:
        async with stub_for(mesh) as stub:
            ids = [(await stub.Submit(r, timeout=30)).id for r, _ in requests]
            for i in ids:
                await running(stub, i)
            cancelled = await stub.Cancel(CancelRequest(id=ids[0]), timeout=10)
            assert (cancelled.id, cancelled.state) == (ids[0], ResultResponse.CANCELLED)
        with https_to(mesh) as https:
            status, document = http_call(https, "POST", f"/v2/async/{ids[1]}/cancel")
        assert (status, document) == (200, {"id": ids[1], "state": "CANCELLED"})
    finally:
        os.kill(router, signal.SIGCONT)
    async with stub_for(mesh) as stub:
        check_answer(await result(stub, ids[2]), requests[2][1], 3003)
        for i in ids[:2]:
            answer = await stub.Result(ResultRequest(id=i, wait_ms=1000), timeout=10)
            assert answer.state == ResultResponse.CANCELLED
        check_answer(await stub.Cancel(CancelRequest(id=ids[2]), timeout=10),
                     requests[2][1], 3003)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Cancel(CancelRequest(id="0123456789abcdef"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_id_is_not_found(mesh):
    async with stub_for(mesh) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Result(ResultRequest(id="0123456789abcdef"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details().startswith(
            "no asynchronous request '0123456789abcdef' (never submitted, or finished more "
            "than 3600 s ago and deleted)")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Result(ResultRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "id is empty; pass the id Submit returned"


async def test_bad_requests_are_refused_at_submit(mesh):
    bad_shape, _ = mlp_request(1)
    del bad_shape.inputs[0].shape[:]
    bad_shape.inputs[0].shape.extend([1, 255])
    unknown, _ = mlp_request(2)
    unknown.model_name = "nope"
    async with stub_for(mesh) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Submit(bad_shape, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == ("input 'INPUT__0' has shape [1, 255]; model 'mlp' "
                                          "expects [-1, 256] with batch size 1 to 32")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Submit(unknown, timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == "unknown model 'nope'"
        no_classes, _ = mlp_request(1)
        no_classes.outputs.add(name="OUTPUT__0").parameters["classification"].int64_param = 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Submit(no_classes, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == ("output 'OUTPUT__0' parameter 'classification' must "
                                          "be a positive integer, the number of classes to "
                                          "return")


def test_meshserve_infer_async_prints_the_answer(mesh):
    done = meshserve("infer", "mlp", "--async", f"--target={mesh.endpoint}",
                     f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted as ") and len(lines[0].split()[-1]) == 32
    assert lines[1].startswith("model mlp version ") and "OUTPUT__0 float32 [1, 10]" in lines


def bearer(mesh, subject: str, models: tuple[str, ...] = ("mlp",)) -> tuple:
    """Metadata (and HTTP headers) carrying a token of `subject` allowed to infer on `models`."""
    token = issue(mesh.data_dir / "auth", subject, 600, scopes=["infer"], models=list(models))
    return (("authorization", f"Bearer {token}"),)


@contextlib.asynccontextmanager
async def token_stub(mesh):
    """A stub on the ingress's bearer-token port (server TLS only: no client certificate)."""
    port = int((mesh.data_dir / "run" / "ingress.token-port").read_text())
    credentials = grpc.ssl_channel_credentials((mesh.tls / "ca.crt").read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        yield AsyncInferenceStub(channel)


async def test_submit_and_result_are_authorized_like_model_infer(mesh):
    """A token allowed to infer only on cnn (on the ingress's bearer-token port), whose
    principal submitted an mlp request with a wider token."""
    narrow = bearer(mesh, "app/narrowed", models=("cnn",))
    wide = bearer(mesh, "app/narrowed", models=("mlp", "cnn"))
    mlp, _ = mlp_request(7)
    async with token_stub(mesh) as stub:
        mlp_id = (await stub.Submit(mlp, metadata=wide, timeout=10)).id
        for call in (lambda: stub.Submit(mlp, metadata=narrow, timeout=10),
                     lambda: stub.Result(ResultRequest(id=mlp_id), metadata=narrow, timeout=10)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call()
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert raised.value.details() == "'app/narrowed' may not infer model 'mlp'"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Submit(mlp)  # no principal at all
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        cnn = pb.ModelInferRequest(model_name="cnn")
        cnn.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 3, 64, 64])
        cnn.raw_input_contents.append(bytes(4 * 3 * 64 * 64))
        cnn_id = (await stub.Submit(cnn, metadata=narrow, timeout=10)).id
        answer = await stub.Result(ResultRequest(id=cnn_id, wait_ms=20_000), metadata=narrow,
                                   timeout=30)
        assert answer.state == ResultResponse.DONE, answer
        assert list(answer.response.outputs[0].shape) == [1, 10]


async def test_a_request_is_seen_only_by_its_submitter_and_operators(mesh):
    """app/alice submits one request over gRPC and one over HTTP/REST, each with a token;
    app/bob, as free to infer on mlp and holding both ids, gets NOT_FOUND for each over both,
    worded as for an id never submitted; alice, and the operator's certificate (`admin` in
    the policy `up` writes), read both results."""
    alice, bob = bearer(mesh, "app/alice"), bearer(mesh, "app/bob")
    by_grpc, x = mlp_request(3001)
    body = json.dumps({"id": "alice-by-http", "inputs": [
        {"name": "INPUT__0", "datatype": "FP32", "shape": [1, 256], "data": [0.5] * 256}]})
    never = "0" * 32
    async with token_stub(mesh) as stub:
        ids = [(await stub.Submit(by_grpc, metadata=alice, timeout=30)).id]
        with https_to(mesh, certificate=False) as https:
            status, submitted = http_call(https, "POST", "/v2/models/mlp/infer/async",
                                          body.encode(), alice)
            assert status == 202, submitted
            ids.append(submitted["id"])
            status, unknown = http_call(https, "GET", f"/v2/async/{never}", metadata=bob)
            assert status == 404, unknown
            for i in ids:
                assert http_call(https, "GET", f"/v2/async/{i}?wait_ms=1000", metadata=bob) == (
                    404, {"error": unknown["error"].replace(never, i)})
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Result(ResultRequest(id=never), metadata=bob, timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        for i in ids:
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await stub.Result(ResultRequest(id=i, wait_ms=1000), metadata=bob, timeout=10)
            assert (hidden.value.code(), hidden.value.details()) == (
                grpc.StatusCode.NOT_FOUND, raised.value.details().replace(never, i))
        answers = [await result(stub, i, metadata=alice) for i in ids]
    check_answer(answers[0], x, 3001)
    assert answers[1].state == ResultResponse.DONE and \
        answers[1].response.id == "alice-by-http", answers[1]
    with https_to(mesh, certificate=False) as https:
        status, fetched = http_call(https, "GET", f"/v2/async/{ids[0]}", metadata=alice)
        assert (status, fetched["state"]) == (200, "DONE"), fetched
    async with stub_for(mesh) as operator:
        for i in ids:
            assert (await operator.Result(ResultRequest(id=i), timeout=10)).state == \
                ResultResponse.DONE
