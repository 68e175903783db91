"""The drill's traffic: closed-loop callers on the ingress's mutual-TLS port (following the
port file across restarts), and asynchronous submissions and how each one ended."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.common.tls import channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2 import ResultRequest, ResultResponse
from meshserve.protocol.async_inference_pb2_grpc import AsyncInferenceStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls
from meshserve.tools.up_children import HOST

RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500)]


class Connection:
    """A channel to the ingress's mutual-TLS port, rebuilt when the port file changes (a
    restarted `up` on port 0 binds another) or when the TLS files come back."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.target = ""
        self.channel: grpc.aio.Channel | None = None
        self.replaced: list[grpc.aio.Channel] = []

    def get(self) -> grpc.aio.Channel | None:
        try:
            target = f"{HOST}:{int((self.data_dir / 'run' / 'ingress.port').read_text())}"
            if target != self.target or self.channel is None:
                credentials = channel_credentials(client_tls(self.data_dir))
                if self.channel is not None:
                    self.replaced.append(self.channel)
                self.channel = grpc.aio.secure_channel(target, credentials, options=RECONNECT)
                self.target = target
        except (OSError, ValueError):
            return self.channel if self.target else None
        return self.channel

    async def close(self) -> None:
        channels = [*self.replaced, *([self.channel] if self.channel else [])]
        self.replaced, self.channel = [], None
        await asyncio.gather(*(channel.close() for channel in channels))


@dataclass
class Load:
    """Closed-loop callers sending ModelInfer; every outcome is timed (monotonic): when its
    call was sent and when it ended."""

    connection: Connection
    request: pb.ModelInferRequest
    pause_s: float
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)
    stopping: bool = False

    async def caller(self) -> None:
        while not self.stopping:
            channel = self.connection.get()
            sent = time.monotonic()
            if channel is None:
                self.outcomes.append((sent, sent, "NO_ENDPOINT"))
                await asyncio.sleep(0.1)
                continue
            try:
                await GRPCInferenceServiceStub(channel).ModelInfer(self.request, timeout=5)
                self.outcomes.append((sent, time.monotonic(), "OK"))
            except grpc.aio.AioRpcError as error:
                self.outcomes.append((sent, time.monotonic(), error.code().name))
            await asyncio.sleep(self.pause_s)

    def first_success_after(self, moment: float) -> float | None:
        """When the first call sent after `moment` succeeded (an answer that was already on
        its way at `moment` does not count)."""
        return min((ended for sent, ended, outcome in self.outcomes
                    if sent > moment and outcome == "OK"), default=None)

    def counts(self) -> dict[str, int]:
        return dict(Counter(outcome for _, _, outcome in self.outcomes))


async def answers(channel: grpc.aio.Channel, ids: list[str], timeout_s: float) -> Counter:
    """How each submission ended: DONE, FAILED, or NOT_FOUND (not in the restored store)."""
    stub = AsyncInferenceStub(channel)
    deadline = time.monotonic() + timeout_s

    async def one(submission_id: str) -> str:
        while time.monotonic() < deadline:
            try:
                answer = await stub.Result(ResultRequest(id=submission_id, wait_ms=5000),
                                           timeout=10)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return "NOT_FOUND"
                await asyncio.sleep(0.2)
                continue
            if answer.state in (ResultResponse.DONE, ResultResponse.FAILED,
                                ResultResponse.CANCELLED):
                return ResultResponse.State.Name(answer.state)
        return "UNANSWERED"

    return Counter(await asyncio.gather(*(one(i) for i in ids)))


async def submit(channel: grpc.aio.Channel, request: pb.ModelInferRequest, count: int,
                 ) -> list[str]:
    stub = AsyncInferenceStub(channel)
    replies = await asyncio.gather(*(stub.Submit(request, timeout=10) for _ in range(count)))
    return [reply.id for reply in replies]
