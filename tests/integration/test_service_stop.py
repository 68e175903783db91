"""Stopping a service: watchers are told and let go, and no step can hang the stop."""

import asyncio
import logging

import grpc

from meshserve.common import server as server_module
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import health_pb2, health_pb2_grpc

GRACE_S = 30.0  # far longer than the bound below: a stop that waits it out fails the test
BOUND_S = 10.0


def service(cert_dir, **kwargs) -> Service:
    health = HealthServicer()
    health.set(True)
    return Service("127.0.0.1:0",
                   server_ssl_context(TlsFiles.for_identity(cert_dir, "router")),
                   lambda server: None, health, **kwargs)


async def statuses(watch) -> list[int]:
    """Every status a Watch stream sends until it ends."""
    heard = []
    while (reply := await watch.read()) is not grpc.aio.EOF:
        heard.append(reply.status)
    return heard


async def test_a_stopping_service_ends_its_health_watches_instead_of_waiting_its_grace(
        cert_dir):
    running = service(cert_dir)
    port = await running.start()
    channel = secure_channel(f"127.0.0.1:{port}", TlsFiles.for_identity(cert_dir, "ingress"),
                             "router")
    stopping = None
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.create_task(running.stop(GRACE_S))
        heard = await asyncio.wait_for(statuses(watch), BOUND_S)
        await asyncio.wait_for(asyncio.shield(stopping), BOUND_S)

        assert heard == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert await watch.code() == grpc.StatusCode.OK
    finally:
        await channel.close()
        await (running.stop(0) if stopping is None else stopping)


async def test_a_step_that_never_ends_does_not_hang_the_stop(cert_dir, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "STOP_SLACK_S", 0.2)
    closed = []

    async def never_ends() -> None:
        await asyncio.Event().wait()

    async def closes() -> None:
        closed.append(True)

    running = service(cert_dir, cleanup=[never_ends, closes])
    await running.start()
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        await asyncio.wait_for(running.stop(0), BOUND_S)

    assert closed == [True]  # the steps after the stuck one still ran
    assert any("never_ends" in record.getMessage() and "did not finish" in record.getMessage()
               for record in caplog.records), caplog.text
