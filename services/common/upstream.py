"""The next service: a long-lived group stream to it, a mutual-TLS channel for its other
calls, and its readiness.

Groups travel on the project's own HTTP/2 client (`meshserve.common.http2_client`), the
other calls on a gRPC channel. Readiness is followed with grpc.health.v1 Watch, which the
upstream pushes on, beside a health Check every few seconds that notices an upstream which
stopped answering at all (`meshserve.common.liveness`); the same loop picks up rotated
certificates: the gRPC channel is rebuilt and the group stream moves to a new connection with
the new files; the old ones close once their in-flight calls are done.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from meshserve.common.http2_client import Http2Channel, client_ssl_context
from meshserve.common.liveness import Standing, answers, keep_checking
from meshserve.common.streams import GroupStream, start_stream
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.protocol import groups_pb2_grpc, grpc_service_pb2_grpc, health_pb2
from meshserve.protocol.health_pb2_grpc import HealthStub

log = logging.getLogger(__name__)

FILES_EVERY_S = 2.0  # how often a watch looks for rotated TLS files
RETRY_S = 0.5  # how soon a watch that ended is tried again


class Upstream:
    """A service this process calls: `target` must present a certificate for `identity`."""

    def __init__(self, target: str, tls: TlsFiles, identity: str) -> None:
        self.target = target
        self.identity = identity
        self._reloading = ReloadingChannel(target, tls, identity)
        self._bind()
        self._tls = tls
        self._streams = Http2Channel(target, client_ssl_context(tls), identity)
        # Groups travel on one long-lived stream, opened on the channel of the moment.
        self.stream = GroupStream(lambda: start_stream(self._streams), repr(self))
        self.serving = False
        # Why it is not serving, as it said (a compute that refused its model); "" otherwise.
        self.reason = ""
        self._standing = Standing()

    def _bind(self) -> None:
        self.channel = self._reloading.channel
        self.groups = groups_pb2_grpc.GroupInferenceStub(self.channel)
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self._health = HealthStub(self.channel)

    def refresh_certificates(self) -> bool:
        """Use the TLS files anew if they changed; True when the channel was rebuilt."""
        if not self._reloading.refresh():
            return False
        self._bind()
        try:
            self._streams.renew(client_ssl_context(self._tls))
        except OSError as error:  # ssl.SSLError too: a pair rewritten since the check
            log.warning("keeping the group connection to %s: %s", self, error)
            return True
        self.stream.retire()
        return True

    def __repr__(self) -> str:
        return f"{self.identity} at {self.target}"

    async def check(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Follow readiness until cancelled, calling `on_change` whenever it flips: a
        grpc.health.v1 Watch stream, which the upstream pushes on (nothing moves while nothing
        changes; a poll cost ~0.4 % of a core on each side), and a Check every few seconds
        while it is serving, so that an upstream which stopped answering at all counts as not
        serving until it answers again (`meshserve.common.liveness`). The TLS files are
        checked every FILES_EVERY_S and the watch moves to the new channel; a watch that ends
        (the upstream is away or stopping) is tried again after RETRY_S."""
        loop = asyncio.get_running_loop()
        checks = loop.create_task(keep_checking(lambda timeout: answers(self.channel, timeout),
                                                self._standing, lambda: self._checked(on_change)))
        try:
            while True:
                follower = loop.create_task(self._follow(on_change))
                try:
                    while not follower.done():
                        await asyncio.wait({follower}, timeout=FILES_EVERY_S)
                        if self.refresh_certificates():
                            follower.cancel()  # watch again, on the new channel
                            await asyncio.wait({follower}, timeout=FILES_EVERY_S)
                except BaseException:
                    follower.cancel()
                    raise
                if not follower.cancelled():
                    await asyncio.sleep(RETRY_S)
        finally:
            checks.cancel()

    async def _follow(self, on_change: Callable[[], None]) -> None:
        """Follow one Watch stream until it ends; not serving once it has."""
        try:
            async for reply in self._health.Watch(health_pb2.HealthCheckRequest()):
                self._heard(reply, on_change)
        except grpc.aio.AioRpcError:
            pass
        self._heard(None, on_change)

    def _checked(self, on_change: Callable[[], None]) -> None:
        if not self._standing.answers:
            log.warning("%s did not answer a health check in time: not serving until it does",
                        self)
        self._publish(on_change)

    def _heard(self, reply: health_pb2.HealthCheckResponse | None,
               on_change: Callable[[], None]) -> None:
        self._standing.heard(reply)
        self._publish(on_change)

    def _publish(self, on_change: Callable[[], None]) -> None:
        serving, reason = self._standing.serving, self._standing.reason
        if (serving, reason) == (self.serving, self.reason):
            return
        if serving != self.serving:
            log.info("%s is %s", self, "serving" if serving else "not serving")
        self.serving, self.reason = serving, reason
        on_change()

    async def close(self) -> None:
        await self.stream.close()
        await self._streams.close()
        await self._reloading.close()


async def follow_stream(channel: ReloadingChannel,
                        open_stream: Callable[[grpc.aio.Channel], AsyncIterator],
                        heard: Callable[[object], None], ended: Callable[[], None],
                        retry_s: float) -> None:
    """Pass each message of `open_stream(channel)` to `heard`, until cancelled: when the stream
    ends or fails, `ended()`, then after `retry_s` a new stream, with the TLS files of the
    moment. Closes `channel` when cancelled."""
    try:
        while True:
            channel.refresh()
            try:
                async for message in open_stream(channel.channel):
                    heard(message)
            except grpc.aio.AioRpcError as error:
                log.debug("stream to %s: %s", channel.target, error.code().name)
            ended()
            await asyncio.sleep(retry_s)
    finally:
        await channel.close()
