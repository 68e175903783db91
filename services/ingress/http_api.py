"""HTTP/REST at the ingress, beside gRPC: the Open Inference Protocol's HTTP binding.

Every route decodes its request into the message the gRPC service takes and hands it to the
same handlers (`InferenceServicer`, `AsyncInferenceServicer`) with an `HttpCall` standing in
for the gRPC context, so validation, authentication and policy, quotas, priorities,
deadlines (the `timeout` parameter), pins (`x-model-version`), metrics (label
`protocol="http"`), traces (`traceparent`) and the access log are the gRPC path's. Answers
are encoded back (`http_codec`); errors become `{"error": ...}` with the matching status
(`http_errors`). The health endpoints, like grpc.health.v1, need no credentials.

`meshserve ingress ... --http-listen HOST:PORT [--http-port-file F] [--http-max-body-bytes N]
[--http-max-connections N]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs

import grpc
import httptools

from meshserve.common import runtime
from meshserve.common.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    ServingError,
    from_code,
)
from meshserve.common.forwarding import CODE_NAME
from meshserve.common.metrics import PROTOCOL
from meshserve.common.server import HealthServicer, internal_error_message
from meshserve.common.stream_answers import error_parts
from meshserve.common.tls import MAX_MESSAGE_BYTES, TlsFiles, server_ssl_context
from meshserve.common.trace_settings import json_document, sent_values
from meshserve.ingress.async_service import AsyncInferenceServicer
from meshserve.ingress.generate import generate_answer, generate_request
from meshserve.ingress.http_codec import (
    BINARY_DATA_OUTPUT,
    OutputEncoding,
    decode_infer,
    dump,
    encode_body,
    encode_infer,
    message_json,
    parse_json,
    response_coding,
)
from meshserve.ingress.http_errors import error_response
from meshserve.ingress.http_routes import Route, route
from meshserve.ingress.http_server import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    HttpServer,
    is_count,
)
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2 import (
    CancelRequest,
    ResultRequest,
    ResultResponse,
)

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"
MAX_WAIT_MS = 60_000
DRAIN_S = 5.0
NO_ASYNC = "the asynchronous API is not served here (start the ingress with --async-store)"


class HttpCall:
    """What the ingress's handlers and its gate read from a gRPC context, for one HTTP
    request: its headers as invocation metadata, the TLS client certificate as the auth
    context. An HTTP request has no deadline of its own (the `timeout` parameter bounds it)."""

    def __init__(self, request: HttpRequest) -> None:
        self._metadata = tuple(request.headers.items())
        self._certificate = request.certificate

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._certificate]} if self._certificate else {}

    def peer_identity_key(self) -> None:
        return None  # gRPC named no peer: the gate reads the certificate itself

    def time_remaining(self) -> float | None:
        return None


class HttpStreamCall(HttpCall):
    """A generate request served as a stream of one request: what the stream writes is
    queued in `answers`."""

    def __init__(self, request: HttpRequest) -> None:
        super().__init__(request)
        self.answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

    async def write(self, answer: pb.ModelStreamInferResponse) -> None:
        self.answers.put_nowait(answer)


def stream_failure(answer: pb.ModelStreamInferResponse) -> ServingError:
    """The error a stream's answer carries (`CODE: message`)."""
    return from_code(*error_parts(answer.error_message))


def event(answer: pb.ModelStreamInferResponse) -> bytes:
    """One Server-Sent Event of generate_stream: the generate answer object, or the error."""
    document = ({"error": answer.error_message} if answer.error_message
                else generate_answer(answer.infer_response))
    return b"data: " + dump(document) + b"\n\n"


async def events(first: pb.ModelStreamInferResponse | None,
                 rest: AsyncGenerator[pb.ModelStreamInferResponse, None]
                 ) -> AsyncGenerator[bytes, None]:
    try:
        if first is not None:
            yield event(first)
        async for answer in rest:
            yield event(answer)
    finally:
        await rest.aclose()


