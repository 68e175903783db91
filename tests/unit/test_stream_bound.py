"""The ingress's ModelStreamInfer serves at most `stream_in_progress` requests of one stream
at once, reading the stream no further meanwhile (so a client that writes and never reads
its answers is held back by HTTP/2's flow control, not buffered), and gives up the requests
still in progress when the stream ends early (a real servicer over a fake mesh: no gRPC)."""

import asyncio
from types import SimpleNamespace

from meshserve.common.server import HealthServicer
from meshserve.ingress.service import InferenceServicer
from meshserve.protocol import grpc_service_pb2 as pb
from tests.polling import until
from tests.unit.test_stream_ordering import StreamContext


class HeldMesh:
    """An ingress whose requests wait until the test releases them."""

    def __init__(self) -> None:
        self.repository = SimpleNamespace(models={})
        self.waiting: dict[str, asyncio.Event] = {}
        self.given_up: list[str] = []

    async def infer(self, request, left, traceparent, admit, partial=None):
        release = self.waiting[request.id] = asyncio.Event()
        try:
            await release.wait()
        except asyncio.CancelledError:
            self.given_up.append(request.id)
            raise
        finally:
            del self.waiting[request.id]
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id)


class Requests:
    """A stream of `count` requests that counts how many the handler has read; with
    `ends=False` a read after the last waits for a request that never comes."""

    def __init__(self, count: int, ends: bool = True) -> None:
        self.count = count
        self.ends = ends
        self.read = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.ModelInferRequest:
        if self.read == self.count:
            if not self.ends:
                await asyncio.get_running_loop().create_future()
            raise StopAsyncIteration
        self.read += 1
        return pb.ModelInferRequest(model_name="m", id=f"r{self.read - 1}")


async def turns(count: int = 50) -> None:
    """Let the event loop run every ready task `count` times over."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_stream_is_read_no_further_than_its_requests_in_progress():
    mesh, context, requests = HeldMesh(), StreamContext(), Requests(10_000)
    servicer = InferenceServicer(mesh, HealthServicer(), stream_in_progress=8)
    call = asyncio.create_task(servicer.ModelStreamInfer(requests, context))
    try:
        await until(lambda: len(mesh.waiting) == 8, 2, "8 requests in progress")
        await turns()
        assert requests.read == 8 and len(mesh.waiting) == 8
        mesh.waiting["r3"].set()
        await until(lambda: requests.read == 9, 2, "a ninth request read")
        await turns()
        assert context.written == ["r3"] and requests.read == 9 and len(mesh.waiting) == 8
    finally:
        call.cancel()
    await asyncio.gather(call, return_exceptions=True)


async def test_requests_in_progress_are_given_up_when_the_stream_ends_early():
    mesh, context, requests = HeldMesh(), StreamContext(), Requests(5, ends=False)
    servicer = InferenceServicer(mesh, HealthServicer(), stream_in_progress=8)
    call = asyncio.create_task(servicer.ModelStreamInfer(requests, context))
    await until(lambda: len(mesh.waiting) == 5, 2, "5 requests in progress")
    call.cancel()  # as the server does when the client resets the stream, or it expires
    await asyncio.gather(call, return_exceptions=True)
    await until(lambda: not mesh.waiting, 2, "the requests given up")
    assert sorted(mesh.given_up) == [f"r{i}" for i in range(5)]
    assert context.written == []
