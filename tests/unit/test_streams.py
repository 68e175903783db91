"""Group streams over a real gRPC server with mutual TLS on a free port: framing, answers in
any order, draining (go away), a broken stream's groups sent once more, timeouts; each on a
gRPC channel and on the project's own HTTP/2 client alike."""

import asyncio
import gc

import grpc
import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.common.http2_client import Http2Channel, client_ssl_context
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.server import HealthServicer, Service
from meshserve.common.streams import (
    LOCAL_FAILURE,
    SERVICE,
    STREAM,
    GroupStream,
    StreamBroken,
    broken,
    cancel,
    cancel_frame,
    cancelled_id,
    frame,
    group_handler,
    start_stream,
    unframe,
)
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol.groups_pb2 import InferGroup, InferGroupResult
from meshserve.tools.certs import init_certs
from tests.polling import until


def test_a_frame_is_its_id_then_its_body_and_parses_as_the_message():
    body = InferGroup(model_name="mlp", version="2").SerializeToString()
    message = frame(7, body)
    assert unframe(message) == (7, body, False)
    assert InferGroup.FromString(message) == InferGroup(model_name="mlp", version="2",
                                                        group_id=7)


@pytest.mark.parametrize("code, details, expected", [
    pytest.param(grpc.StatusCode.OK, "", (grpc.StatusCode.UNAVAILABLE,
                                          "batcher:1 ended the stream"), id="ended-in-order"),
    pytest.param(*LOCAL_FAILURE, (grpc.StatusCode.UNAVAILABLE,
                                  "the stream to batcher:1 broke (Internal error from Core)"),
                 id="broke-under-a-write"),
    pytest.param(grpc.StatusCode.INTERNAL, "model exploded",
                 (grpc.StatusCode.INTERNAL, "model exploded"), id="the-peer's-internal"),
    pytest.param(grpc.StatusCode.PERMISSION_DENIED, "",
                 (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"), id="no-details"),
])
def test_why_a_stream_ended(code, details, expected):
    """A stream that broke under a write (gRPC's local failure in place of its status) counts
    as UNAVAILABLE, so its groups go once more on a fresh stream; a peer's own INTERNAL stays."""
    error = broken(code, details, "batcher:1")
    assert (error.code, error.details) == expected


def test_a_partial_answer_is_framed_under_partial_group_id():
    body = InferGroupResult(items=[1]).SerializeToString()
    message = frame(9, body, partial=True)
    assert unframe(message) == (9, body, True)
    assert InferGroupResult.FromString(message) == InferGroupResult(items=[1],
                                                                    partial_group_id=9)


def test_a_cancel_is_cancel_group_id_alone_and_no_group_reads_as_one():
    message = cancel_frame(7)
    assert cancelled_id(message) == 7
    assert InferGroup.FromString(message) == InferGroup(cancel_group_id=7)
    assert cancelled_id(frame(7, b"")) is None
    assert cancelled_id(frame(7, InferGroup(cancel_group_id=7).SerializeToString())) is None


@pytest.mark.parametrize("message", [b"", b"\x0a\x03mlp", b"\x79\x01\x02"])
def test_an_unframed_message_is_refused(message):
    with pytest.raises(ValueError, match="must start with its group_id"):
        unframe(message)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[TlsFiles, TlsFiles]:
    directory = tmp_path_factory.mktemp("tls")
    init_certs(directory, days=1)

    def files(identity: str) -> TlsFiles:
        return TlsFiles(cert=directory / f"{identity}.crt", key=directory / f"{identity}.key",
                        ca=directory / "ca.crt")

    return files("batcher"), files("router")


@pytest.fixture(params=["grpc", "http2"])
def connect(request):
    """Opens a client channel to a port: gRPC's, or the project's own HTTP/2 client."""
    def open_channel(client_tls: TlsFiles, port: int):
        if request.param == "grpc":
            return secure_channel(f"127.0.0.1:{port}", client_tls, "batcher")
        return Http2Channel(f"127.0.0.1:{port}", client_ssl_context(client_tls), "batcher")
    return open_channel


class Echo:
    """A server's group handler: answers each body with itself reversed, once `gate` (when
    given for that body) is set; counts the bodies it saw."""

    def __init__(self) -> None:
        self.gates: dict[bytes, asyncio.Event] = {}
        self.seen: list[bytes] = []
        self.cancelled: list[bytes] = []  # the bodies whose handling was cancelled

    async def handle(self, body: memoryview, early=None) -> bytes:
        body = bytes(body)
        self.seen.append(body)
        if body.startswith(b"early:") and early is not None:
            await early(b"first part")
        if body in self.gates:
            try:
                await self.gates[body].wait()
            except asyncio.CancelledError:
                self.cancelled.append(body)
                raise
        if body == b"bad":
            raise InvalidArgument("bad body")
        return body[::-1]


async def serve(server_tls: TlsFiles, echo: Echo, port: int = 0, **options) -> Service:
    def register(server) -> None:
        server.add_generic_rpc_handlers((group_handler(echo.handle, service.draining,
                                                      **options),))

    service = Service(f"127.0.0.1:{port}", server_ssl_context(server_tls), register,
                      HealthServicer())
    await service.start()
    return service


class Client:
    """A GroupStream to `port` that counts the streams it opened."""

    def __init__(self, channel, max_age: float | None = None) -> None:
        self.channel = channel
        self.opened = 0
        self.stream = GroupStream(self._open, "echo", max_age=max_age)

    def _open(self):
        self.opened += 1
        return start_stream(self.channel)

    async def close(self) -> None:
        await self.stream.close()
        await self.channel.close()


async def test_groups_in_flight_together_are_answered_in_any_order_on_one_stream(tls, connect):
    echo = Echo()
    echo.gates[b"first"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port))
    try:
        first = asyncio.create_task(client.stream.send(b"first"))
        others = [asyncio.create_task(client.stream.send(f"g{n}".encode())) for n in range(20)]
        assert await asyncio.wait_for(asyncio.gather(*others), 10) == [
            f"g{n}".encode()[::-1] for n in range(20)]
        assert not first.done()
        echo.gates[b"first"].set()
        assert await asyncio.wait_for(first, 10) == b"tsrif"
        assert client.opened == 1
    finally:
        await client.close()
        await service.stop(0)


async def cancelled(send: asyncio.Task, how=asyncio.Task.cancel) -> None:
    how(send)
    with pytest.raises(asyncio.CancelledError):
        await send


async def answered_on_the_same_stream(client: Client) -> None:
    assert await asyncio.wait_for(client.stream.send(b"next"), 10) == b"txen"
    assert client.opened == 1


async def test_a_group_its_caller_gave_up_is_cancelled_at_the_server_and_the_stream_goes_on(
        tls, connect):
    echo = Echo()
    echo.gates[b"held"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port))
    try:
        held = asyncio.create_task(client.stream.send(b"held"))
        await until(lambda: b"held" in echo.seen, 10, "the server reading the group")
        await cancelled(held)
        await until(lambda: echo.cancelled == [b"held"], 10, "the server cancelling the group")
        assert client.stream.in_flight == 0
        await answered_on_the_same_stream(client)
    finally:
        await client.close()
        await service.stop(0)