def json_response(document: object, binary: list[bytes] = (), status: int = 200,
                  headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """JSON, followed by raw tensor bytes when there are any (binary tensor data)."""
    header = dump(document)
    if not binary:
        return HttpResponse(status, header, headers=headers)
    return HttpResponse(status, b"".join([header, *binary]), "application/octet-stream",
                        ((HEADER_LENGTH, str(len(header))), *headers))


def compressed(response: HttpResponse, request: HttpRequest) -> HttpResponse:
    """The response with its body compressed in the coding the request accepts, as Triton
    sends inference answers (`Inference-Header-Content-Length` stays the JSON's length)."""
    coding = response_coding(request.headers.get("accept-encoding", ""))
    if not coding:
        return response
    return replace(response, body=encode_body(response.body, coding),
                   headers=(*response.headers, ("content-encoding", coding)))


def header_length(request: HttpRequest) -> int | None:
    text = request.headers.get(HEADER_LENGTH)
    if text is None:
        return None
    if not is_count(text.strip()):
        raise InvalidArgument(f"Inference-Header-Content-Length must be a non-negative "
                              f"integer, not '{text}'")
    return int(text)


def body_of(request: HttpRequest, limit: int) -> bytes:
    """The body, decompressed when sent with Content-Encoding gzip or deflate (at most
    `limit` bytes once decompressed)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return request.body
    if encoding not in ("gzip", "deflate"):
        raise InvalidArgument(f"Content-Encoding '{encoding}' is not supported (gzip, "
                              "deflate or identity)")
    parts: list[bytes] = []
    size = 0
    rest = request.body
    while rest:  # gzip: one member after another (RFC 1952 §2.2); deflate: one stream
        inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as error:
            raise InvalidArgument(f"the {encoding} body does not decompress: {error}") from None
        size += len(part)
        if size > limit:
            raise InvalidArgument(f"the {encoding} body decompresses to more than the limit "
                                  f"of {limit} bytes")
        if not inflater.eof:
            raise InvalidArgument(f"the {encoding} body does not decompress: it ends before "
                                  f"its compressed stream does")
        parts.append(part)
        rest = inflater.unused_data
        if rest and encoding != "gzip":
            raise InvalidArgument(f"the {encoding} body does not decompress: "
                                  f"{len(rest)} bytes follow its compressed stream")
    return b"".join(parts)


def flag(query: dict[str, list[str]], name: str) -> bool:
    value = query.get(name, ["false"])[-1].lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidArgument(f"query parameter '{name}' must be true or false")
    return value in ("true", "1")


def result_response(reply: ResultResponse, query) -> HttpResponse:
    """An asynchronous request's state as JSON: `{"id", "state"}`, with its `"response"`
    once DONE (`?binary_data_output=true`: outputs as binary tensor data), or the `"code"`
    and `"message"` it FAILED with."""
    document: dict = {"id": reply.id, "state": ResultResponse.State.Name(reply.state)}
    binary: list[bytes] = []
    if reply.state == ResultResponse.DONE:
        encoding = OutputEncoding(default=flag(query, BINARY_DATA_OUTPUT))
        document["response"], binary = encode_infer(reply.response, encoding)
    elif reply.state == ResultResponse.FAILED:
        document["code"] = CODE_NAME.get(reply.code, "UNKNOWN")
        document["message"] = reply.message
    return json_response(document, binary)


class HttpApi:
    """The routes. `inference` is the ingress's gRPC servicer, `asynchronous` that of the
    asynchronous API (None: not served)."""

    def __init__(self, inference, health: HealthServicer,
                 asynchronous: AsyncInferenceServicer | None = None,
                 max_body_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._inference = inference
        self._health = health
        self._async = asynchronous
        self._max_body = max_body_bytes

    async def handle(self, request: HttpRequest) -> HttpResponse:
        PROTOCOL.set("http")
        try:
            url = httptools.parse_url(request.target)
        except httptools.HttpParserInvalidURLError:
            return error_response(InvalidArgument(f"malformed request target "
                                                  f"{request.target[:200]!r}"))
        path = url.path.decode("latin-1")
        found = route(path)
        if found is None:
            return error_response(NotFound(f"no route for {request.method} {path}"))
        if found.unserved:  # a path of Triton's, of an extension not served here
            return error_response(from_code("UNIMPLEMENTED",
                                            f"{request.method} {path}: {found.unserved}"))
        # HEAD is served as GET; the server sends its answer without the body.
        method = "GET" if request.method == "HEAD" else request.method
        if method not in found.method.split():
            allowed = ", ".join("GET, HEAD" if name == "GET" else name
                                for name in found.method.split())
            return HttpResponse(405, dump({"error": f"{path} takes {allowed}, not "
                                                    f"{request.method}"}),
                                headers=(("allow", allowed),))
        query = parse_qs((url.query or b"").decode("latin-1"))
        try:
            return await getattr(self, found.name)(request, found, query)
        except ServingError as error:
            return error_response(error)
        except grpc.aio.AioRpcError as error:
            return error_response(from_code(error.code().name, error.details() or ""))
        except Exception as error:  # noqa: BLE001 — answered with a fixed message and an id
            return HttpResponse(500, dump({"error": internal_error_message(error)}))

    # --- server

    async def live(self, request, found, query) -> HttpResponse:
        return HttpResponse(200)

    async def ready(self, request, found, query) -> HttpResponse:
        return HttpResponse(200 if self._health.serving() else 400)

    async def server_metadata(self, request, found, query) -> HttpResponse:
        reply = await self._inference.ServerMetadata(pb.ServerMetadataRequest(),
                                                     HttpCall(request))
        document = message_json(reply)
        document["extensions"] = [*document["extensions"], BINARY_EXTENSION]
        return json_response(document)

    async def repository_index(self, request, found, query) -> HttpResponse:
        body = body_of(request, self._max_body)
        options = parse_json(body) if body.strip() else {}
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise InvalidArgument('the repository index takes {"ready": true|false}')
        reply = await self._inference.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=options.get("ready", False)), HttpCall(request))
        return json_response([message_json(model) for model in reply.models])

    async def log_settings(self, request, found, query) -> HttpResponse:
        """GET: the log settings; POST: a JSON object of the settings to change, answered
        with them all as they are then."""
        settings = self._inference.log_settings(HttpCall(request), lambda: self._sent(
            request, 'the log settings take a JSON object of settings, such as '
                     '{"log_verbose_level": 1}'))
        return json_response(settings.as_dict())

    async def trace_settings(self, request, found: Route, query) -> HttpResponse:
        """GET: the trace settings, global or of a model; POST: a JSON object of the settings
        to change (a string, a list of strings, or null each), answered with them all as
        they are then."""

        def updates() -> dict:
            sent = self._sent(request, 'the trace settings take a JSON object of settings, '
                                       'such as {"trace_rate": "100"}')
            return {name: sent_values(name, value) for name, value in sent.items()}

        settings = self._inference.trace_settings(HttpCall(request), found.model, updates)
        return json_response(json_document(settings))

    def _sent(self, request: HttpRequest, refusal: str) -> dict:
        """The settings a POST sends to change, as its JSON object (a GET: none);
        InvalidArgument `refusal` for a body that is JSON but not an object."""
        if request.method != "POST":
            return {}
        document = parse_json(body_of(request, self._max_body))
        if not isinstance(document, dict):
            raise InvalidArgument(refusal)
        return document

    # --- models

    async def model_metadata(self, request, found: Route, query) -> HttpResponse:
        reply = await self._inference.ModelMetadata(
            pb.ModelMetadataRequest(name=found.model, version=found.version), HttpCall(request))
        return json_response(message_json(reply))

    async def model_ready(self, request, found: Route, query) -> HttpResponse:
        """200, or 400 saying it is not ready; 404 naming a model or version the repository
        does not serve (as Triton answers; tritonclient.http reads both as not ready)."""
        if await self._inference.model_ready(
                pb.ModelReadyRequest(name=found.model, version=found.version),
                HttpCall(request)):
            return HttpResponse(200)
        version = f" version '{found.version}'" if found.version else ""
        return json_response({"error": f"model '{found.model}'{version} is not ready"},
                             status=400)

    async def model_config(self, request, found: Route, query) -> HttpResponse:
        reply = await self._inference.ModelConfig(
            pb.ModelConfigRequest(name=found.model, version=found.version), HttpCall(request))
        return json_response(message_json(reply.config))

    async def statistics(self, request, found: Route, query) -> HttpResponse:
        reply = await self._inference.ModelStatistics(
            pb.ModelStatisticsRequest(name=found.model, version=found.version),
            HttpCall(request))
        return json_response(message_json(reply))

    async def infer(self, request: HttpRequest, found: Route, query) -> HttpResponse:
        try:
            message, encoding = decode_infer(body_of(request, self._max_body),
                                             header_length(request), found.model,
                                             found.version)
        except ServingError as error:  # never a ModelInferRequest: counted here
            self._inference.refused(found.model, found.version, error)
            raise
        reply = await self._inference.ModelInfer(message, HttpCall(request))
        return compressed(json_response(*encode_infer(reply, encoding)), request)

    # --- Triton's generate extension

    async def generate(self, request: HttpRequest, found: Route, query) -> HttpResponse:
        """The model's one answer as a generate answer object; a model that answers other
        than once (a decoupled one) is refused, as in Triton: generate_stream carries each."""
        async with contextlib.aclosing(self._generated(request, found)) as generated:
            answers = [answer async for answer in generated]
        for answer in answers:
            if answer.error_message:
                raise stream_failure(answer)
        if len(answers) != 1:
            raise Internal(f"generate expects model '{found.model}' to answer once; it "
                           f"answered {len(answers)} times: generate_stream carries each "
                           "answer")
        return json_response(generate_answer(answers[0].infer_response))

    async def generate_stream(self, request: HttpRequest, found: Route,
                              query) -> HttpResponse:
        """Each answer as a Server-Sent Event (`data: {...}`) as the model sends it, an
        error as `data: {"error": ...}`; a request refused before any answer is answered
        with its error status, as by /infer."""
        answers = self._generated(request, found)
        try:
            first = await anext(answers, None)
        except BaseException:  # refused, or the client left: the request is given up now
            await answers.aclose()
            raise
        if first is not None and first.error_message:
            await answers.aclose()
            raise stream_failure(first)
        return HttpResponse(200, content_type="text/event-stream; charset=utf-8",
                            stream=events(first, answers))

    async def _generated(self, request: HttpRequest,
                         found: Route) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
        """The answers to a generate request, served as a stream of one request
        (ModelStreamInfer: each answer of a decoupled model as it comes), until the last."""
        call = HttpStreamCall(request)
        try:
            config = self._inference.config_of(found.model, found.version, call)
            message = generate_request(parse_json(body_of(request, self._max_body)), config,
                                       found.version)
        except ServingError as error:  # never a ModelInferRequest: counted here
            self._inference.refused(found.model, found.version, error)
            raise

        async def requests():
            yield message

        served = asyncio.ensure_future(self._inference.ModelStreamInfer(requests(), call))
        served.add_done_callback(lambda _: call.answers.put_nowait(None))
        try:
            while (answer := await call.answers.get()) is not None:
                yield answer
            served.result()
        finally:
            served.cancel()

    # --- the asynchronous API

    async def submit(self, request: HttpRequest, found: Route, query) -> HttpResponse:
        if self._async is None:
            raise NotFound(NO_ASYNC)
        message, _ = decode_infer(body_of(request, self._max_body), header_length(request),
                                  found.model, found.version)
        reply = await self._async.Submit(message, HttpCall(request))
        return json_response({"id": reply.id}, status=202,
                             headers=(("location", f"/v2/async/{reply.id}"),))

    async def result(self, request: HttpRequest, found: Route, query) -> HttpResponse:
        """`?wait_ms=N` waits up to N ms (at most a minute) for the request to finish;
        `?binary_data_output=true` sends a result's outputs as binary tensor data."""
        if self._async is None:
            raise NotFound(NO_ASYNC)
        wait = query.get("wait_ms", ["0"])[-1]
        if not is_count(wait):
            raise InvalidArgument(f"query parameter 'wait_ms' must be a non-negative integer, "
                                  f"not '{wait}'")
        reply = await self._async.Result(
            ResultRequest(id=found.id, wait_ms=min(int(wait), MAX_WAIT_MS)), HttpCall(request))
        return result_response(reply, query)

    async def cancel(self, request: HttpRequest, found: Route, query) -> HttpResponse:
        """The request given up (if it had not finished): its state after, as `result`."""
        if self._async is None:
            raise NotFound(NO_ASYNC)
        reply = await self._async.Cancel(CancelRequest(id=found.id), HttpCall(request))
        return result_response(reply, query)


# --- wiring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSettings:
    listen: str
    port_file: Path | None = None
    limits: HttpLimits = HttpLimits()


def add_http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-listen", default="", metavar="HOST:PORT",
                        help="also serve the Open Inference Protocol over HTTP/REST (HTTPS) "
                             "here (port 0 picks a free port; empty: not served)")
    parser.add_argument("--http-port-file", type=Path,
                        help="write the bound --http-listen port here once serving")
    parser.add_argument("--http-max-body-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help="largest HTTP request body; a larger one is refused with 413 "
                             "before it is read")
    parser.add_argument("--http-max-connections", type=int,
                        default=HttpLimits.max_connections,
                        help="HTTP connections open at once; one more is answered 503 and "
                             "closed")


