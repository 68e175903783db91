"""The HTTP/REST path of the load generator: `meshserve bench run --protocol http`.

Closed loop over HTTP/1.1 keep-alive connections (HTTPS with `--ca`, mutual TLS with
`--cert/--key`), one connection per worker, one request outstanding on each. The model's
metadata is read once (`GET /v2/models/M`), one random request is built from it as the gRPC
path builds it (`random_request`), and its HTTP bytes (request line, headers, body) are
made once: the body carries the inputs as binary tensor data and asks for binary outputs
(`--encoding binary`, the default), or carries every tensor as JSON (`--encoding json`).
Each answer's JSON is parsed for its `model_version`. Errors are counted as `HTTP_<status>`
(or `UNAVAILABLE` for a broken connection, which the worker then reopens). The counting
window and the result are the gRPC path's (see `meshserve.tools.load`).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from urllib.parse import quote

import httptools
from google.protobuf import json_format

from meshserve.ingress.http_codec import encode_request
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.load_engine import Runner, run_sync
from meshserve.tools.load_results import summarize
from meshserve.tools.load_spec import LoadSpec, Part, shares_of
from meshserve.tools.random_requests import random_request

_REOPEN_BACKOFF_S = 0.01
_TIMEOUT_S = 30.0


def _client_ssl(spec: LoadSpec) -> ssl.SSLContext | None:
    if spec.ca is None:
        return None
    context = ssl.create_default_context(cafile=str(spec.ca))
    if spec.cert is not None:
        context.load_cert_chain(str(spec.cert), str(spec.key))
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Connection(asyncio.Protocol):
    """One keep-alive connection: `await call(data)` → (status, JSON header length, body)."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future | None = None
        self._body: list[bytes] = []
        self._header_length: int | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    def connection_lost(self, error) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {error}"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(ConnectionError(f"malformed response: {error}"))
            self._transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self._header_length = int(value)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = (self._parser.get_status_code(), self._header_length, b"".join(self._body))
        self._body, self._header_length = [], None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    async def call(self, data: bytes) -> tuple[int, int | None, bytes]:
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


async def _connect(spec: LoadSpec) -> _Connection:
    host, port = _host_port(spec.target)
    context = _client_ssl(spec)
    _, connection = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
        _Connection, host, port, ssl=context,
        server_hostname=(spec.server_name or host) if context else None), _TIMEOUT_S)
    return connection


def _model_path(spec: LoadSpec) -> str:
    path = f"/v2/models/{quote(spec.model, safe='')}"
    return path + (f"/versions/{quote(spec.version, safe='')}" if spec.version else "")


def http_request(spec: LoadSpec, method: str, path: str, body: bytes = b"",
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {spec.target}",
             f"content-length: {len(body)}",
             *(f"{name}: {value}" for name, value in (*headers, *spec.headers))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def infer_request(spec: LoadSpec, metadata: pb.ModelMetadataResponse) -> bytes:
    """The whole HTTP request of one inference, made once."""
    request, _ = random_request(metadata, spec.batch, model=spec.model, version=spec.version)
    body, header_length = encode_request(request, spec.encoding == "binary")
    headers = [("content-type", "application/json")]
    if header_length is not None:
        headers = [("content-type", "application/octet-stream"),
                   ("inference-header-content-length", str(header_length))]
    return http_request(spec, "POST", _model_path(spec) + "/infer", body, tuple(headers))


async def _metadata(connection: _Connection, spec: LoadSpec) -> pb.ModelMetadataResponse:
    status, _, body = await asyncio.wait_for(
        connection.call(http_request(spec, "GET", _model_path(spec))), _TIMEOUT_S)
    if status != 200:
        raise RuntimeError(f"GET {_model_path(spec)} at {spec.target} answered {status}: "
                           f"{body[:500].decode(errors='replace')}")
    return json_format.ParseDict(json.loads(body), pb.ModelMetadataResponse(),
                                 ignore_unknown_fields=True)


def model_version(header_length: int | None, body: bytes) -> str:
    header = body if header_length is None else body[:header_length]
    return json.loads(header).get("model_version", "")


class _Runner(Runner):
    """The gRPC path's closed loop and its counting; each worker on its own connection."""

    async def _unary_worker(self) -> None:
        connection = None
        try:
            while not self.closing:
                if connection is None:
                    try:
                        connection = await _connect(self.spec)
                    except (OSError, TimeoutError):
                        await asyncio.sleep(_REOPEN_BACKOFF_S)
                        continue
                sent = time.perf_counter()
                try:
                    status, header_length, body = await connection.call(self.request)
                except ConnectionError:
                    self.record(sent, time.perf_counter(), error="UNAVAILABLE")
                    connection.close()
                    connection = None
                    continue
                now = time.perf_counter()
                if status == 200:
                    self.record(sent, now, version=model_version(header_length, body))
                else:
                    self.record(sent, now, error=f"HTTP_{status}")
        finally:
            if connection is not None:
                connection.close()


async def _run(spec: LoadSpec) -> Part:
    connection = await _connect(spec)
    try:
        metadata = await _metadata(connection, spec)
    finally:
        connection.close()
    [share] = shares_of(spec)
    return await _Runner(spec, share, None, infer_request(spec, metadata)).run()


def run_load(spec: LoadSpec) -> dict:
    """Closed-loop HTTP load in this process; the result has the gRPC path's fields."""
    if spec.open_loop or spec.stream or spec.processes != 1:
        raise ValueError("--protocol http runs a closed loop (--concurrency) in one process; "
                         "--rate, --stream and --processes are for gRPC")
    return summarize(spec, [run_sync(_run, spec)])