async def test_a_group_cancelled_while_it_is_written_leaves_its_stream_whole(tls, connect):
    """grpc.aio cancels a whole call when a write on it is cancelled: a handler cancelled as
    a server cancels one (`cancel`) finishes its group's write first, so the other groups on
    the stream are not lost with it."""
    service = await serve(tls[0], Echo())
    client = Client(connect(tls[1], service.port))
    try:
        assert await asyncio.wait_for(client.stream.send(b"open"), 10) == b"nepo"
        writing = asyncio.create_task(client.stream.send(bytes(16 << 20)))
        await asyncio.sleep(0)  # one turn of the loop: the write has begun
        await cancelled(writing, cancel)
        await answered_on_the_same_stream(client)
    finally:
        await client.close()
        await service.stop(0)


async def serve_as_an_earlier_release(server_tls: TlsFiles, gate: asyncio.Event) -> Service:
    """A group stream server that does not know cancel frames (it says nothing of them, and
    ends the stream on one, as a release before them did): it answers each body reversed,
    b"held" once `gate` is set."""
    async def stream(request_iterator, context) -> None:
        async def answer(group_id: int, body: bytes) -> None:
            if body == b"held":
                await gate.wait()
            await context.write(frame(group_id, body[::-1]))

        answering = set()
        while (message := await context.read()) is not grpc.aio.EOF:
            try:
                group_id, body, _ = unframe(message)
            except ValueError as malformed:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(malformed))
            answering.add(asyncio.create_task(answer(group_id, bytes(body))))
        await asyncio.gather(*answering)

    def register(server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            STREAM: grpc.stream_stream_rpc_method_handler(stream)}),))

    service = Service("127.0.0.1:0", server_ssl_context(server_tls), register, HealthServicer())
    await service.start()
    return service


