"""One long-lived mutual-TLS channel to the next service, its stubs, and its readiness."""

import asyncio
import logging
from collections.abc import Callable

import grpc

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import groups_pb2_grpc, grpc_service_pb2_grpc, health_pb2
from meshserve.protocol.health_pb2_grpc import HealthStub

log = logging.getLogger(__name__)


class Upstream:
    """A service this process calls: `target` must present a certificate for `identity`."""

    def __init__(self, target: str, tls: TlsFiles, identity: str) -> None:
        self.target = target
        self.identity = identity
        self.channel = secure_channel(target, tls, identity)
        self.groups = groups_pb2_grpc.GroupInferenceStub(self.channel)
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self._health = HealthStub(self.channel)
        self.serving = False

    def __repr__(self) -> str:
        return f"{self.identity} at {self.target}"

    async def check(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    async def watch(self, on_change: Callable[[], None], interval: float = 0.5) -> None:
        """Poll readiness until cancelled; call `on_change` whenever it flips."""
        while True:
            serving = await self.check(timeout=max(interval * 4, 1.0))
            if serving != self.serving:
                self.serving = serving
                log.info("%s is %s", self, "serving" if serving else "not serving")
                on_change()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        await self.channel.close()
