"""The ingress's ModelStreamInfer writes each request's answer as soon as it is ready, except
for a model whose config sets `dynamic_batching { preserve_ordering: true }`: as in Triton,
its answers come in the order of its requests (a real servicer over a fake mesh: no gRPC)."""

import asyncio
from types import SimpleNamespace

import pytest

from meshserve.common.server import HealthServicer
from meshserve.ingress.service import InferenceServicer
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import model_config_pb2 as mc
from tests.polling import until


class ReleasedMesh:
    """An ingress whose requests are answered when the test releases them, in any order."""

    def __init__(self) -> None:
        self.repository = SimpleNamespace(models={})
        self.released: dict[str, asyncio.Event] = {}
        self.answered: list[str] = []

    def add_model(self, name: str, preserve_ordering: bool) -> None:
        config = mc.ModelConfig(name=name, max_batch_size=8)
        config.dynamic_batching.preserve_ordering = preserve_ordering
        self.repository.models[name] = SimpleNamespace(config=config)

    async def infer(self, request, left, traceparent, admit, partial=None):
        await self.released.setdefault(request.id, asyncio.Event()).wait()
        self.answered.append(request.id)
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id)


class StreamContext:
    def __init__(self) -> None:
        self.written: list[str] = []

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    async def write(self, answer) -> None:
        self.written.append(answer.infer_response.id)


async def answers_when_released_in_reverse(models: list[str], ordered: set[str]) -> list[str]:
    """The ids in the order they were written, of one request per model in `models` (ids
    r0, r1, ...), answered by the mesh last first."""
    mesh, context = ReleasedMesh(), StreamContext()
    for name in set(models):
        mesh.add_model(name, name in ordered)
    requests = [pb.ModelInferRequest(model_name=name, id=f"r{i}")
                for i, name in enumerate(models)]

    async def stream():
        for request in requests:
            yield request

    servicer = InferenceServicer(mesh, HealthServicer())
    call = asyncio.create_task(servicer.ModelStreamInfer(stream(), context))
    for request in reversed(requests):
        mesh.released.setdefault(request.id, asyncio.Event()).set()
        await until(lambda r=request: r.id in mesh.answered, 2, f"{request.id} answered")
    await asyncio.wait_for(call, 2)
    return context.written


@pytest.mark.parametrize(
    ("models", "ordered", "written"),
    [
        pytest.param(["m", "m", "m"], set(), ["r2", "r1", "r0"], id="as-ready"),
        pytest.param(["m", "m", "m"], {"m"}, ["r0", "r1", "r2"], id="preserve-ordering"),
        pytest.param(["m", "other", "m", "other"], {"m"}, ["r3", "r1", "r0", "r2"],
                     id="only-the-model-that-asks"),
    ],
)
async def test_stream_answers_follow_preserve_ordering(models, ordered, written):
    assert await answers_when_released_in_reverse(models, ordered) == written