async def test_no_cancel_goes_to_a_server_that_did_not_say_it_reads_them(tls, connect):
    """During a rolling upgrade a new client meets a server of an earlier release."""
    gate = asyncio.Event()
    service = await serve_as_an_earlier_release(tls[0], gate)
    client = Client(connect(tls[1], service.port))
    try:
        held = asyncio.create_task(client.stream.send(b"held"))
        assert await asyncio.wait_for(client.stream.send(b"open"), 10) == b"nepo"
        await cancelled(held)
        await answered_on_the_same_stream(client)
        gate.set()
        await answered_on_the_same_stream(client)
    finally:
        gate.set()
        await client.close()
        await service.stop(0)


async def test_a_stream_past_its_max_age_is_replaced_and_still_answers_its_groups(tls, connect):
    echo = Echo()
    echo.gates[b"slow"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port), max_age=0.0)
    try:
        slow = asyncio.create_task(client.stream.send(b"slow"))
        await until(lambda: b"slow" in echo.seen, 10, "the server reading the group")
        assert await asyncio.wait_for(client.stream.send(b"next"), 10) == b"txen"
        assert client.opened == 2
        echo.gates[b"slow"].set()
        assert await asyncio.wait_for(slow, 10) == b"wols"
    finally:
        await client.close()
        await service.stop(0)


async def test_a_draining_server_answers_what_it_read_and_the_client_moves_on(tls, connect):
    echo = Echo()
    echo.gates[b"slow"] = asyncio.Event()
    service = await serve(tls[0], echo)
    port = service.port
    client = Client(connect(tls[1], port))
    try:
        slow = asyncio.create_task(client.stream.send(b"slow"))
        await until(lambda: b"slow" in echo.seen, 10, "the server reading the group")
        stopping = asyncio.create_task(service.stop(10))
        await asyncio.wait_for(service.draining.wait(), 10)
        echo.gates[b"slow"].set()
        assert await asyncio.wait_for(slow, 10) == b"wols"
        await asyncio.wait_for(stopping, 10)
        successor = await serve(tls[0], echo, port)
        try:
            assert await asyncio.wait_for(client.stream.send(b"next"), 10) == b"txen"
            assert client.opened == 2
        finally:
            await successor.stop(0)
    finally:
        await client.close()


async def test_a_group_its_stream_never_answered_goes_once_more_on_a_fresh_stream(tls, connect):
    """The first stream goes to a server that dies mid-group; the fresh one (as the mesh
    would pick another batcher) to a second server, which answers the group."""
    first_echo, second_echo = Echo(), Echo()
    first_echo.gates[b"lost"] = asyncio.Event()
    first, second = await serve(tls[0], first_echo), await serve(tls[0], second_echo)
    channels = [connect(tls[1], server.port) for server in (first, second)]
    opened = iter(channels)
    stream = GroupStream(lambda: start_stream(next(opened)), "echo")
    try:
        lost = asyncio.create_task(stream.send(b"lost"))
        await until(lambda: b"lost" in first_echo.seen, 10, "the first server reading the group")
        await first.stop(0)  # cancels the stream mid-group
        assert await asyncio.wait_for(lost, 10) == b"tsol"
        assert second_echo.seen == [b"lost"]
    finally:
        await stream.close()
        for channel in channels:
            await channel.close()
        await second.stop(0)


async def test_with_no_server_a_group_fails_unavailable(tls, connect):
    service = await serve(tls[0], Echo())
    port = service.port
    await service.stop(0)
    client = Client(connect(tls[1], port))
    try:
        with pytest.raises(StreamBroken) as broken:
            await asyncio.wait_for(client.stream.send(b"x"), 20)
        assert broken.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.opened == 2  # tried once more
    finally:
        await client.close()