def http_settings(args: argparse.Namespace) -> HttpSettings | None:
    if not args.http_listen:
        return None
    if args.http_max_body_bytes < 1:
        raise SystemExit("--http-max-body-bytes must be >= 1")
    if args.http_max_connections < 1:
        raise SystemExit("--http-max-connections must be >= 1")
    return HttpSettings(args.http_listen, args.http_port_file,
                        HttpLimits(max_body_bytes=args.http_max_body_bytes,
                                   max_connections=args.http_max_connections))


def build_http(settings: HttpSettings | None, tls: TlsFiles, require_client_cert: bool,
               inference, health: HealthServicer, asynchronous, gate) -> list:
    """The background task that serves HTTP/REST until the service stops (none when not
    configured). Clients are asked for a certificate (required when `require_client_cert`,
    else optional, so token callers can connect too)."""
    if settings is None:
        return []
    async_servicer = (None if asynchronous is None
                      else AsyncInferenceServicer(asynchronous, gate))
    api = HttpApi(inference, health, async_servicer, settings.limits.max_body_bytes)
    server = HttpServer(api.handle, settings.listen,
                        server_ssl_context(tls, require_client_cert, "http/1.1"), settings.limits)

    async def serve() -> None:
        port = await server.start()
        log.info("HTTP/REST on port %d", port)
        runtime.write_port_file(settings.port_file, port)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(DRAIN_S)

    return [serve]
