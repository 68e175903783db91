"""Following a server stream across the server's restarts (`follow_stream`), over mutual TLS."""

import asyncio
import contextlib

from meshserve.common.http2_server import server_ssl_context
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.common.upstream import follow_stream
from meshserve.protocol import health_pb2
from meshserve.protocol.health_pb2_grpc import HealthStub
from tests.polling import until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 10.0
ENDED = "ended"


async def serving(cert_dir, address: str) -> Service:
    health = HealthServicer()
    health.set(True)
    service = Service(address, server_ssl_context(TlsFiles.for_identity(cert_dir, "batcher")),
                      lambda server: None, health)
    await service.start()
    return service


async def test_a_followed_stream_hears_each_change_and_comes_back_after_a_restart(cert_dir):
    first = await serving(cert_dir, "127.0.0.1:0")
    address = f"127.0.0.1:{first.port}"
    events: list = []
    follower = asyncio.create_task(follow_stream(
        ReloadingChannel(address, TlsFiles.for_identity(cert_dir, "control-plane"), "batcher"),
        lambda channel: HealthStub(channel).Watch(health_pb2.HealthCheckRequest()),
        lambda reply: events.append(reply.status), lambda: events.append(ENDED),
        retry_s=0.05))
    second = None
    try:
        await until(lambda: events == [SERVING], WAIT_S, "the first status")
        first.health.set(False)
        await until(lambda: events == [SERVING, NOT_SERVING], WAIT_S, "the change")

        await first.stop(0)
        await until(lambda: events[-1] == ENDED, WAIT_S, "the end of the stream")

        second = await serving(cert_dir, address)
        await until(lambda: events[-1] == SERVING, WAIT_S, "the restarted server's status")
        assert events[:3] == [SERVING, NOT_SERVING, ENDED], events
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(follower, WAIT_S)
        await first.stop(0)
        if second is not None:
            await second.stop(0)