async def test_an_answer_that_does_not_come_in_time_is_a_timeout_and_leaves_nothing(tls, connect):
    echo = Echo()
    echo.gates[b"never"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port))
    try:
        with pytest.raises(TimeoutError):
            await client.stream.send(b"never", timeout=0.2)
        assert client.stream.in_flight == 0
        # the server is told: no one waits for the answer now
        await until(lambda: echo.cancelled == [b"never"], 10, "the server cancelling the group")
        assert await asyncio.wait_for(client.stream.send(b"ok"), 10) == b"ko"
    finally:
        await client.close()
        await service.stop(0)


async def test_a_group_that_timed_out_leaves_no_garbage_cycle(tls, connect):
    """A timed-out group's future held its TimeoutError, whose traceback held the frame that
    held the future: a cycle keeping the group's bytes until the collector's next full pass
    (hundreds of them in an idle hop after a storm of deadlines)."""
    echo = Echo()
    echo.gates[b"never"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port))
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            with pytest.raises(TimeoutError):
                await client.stream.send(b"never", timeout=0.01)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cycled = [o for o in gc.garbage if isinstance(o, (asyncio.Future, TimeoutError))]
        assert cycled == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        echo.gates[b"never"].set()
        await client.close()
        await service.stop(0)


async def test_a_handler_error_ends_the_stream_with_its_status(tls, connect):
    service = await serve(tls[0], Echo())
    client = Client(connect(tls[1], service.port))
    try:
        with pytest.raises(StreamBroken) as broken:
            await asyncio.wait_for(client.stream.send(b"bad"), 10)
        assert broken.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert broken.value.details == "bad body"
        assert await asyncio.wait_for(client.stream.send(b"good"), 10) == b"doog"
    finally:
        await client.close()
        await service.stop(0)


async def test_a_message_without_its_id_is_invalid_argument(tls, connect):
    service = await serve(tls[0], Echo())
    channel = connect(tls[1], service.port)
    try:
        call = start_stream(channel)
        await call.write(b"\x0a\x03mlp")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(call.read(), 10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must start with its group_id" in failed.value.details()
    finally:
        await channel.close()
        await service.stop(0)


async def test_an_early_answer_reaches_the_caller_before_the_last_one(tls, connect):
    echo = Echo()
    echo.gates[b"early:rest"] = asyncio.Event()
    service = await serve(tls[0], echo)
    client = Client(connect(tls[1], service.port))
    heard: list[bytes] = []
    arrived = asyncio.Event()

    async def early(partial: bytes) -> None:
        heard.append(partial)
        arrived.set()

    try:
        last = asyncio.create_task(client.stream.send(b"early:rest", early=early))
        await asyncio.wait_for(arrived.wait(), 10)
        assert heard == [b"first part"] and not last.done()
        echo.gates[b"early:rest"].set()
        assert await asyncio.wait_for(last, 10) == b"tser:ylrae"
    finally:
        await client.close()
        await service.stop(0)


async def test_past_its_byte_budget_a_server_reads_no_further_until_answers_free_room(
        tls, connect):
    """Four gated groups of 256 KiB fill a 1 MiB budget: the server reads none of the eight
    groups behind them on the stream, and refuses a group sent in a unary call, naming the
    limit, until answers free room; then every group is answered."""
    echo = Echo()
    bodies = [bytes([n]) * (256 << 10) for n in range(12)]
    for body in bodies:
        echo.gates[body] = asyncio.Event()
    service = await serve(tls[0], echo, max_handling=1 << 20)
    client = Client(connect(tls[1], service.port))
    unary = secure_channel(f"127.0.0.1:{service.port}", tls[1], "batcher")
    infer = unary.unary_unary("/meshserve.v1.GroupInference/Infer")
    try:
        sent = [asyncio.create_task(client.stream.send(body)) for body in bodies]
        await until(lambda: len(echo.seen) >= 4, 10, "four groups read")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(b"small", timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at its limit of 1048576" in refused.value.details()
        assert len(echo.seen) == 4
        for body in bodies:
            echo.gates[body].set()
        answers = await asyncio.wait_for(asyncio.gather(*sent), 10)
        assert answers == [body[::-1] for body in bodies]
        assert await infer(b"small", timeout=10) == b"llams"
    finally:
        await unary.close()
        await client.close()
        await service.stop(0)
