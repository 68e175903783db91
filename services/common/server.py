"""The pieces every service's gRPC server shares: handlers guarded once (errors, callers),
health, start/stop."""

import asyncio
import inspect
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterable

import grpc

from meshserve.common.errors import ServingError
from meshserve.common.http2_server import Admit, Http2Server, Unserved, undecodable
from meshserve.common.identity import HEALTH_PREFIX, CallerCheck, Callers
from meshserve.common.liveness import bounded
from meshserve.common.tls import server_options
from meshserve.protocol import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

# Never share a port with another process that happens to bind the same one. gRPC core
# cancels calls beyond 1,000 waiting for the handler (status CANCELLED, no message): a burst
# of 2,500 calls had ~17 % cancelled that way. Let them reach the handler, which refuses clearly.
SERVER_OPTIONS = [*server_options(), ("grpc.so_reuseport", 0),
                  ("grpc.server.max_pending_requests", 20_000),
                  ("grpc.server.max_pending_requests_hard_limit", 40_000)]
# Trailing metadata of a refusal: milliseconds after which a retry may succeed.
RETRY_AFTER_MS = "retry-after-ms"


def status_of(error: ServingError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def internal_error_message(error: BaseException) -> str:
    """Log an unexpected error under a fresh id; the caller sees only the id."""
    error_id = secrets.token_hex(6)
    log.error("internal error %s", error_id, exc_info=error)
    return f"internal error (id {error_id})"


def admission(callers: Callers | None) -> Admit | None:
    """The server's check of each call's caller, as its headers arrive (before any of its
    request is read or parsed): PERMISSION_DENIED naming the caller's identity and those
    allowed, unless it is one of `callers` (None: anyone) or calls `grpc.health.v1`."""
    if callers is None:
        return None
    check = CallerCheck(callers)

    def admit(method: str, context) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(HEALTH_PREFIX):
            return None
        refused = check.refusal(context)
        return None if refused is None else (grpc.StatusCode.PERMISSION_DENIED, refused)

    return admit


class GuardedServer:
    """The server as services register on it: every handler is wrapped, as it is added, in
    the one place where domain errors become gRPC statuses (no interceptor runs per call).

    ServingError → its status and message; a method of the protocol that the service does not
    serve (the generated servicer's NotImplementedError) → UNIMPLEMENTED naming it; anything
    else → INTERNAL with a fixed message and an id that is logged with the stack trace.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def guard(self, method: str, handler: grpc.RpcMethodHandler | None):
        if handler is None:
            return None
        return _wrap(handler, method)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Guarded(h, self) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """Registers nothing: the generated `add_*_to_server` adds the same handlers as a
        generic handler too, which serves every call. A registered method keeps a call
        request of its own open in gRPC's asyncio server, and the server waits on all of them
        for every call it accepts: with the ingress's 14 methods registered, a bare unary call
        cost 3 % more server CPU (24 methods: 10 %)."""

    def __getattr__(self, name: str):
        return getattr(self._server, name)


class _Guarded(grpc.GenericRpcHandler):
    """A generic handler whose handlers come wrapped (once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, server: GuardedServer) -> None:
        self._inner = inner
        self._server = server
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._wrapped.get(method)
        if handler is None:
            handler = self._server.guard(method, self._inner.service(handler_call_details))
            if handler is not None:  # unknown names stay uncached: callers choose them
                self._wrapped[method] = handler
        return handler


def retry_metadata(error: ServingError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata `retry-after-ms` for an error that carries a retry hint."""
    if error.retry_after is None:
        return ()
    return ((RETRY_AFTER_MS, str(max(1, round(error.retry_after * 1000)))),)


# The most of a status message that goes back, in UTF-8 bytes. The message travels in a
# header (percent-encoded), and gRPC clients drop an answer whose headers pass 8 KiB: a model
# or input name thousands of characters long, echoed back, turned NOT_FOUND into
# RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit").
MAX_DETAILS_BYTES = 1024


def status_details(message: str) -> str:
    """`message`, cut to MAX_DETAILS_BYTES and marked "…" where it was cut."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return data[:MAX_DETAILS_BYTES - 3].decode(errors="ignore") + "…"


async def abort_with(context: grpc.aio.ServicerContext, error: Exception,
                     method: str = "") -> None:
    if isinstance(error, ServingError):
        await context.abort(status_of(error), status_details(error.message),
                            retry_metadata(error))
    if isinstance(error, NotImplementedError) and method:
        # A method of the service's protocol that this server does not serve: the generated
        # servicer's default raises it (for the batcher's or compute's ModelMetadata, say).
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"method {method} is not served by this server")
    await context.abort(grpc.StatusCode.INTERNAL, internal_error_message(error))


class Undecodable:
    """Request bytes that do not parse as the method's message. The guard answers them
    INVALID_ARGUMENT (left to gRPC, they got UNKNOWN naming the parser's exception class)."""

    def __init__(self, error: Exception) -> None:
        self.message = undecodable(error)


def _decoding(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 — answered by the guard
            return Undecodable(error)

    return decode


def _guard(behavior, method: str):
    async def guarded(request, context):
        try:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 — mapped to a status here
            await abort_with(context, error, method)

    return guarded


def _guard_stream(behavior, method: str):
    async def guarded(request_or_iterator, context):
        try:
            if isinstance(request_or_iterator, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    request_or_iterator.message)
            async for response in behavior(request_or_iterator, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 — mapped to a status here
            await abort_with(context, error, method)

    return guarded


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    codec = (handler.request_deserializer, handler.response_serializer)
    # One request message: an undecodable one reaches the guard, which refuses it clearly.
    single = (_decoding(handler.request_deserializer), handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _guard(handler.unary_unary, method), *single)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _guard(handler.stream_unary, method), *codec)
    if handler.stream_stream:
        # A generator answers by yielding; a coroutine reads and writes on its context.
        guard = _guard_stream if inspect.isasyncgenfunction(handler.stream_stream) else _guard
        return grpc.stream_stream_rpc_method_handler(
            guard(handler.stream_stream, method), *codec)
    return grpc.unary_stream_rpc_method_handler(
        _guard_stream(handler.unary_stream, method), *single)


HealthCheckResponse = health_pb2.HealthCheckResponse
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
UNKNOWN_SERVICE = HealthCheckResponse(status=HealthCheckResponse.SERVICE_UNKNOWN)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" is the whole server; other names are registered services.

    Readiness means "can serve now"; the service flips it with `set`, saying why when it will
    not serve by itself (`reason`, carried beside NOT_SERVING). `close` (the server is
    stopping) reports NOT_SERVING and ends every Watch stream, so that a stopping server's
    grace is not spent waiting on watchers that never hang up.
    """

    def __init__(self, services: Iterable[str] = ()) -> None:
        self._status = {name: HealthCheckResponse(status=NOT_SERVING)
                        for name in ("", *services)}
        self._changed = asyncio.Event()
        self.closed = False

    def set(self, serving: bool, service: str = "", reason: str = "") -> None:
        """`reason`: why it is not serving (its first REASON_LIMIT characters); not told
        while serving."""
        answer = (HealthCheckResponse(status=SERVING) if serving else
                  HealthCheckResponse(status=NOT_SERVING, reason=bounded(reason)))
        if self._status.get(service) != answer:
            self._status[service] = answer
            self._changed.set()
            self._changed = asyncio.Event()

    def set_all(self, serving: bool) -> None:
        for name in list(self._status):
            self.set(serving, name)

    def close(self) -> None:
        self.closed = True
        self.set_all(False)
        self._changed.set()  # wakes every watcher, which then ends
        self._changed = asyncio.Event()

    def serving(self, service: str = "") -> bool:
        return self.answer(service).status == SERVING

    def answer(self, service: str = "") -> HealthCheckResponse:
        """What a Check of `service` answers."""
        return self._status.get(service, UNKNOWN_SERVICE)

    async def Check(self, request, context):
        answer = self.answer(request.service)
        if answer.status == HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown health service '{request.service}'")
        return answer

    async def Watch(self, request, context):
        last = None
        while True:
            # Taken before the answer is read: a change while the answer is being sent is
            # told next, not missed.
            changed = self._changed
            answer = self.answer(request.service)
            if answer != last:
                last = answer
                yield answer
            if self.closed:
                return
            await changed.wait()


# What stopping waits, beyond the grace of in-flight calls, for each step to finish: a stop
# never hangs on a step that does not end (it logs which one and goes on).
STOP_SLACK_S = 5.0


async def _within(step: Awaitable[object], seconds: float, what: str) -> None:
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("stopping: %s did not finish within %.1f s; going on", what, seconds)


class Service:
    """A started-on-demand gRPC server (meshserve.common.http2_server): `await start()`
    returns the bound port."""

    def __init__(self, address: str, credentials: ssl.SSLContext,
                 register: Callable[[grpc.aio.Server], None], health: HealthServicer,
                 background: Iterable[Callable[[], Awaitable[object]]] = (),
                 cleanup: Iterable[Callable[[], Awaitable[object]]] = (),
                 callers: Callers | None = None,
                 extra_ports: Iterable[tuple[str, ssl.SSLContext]] = (),
                 unserved: Unserved | None = None) -> None:
        # credentials: the port's TLS (meshserve.common.http2_server.server_ssl_context).
        # callers: the identities allowed to call (health checks aside); None: any.
        # unserved: told of each call that ends before its handler ran (Http2Server's).
        # extra_ports: more (address, credentials) listeners; their bound ports, in order,
        # are `extra_bound` once started.
        self.address = address
        self.extra_ports = list(extra_ports)
        self.extra_bound: list[int] = []
        self.callers = callers
        self.unserved = unserved
        self.health = health
        self._credentials = credentials
        self._register = register
        self._background_factories = list(background)
        self._cleanup = list(cleanup)
        self._tasks: list[asyncio.Task] = []
        # Set when stopping: open group streams are told to move to another server.
        self.draining = asyncio.Event()
        self.server: Http2Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        self.server = Http2Server(options=SERVER_OPTIONS, admit=admission(self.callers),
                                  unserved=self.unserved)
        guarded = GuardedServer(self.server)
        self._register(guarded)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, guarded)
        self.port = self.server.add_secure_port(self.address, self._credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.address}")
        self.extra_bound = []
        for address, credentials in self.extra_ports:
            bound = self.server.add_secure_port(address, credentials)
            if bound == 0:
                raise OSError(f"could not bind {address}")
            self.extra_bound.append(bound)
        await self.server.start()
        self._tasks = [asyncio.create_task(factory()) for factory in self._background_factories]
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Report not-ready, stop accepting, let in-flight calls finish within `grace`."""
        self.health.close()
        self.draining.set()
        if self.server is not None:
            await _within(self.server.stop(grace), grace + STOP_SLACK_S, "the gRPC server")
        for task in self._tasks:
            task.cancel()
        await _within(asyncio.gather(*self._tasks, return_exceptions=True), STOP_SLACK_S,
                      "the background tasks")
        for close in self._cleanup:
            await _within(close(), STOP_SLACK_S, getattr(close, "__qualname__", "a cleanup"))

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
