"""The ingress's HTTP/REST port, in process over real TLS sockets, with its real gate (policy,
tokens, rate limits) and no router behind it: every refusal's status, headers and body, and
the limits that refuse a body without buffering what it claims."""

import asyncio
import gzip
import json
import ssl
import time
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest

from meshserve.common.metrics import Metrics
from meshserve.common.tls import TlsFiles
from meshserve.ingress.async_service import AsyncSettings
from meshserve.ingress.http_api import HttpSettings
from meshserve.ingress.http_server import HttpLimits
from meshserve.ingress.service import IngressSettings, build_service
from meshserve.ingress.tokens import jwks_document, key_id, sign
from meshserve.tools.certs import init_certs, rotate_certs
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec
from meshserve.tools.tokens import claims_for

CONFIG = """name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
POLICY = """
rules:
  - principals: [client/developer]
    actions: [admin]
  - principals: ["app/*"]
    actions: [infer, models:read]
    models: [mlp]
limits:
  principals:
    app/limited: {rate: 0.001, burst: 1}
"""
KEY = Ed25519PrivateKey.generate()
MAX_BODY = 1 << 20
READ_TIMEOUT_S = 0.5
MAX_UNFINISHED = 3 * MAX_BODY // 2  # bodies still arriving, all connections


def token(subject: str) -> str:
    return sign(claims_for(subject, 3600, time.time()), KEY, key_id(KEY.public_key()))


def infer_body(rows: int = 1, width: int = 4) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32",
                                   "shape": [rows, width], "data": [0.5] * rows * width}]
                       }).encode()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http")
    init_certs(root / "tls")
    init_certs(root / "other")  # another CA
    (root / "models" / "mlp" / "1").mkdir(parents=True)
    (root / "models" / "mlp" / "config.pbtxt").write_text(CONFIG)
    (root / "policy.yaml").write_text(POLICY)
    (root / "jwks.json").write_text(jwks_document([KEY.public_key()]))
    return root


@pytest.fixture
async def ingress(files):
    """An ingress with HTTP on; its router address refuses connections."""
    metrics = Metrics()
    settings = IngressSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(files / "tls", "ingress"),
        repository=files / "models", router="127.0.0.1:1", require_client_cert=True,
        token_listen="127.0.0.1:0", policy=files / "policy.yaml", jwks=str(files / "jwks.json"),
        asynchronous=AsyncSettings(files / "async.db"),
        http=HttpSettings("127.0.0.1:0", files / "http.port",
                          HttpLimits(max_body_bytes=MAX_BODY, max_header_bytes=8192,
                                     read_timeout=READ_TIMEOUT_S,
                                     max_unfinished_bytes=MAX_UNFINISHED)))
    (files / "http.port").unlink(missing_ok=True)
    service = build_service(settings, metrics)
    await service.start()
    try:
        for _ in range(500):
            if (files / "http.port").exists():
                break
            await asyncio.sleep(0.01)
        yield int((files / "http.port").read_text()), metrics
    finally:
        await service.stop(0.5)


def client_context(files: Path, certificate: str | None = "client", ca: str = "tls"):
    context = ssl.create_default_context(cafile=str(files / "tls" / "ca.crt"))
    if certificate:
        context.load_cert_chain(files / ca / f"{certificate}.crt",
                                files / ca / f"{certificate}.key")
    return context


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value
               for name, value in (line.split(": ", 1) for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


async def exchange(port: int, context, raw: bytes, answers: int = 1):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(raw)
        await writer.drain()
        return [await read_response(reader) for _ in range(answers)]
    finally:
        writer.close()


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: ingress", f"content-length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def call(port, context, method, path, body=b"", headers=None):
    [answer] = await exchange(port, context, request(method, path, body, headers))
    return answer


async def test_health_needs_no_credentials_and_says_not_ready_without_a_router(files, ingress):
    port, _ = ingress
    anonymous = client_context(files, certificate=None)
    assert (await call(port, anonymous, "GET", "/v2/health/live"))[0] == 200
    assert (await call(port, anonymous, "GET", "/v2/health/ready"))[0] == 400


NO_CREDENTIALS = ("no credentials: present a client certificate on the mutual-TLS port or "
                  "send 'authorization: Bearer <token>'")


@pytest.mark.parametrize(("who", "method", "path", "body", "status", "message"), [
    (None, "GET", "/v2/models/mlp", b"", 401, NO_CREDENTIALS),
    ("Bearer x.y", "GET", "/v2/models/mlp", b"", 401,
     "bearer token is malformed: expected three dot-separated parts"),
    ("Basic dXNlcg==", "GET", "/v2", b"", 401, "authorization metadata must be 'Bearer <token>'"),
    ("app/a", "GET", "/v2/models/cnn", b"", 403, "'app/a' may not models:read model 'cnn'"),
    ("app/a", "POST", "/v2/models/other/infer", infer_body(), 403,
     "'app/a' may not infer model 'other'"),
    ("client", "GET", "/v2/models/cnn", b"", 404, "unknown model 'cnn'"),
    ("client", "GET", "/v2/models/mlp/versions/7", b"", 404, None),
    ("client", "GET", "/v2/nothing", b"", 404, "no route for GET /v2/nothing"),
    ("client", "POST", "/v2/models/mlp/infer", b"{oops", 400,
     "request body is not valid JSON: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    ("client", "POST", "/v2/models/mlp/infer", infer_body(width=3), 400,
     "input 'INPUT__0' has shape [1, 3]; model 'mlp' expects [-1, 4] with batch size 1 to 8"),
    ("client", "POST", "/v2/models/mlp/infer", infer_body(rows=9), 400,
     "input 'INPUT__0' has batch size 9; max_batch_size of model 'mlp' is 8"),
    ("app/a", "POST", "/v2/models/mlp/infer", infer_body(), 503, None),
    ("app/a", "GET", "/v2/logging", b"", 403,
     "'app/a' may not read or change the log settings (the policy's 'admin' on model '*')"),
    ("app/a", "POST", "/v2/logging", b'{"log_verbose_level": 1}', 403, None),
    ("client", "POST", "/v2/logging", b"[1]", 400,
     'the log settings take a JSON object of settings, such as {"log_verbose_level": 1}'),
    ("client", "POST", "/v2/logging", b'{"log_info": "yes"}', 400,
     "log setting 'log_info' takes true or false, not 'yes'"),
    ("app/a", "GET", "/v2/models/mlp/trace/setting", b"", 403,
     "'app/a' may not read or change the trace settings of model 'mlp' (the policy's 'admin' "
     "on model 'mlp')"),
    ("client", "POST", "/v2/trace/setting", b'{"trace_rate": 5}', 400,
     "trace setting 'trace_rate' takes a string, a list of strings or null, not 5"),
    ("client", "GET", "/v2/models/cnn/trace/setting", b"", 404, "unknown model 'cnn'"),
])
async def test_refusals(files, ingress, who, method, path, body, status, message):
    port, _ = ingress
    headers = {}
    context = client_context(files, certificate=None)
    if who == "client":
        context = client_context(files)
    elif who and " " in who:
        headers["authorization"] = who
    elif who:
        headers["authorization"] = f"Bearer {token(who)}"
    got, response_headers, answer = await call(port, context, method, path, body, headers)
    assert got == status, answer
    assert response_headers["content-type"] == "application/json"
    error = json.loads(answer)["error"]
    if message is not None:
        assert error == message
    if status == 401:  # the challenge's error attributes: test_the_challenge_names_...
        assert response_headers["www-authenticate"].startswith('Bearer realm="meshserve"')


YEAR_S = 365 * 86400


def signed(subject: str = "app/a", ttl: float = 3600, issued: float | None = None,
           **options) -> str:
    claims = claims_for(subject, ttl, time.time() if issued is None else issued, **options)
    return sign(claims, KEY, key_id(KEY.public_key()))


def invalid(kind: str, message: str) -> str:
    return f'Bearer realm="meshserve", error="{kind}", error_description="{message}"'


@pytest.mark.parametrize(("authorization", "path", "status", "challenge"), [
    # no token sent: the scheme alone (RFC 6750 §3.1), whatever the port's other refusals
    (None, "/v2/models/mlp", 401, 'Bearer realm="meshserve"'),
    ("Basic dXNlcg==", "/v2/models/mlp", 401, 'Bearer realm="meshserve"'),
    # a token sent and refused
    ("Bearer x.y", "/v2/models/mlp", 401, invalid(
        "invalid_token", "bearer token is malformed: expected three dot-separated parts")),
    (f"Bearer {signed(issued=time.time() - 7200)}", "/v2/models/mlp", 401,
     invalid("invalid_token", "bearer token has expired")),
    (f"Bearer {signed(ttl=100 * YEAR_S)}", "/v2/models/mlp", 401, invalid(
        "invalid_token", "bearer token claim 'exp' is more than 365 days after its 'iat' (the "
                         "longest lifetime accepted)")),
    (f"Bearer {signed()}, {signed('app/b')}", "/v2/models/mlp", 401, invalid(
        "invalid_request", "authorization metadata must hold one 'Bearer <token>' and be sent "
                           "once")),
    # the token's own scope leaves the action out (app/* may read mlp): 403 with a challenge
    (f"Bearer {signed(scopes=['infer'])}", "/v2/models/mlp", 403, invalid(
        "insufficient_scope", "'app/a' may not models:read model 'mlp'")),
    # the policy refuses: 403 without one
    (f"Bearer {signed()}", "/v2/models/cnn", 403, None),
])
async def test_the_challenge_names_a_refused_token(files, ingress, authorization, path, status,
                                                   challenge):
    """A 401 for an expired, forged or century-long token said only `Bearer
    realm="meshserve"`, as for no token at all: a client could not tell that its token was
    refused, nor why."""
    port, _ = ingress
    headers = {"authorization": authorization} if authorization else {}
    got, response_headers, answer = await call(port, client_context(files, certificate=None),
                                               "GET", path, headers=headers)
    assert got == status, answer
    assert response_headers.get("www-authenticate") == challenge


async def test_a_wrong_method_is_405_naming_the_allowed_one(files, ingress):
    port, _ = ingress
    status, headers, body = await call(port, client_context(files), "GET",
                                       "/v2/models/mlp/infer")
    assert (status, headers["allow"]) == (405, "POST")
    assert json.loads(body) == {"error": "/v2/models/mlp/infer takes POST, not GET"}


async def test_head_is_served_as_get_and_named_where_get_is_allowed(files, ingress):
    port, _ = ingress
    raw = b"HEAD /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n" + request("GET", "/v2")
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(files))
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        status, _, body = await read_response(reader)  # the next answer, in step
        assert status == 200 and json.loads(body)["name"] == "meshserve"
    finally:
        writer.close()
    status, headers, body = await call(port, client_context(files), "POST", "/v2/models/mlp")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert json.loads(body) == {"error": "/v2/models/mlp takes GET, HEAD, not POST"}


async def test_the_log_settings_are_read_with_get_and_changed_with_post(files, ingress):
    """The ingress's own, as it started (INFO, JSON lines); a route of two methods names
    both when refused another."""
    port, _ = ingress
    status, _, body = await call(port, client_context(files), "GET", "/v2/logging")
    assert (status, json.loads(body)) == (200, {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True,
        "log_verbose_level": 0, "log_format": "json"})
    status, headers, body = await call(port, client_context(files), "PUT", "/v2/logging")
    assert (status, headers["allow"]) == (405, "GET, HEAD, POST")
    assert json.loads(body) == {"error": "/v2/logging takes GET, HEAD, POST, not PUT"}


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize(("body", "message"), [
    (gzip_of(infer_body())[:-8], "the gzip body does not decompress: it ends before its "
                                 "compressed stream does"),
    (gzip_of(infer_body())[:30], "the gzip body does not decompress: it ends before its "
                                 "compressed stream does"),
    (gzip_of(infer_body()) + b"GARBAGE", "the gzip body does not decompress: Error -3 while "
                                         "decompressing data: incorrect header check"),
    (zlib.compress(infer_body()) + b"x", "the deflate body does not decompress: 1 bytes "
                                         "follow its compressed stream"),
], ids=["no-trailer", "truncated", "garbage-after", "deflate-extra-byte"])
async def test_a_compressed_body_that_does_not_end_as_it_should_is_refused(
        files, ingress, body, message):
    port, _ = ingress
    encoding = "deflate" if message.startswith("the deflate") else "gzip"
    status, _, answer = await call(port, client_context(files), "POST", "/v2/models/mlp/infer",
                                   body, {"content-encoding": encoding})
    assert (status, json.loads(answer)) == (400, {"error": message})


async def test_a_gzip_body_of_two_members_is_read_whole(files, ingress):
    port, _ = ingress
    whole = infer_body()
    status, _, answer = await call(port, client_context(files), "POST", "/v2/models/mlp/infer",
                                   gzip_of(whole[:10]) + gzip_of(whole[10:]),
                                   {"content-encoding": "gzip"})
    assert status == 503, answer  # read and admitted; no router behind this ingress


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"inputs": [{"name": "INPUT__0", "datatype": "FP32", '
                                  b'"shape": [1, 4], "data": ' + b"[" * 50_000 + b"1"
                                  + b"]" * 50_000 + b"}]}"], ids=["body", "data"])
async def test_json_nested_past_what_can_be_read_is_refused(files, ingress, body):
    port, _ = ingress
    status, _, answer = await call(port, client_context(files), "POST", "/v2/models/mlp/infer",
                                   body)
    assert (status, json.loads(answer)) == (
        400, {"error": "request body nests JSON arrays or objects too deeply"})


async def test_a_count_in_other_than_ascii_digits_is_refused(files, ingress):
    port, _ = ingress
    body = b'{"inputs": []}'
    raw = request("POST", "/v2/models/mlp/infer", body).replace(
        b"\r\n\r\n", b"\r\ninference-header-content-length: \xb2\r\n\r\n", 1)
    [(status, _, answer)] = await exchange(port, client_context(files), raw)
    assert (status, json.loads(answer)) == (
        400, {"error": "Inference-Header-Content-Length must be a non-negative integer, "
                       "not '\xb2'"})
    status, _, answer = await call(port, client_context(files), "GET", "/v2/async/x?wait_ms=%C2%B2")
    assert status == 400, answer


async def test_rate_limit_is_429_with_retry_after(files, ingress):
    port, _ = ingress
    context = client_context(files, certificate=None)
    headers = {"authorization": f"Bearer {token('app/limited')}"}
    first = await call(port, context, "POST", "/v2/models/mlp/infer", infer_body(), headers)
    assert first[0] == 503  # admitted: the burst of 1; no router behind this ingress
    status, response_headers, body = await call(port, context, "POST", "/v2/models/mlp/infer",
                                                infer_body(), headers)
    assert status == 429
    assert json.loads(body)["error"].startswith(
        "rate limit of 0.001 requests/s for 'app/limited' reached; retry after ")
    assert int(response_headers["retry-after"]) >= 1
    assert int(response_headers["retry-after-ms"]) > 0


async def test_http_requests_are_counted_with_protocol_http(files, ingress):
    port, metrics = ingress
    await call(port, client_context(files), "POST", "/v2/models/mlp/infer", infer_body())
    text = generate_latest(metrics.registry).decode()
    assert ('nv_inference_request_failure{model="mlp",protocol="http",reason="UNAVAILABLE",'
            'version=""} 1.0') in text


@pytest.mark.parametrize(("body", "headers"), [
    (b"{not json", {}),
    (b'{"inputs": "none"}', {}),
    (gzip_of(infer_body())[:30], {"content-encoding": "gzip"}),
    (infer_body(), {"inference-header-content-length": "x"}),
], ids=["json", "inputs", "gzip", "header-length"])
async def test_an_infer_body_that_does_not_decode_is_counted_as_a_failure(
        files, ingress, body, headers):
    port, metrics = ingress
    series = ('nv_inference_request_failure{model="mlp",protocol="http",'
              'reason="INVALID_ARGUMENT",version=""} ')

    def failures() -> float:
        lines = generate_latest(metrics.registry).decode().splitlines()
        return next((float(line[len(series):]) for line in lines if line.startswith(series)),
                    0.0)

    before = failures()
    for _ in range(3):
        status, _, _ = await call(port, client_context(files), "POST", "/v2/models/mlp/infer",
                                  body, headers)
        assert status == 400
    assert failures() - before == 3


async def test_a_gigabyte_declared_body_is_refused_before_it_is_read(files, ingress):
    port, _ = ingress
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                  ssl=client_context(files))
    try:
        # Only the headers are sent: the answer cannot depend on reading the claimed body.
        writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\n"
                     b"content-length: 1073741824\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 413
        assert headers["connection"] == "close"
        assert json.loads(body) == {"error": f"request body of 1073741824 bytes is over the "
                                             f"limit of {MAX_BODY} bytes"}
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    finally:
        writer.close()


async def test_a_chunked_body_is_refused_once_it_passes_the_limit(files, ingress):
    port, _ = ingress
    chunk = b"x" * (256 << 10)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    [(status, _, body)] = await exchange(
        port, client_context(files),
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunks)
    assert status == 413
    assert json.loads(body) == {"error": f"request body is over the limit of {MAX_BODY} bytes"}


async def test_a_content_length_larger_than_the_body_times_out_with_408(files, ingress):
    port, _ = ingress
    [(status, _, body)] = await exchange(
        port, client_context(files),
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n{}")
    assert status == 408
    assert json.loads(body) == {"error": f"request not received in full: no bytes for "
                                         f"{READ_TIMEOUT_S:g} s; got 2 of 500 body bytes"}


async def test_bodies_still_arriving_past_the_servers_limit_get_503(files, ingress):
    """Two connections each send 800 KiB of a 1 MiB body: the one whose bytes take what the
    server holds for bodies still arriving past 1.5 MiB is answered 503 naming the limit and
    closed; the other, finished, is answered as any request (not that 503)."""
    port, _ = ingress
    head = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
            % MAX_BODY)
    connections = [await asyncio.open_connection("127.0.0.1", port, ssl=client_context(files))
                   for _ in range(2)]
    try:
        for _, writer in connections:
            writer.write(head + b" " * (800 << 10))
            await writer.drain()
        answers = [asyncio.ensure_future(read_response(reader)) for reader, _ in connections]
        done, _ = await asyncio.wait(answers, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, [answer.result()[:1] for answer in done]  # one refusal
        [refused] = [i for i, answer in enumerate(answers) if answer in done]
        status, headers, body = answers[refused].result()
        assert status == 503 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error.startswith("the server holds ") and error.endswith(
            f"bytes of request bodies still arriving or waiting their turn, past its limit "
            f"of {MAX_UNFINISHED}; "
            "send again later"), error
        survivor = 1 - refused
        connections[survivor][1].write(b" " * (MAX_BODY - (800 << 10)))
        status, _, body = await asyncio.wait_for(answers[survivor], 10)
        assert "still arriving" not in json.loads(body)["error"], body
    finally:
        for _, writer in connections:
            writer.close()


async def test_a_content_length_smaller_than_the_body_is_refused(files, ingress):
    port, _ = ingress
    body = infer_body()
    raw = request("POST", "/v2/models/mlp/infer", body)
    raw = raw.replace(f"content-length: {len(body)}".encode(), b"content-length: 20")
    [(first, _, answer), (second, headers, rest)] = await exchange(
        port, client_context(files), raw, answers=2)
    assert first == 400
    assert json.loads(answer)["error"].startswith("request body is not valid JSON")
    # What followed the declared length is not an HTTP request.
    assert second == 400 and headers["connection"] == "close"
    assert json.loads(rest)["error"].startswith("malformed HTTP request")


@pytest.mark.parametrize(("json_part", "binary", "header_length", "message"), [
    (b'{"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 4], '
     b'"parameters": {"binary_data_size": 16}}]}', b"\0" * 8, None,
     "input 'INPUT__0' claims binary_data_size 16; only 8 bytes of binary data remain in "
     "the body"),
    (b'{"inputs": []}', b"", 500, "Inference-Header-Content-Length is 500; the body holds 14 "
                                  "bytes"),
    (b'{"inputs": []}', b"", "x", "Inference-Header-Content-Length must be a non-negative "
                                  "integer, not 'x'"),
])
async def test_binary_claims_beyond_the_body_are_refused(files, ingress, json_part, binary,
                                                         header_length, message):
    port, _ = ingress
    length = len(json_part) if header_length is None else header_length
    status, _, body = await call(port, client_context(files), "POST", "/v2/models/mlp/infer",
                                 json_part + binary,
                                 {"inference-header-content-length": length})
    assert (status, json.loads(body)) == (400, {"error": message})


async def test_headers_over_the_limit_get_431(files, ingress):
    port, _ = ingress
    status, _, body = await call(port, client_context(files), "GET", "/v2",
                                 headers={"x-big": "y" * 9000})
    assert status == 431
    assert json.loads(body) == {"error": "request headers are over the limit of 8192 bytes"}


async def test_keep_alive_answers_pipelined_requests_in_order(files, ingress):
    port, _ = ingress
    answers = await exchange(port, client_context(files),
                             request("GET", "/v2/models/mlp") + request("GET", "/v2")
                             + request("GET", "/v2/models/mlp/config"), answers=3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[0][2])["inputs"] == [
        {"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 4]}]
    assert "binary_tensor_data" in json.loads(answers[1][2])["extensions"]
    assert json.loads(answers[2][2])["max_batch_size"] == 8


async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(files, ingress):
    port, _ = ingress
    # TLS 1.3: the client's handshake ends before the server checks the certificate, so the
    # refusal shows as an alert or a closed connection, never an answer.
    with pytest.raises((ssl.SSLError, asyncio.IncompleteReadError, ConnectionResetError)):
        await exchange(port, client_context(files, "client", ca="other"), request("GET", "/v2"))


async def test_async_submit_and_fetch(files, ingress):
    port, _ = ingress
    context = client_context(files)
    status, headers, body = await call(port, context, "POST", "/v2/models/mlp/infer/async",
                                       infer_body())
    assert status == 202
    submission = json.loads(body)["id"]
    assert headers["location"] == f"/v2/async/{submission}"
    # No router: the request waits for capacity, retried.
    status, _, body = await call(port, context, "GET", f"/v2/async/{submission}")
    assert status == 200
    assert json.loads(body)["state"] in ("PENDING", "RUNNING")
    status, _, body = await call(port, context, "POST", "/v2/models/mlp/infer/async",
                                 infer_body(width=3))
    assert status == 400  # validated at once, as the gRPC Submit does
    status, _, body = await call(port, context, "GET", "/v2/async/unknown")
    assert status == 404
    assert json.loads(body)["error"].startswith("no asynchronous request 'unknown'")



async def test_the_load_generator_counts_http_refusals(files, ingress):
    port, _ = ingress
    spec = LoadSpec(target=f"127.0.0.1:{port}", model="mlp", protocol="http", concurrency=2,
                    duration_s=60, warmup_s=0, max_requests=10, ca=files / "tls" / "ca.crt",
                    cert=files / "tls" / "client.crt", key=files / "tls" / "client.key")
    result = await asyncio.to_thread(run_load, spec)
    assert (result["requests"], result["errors"]) == (0, {"HTTP_503": 10})  # no router


async def test_a_rotated_certificate_is_served_to_the_next_connection(files, ingress):
    port, _ = ingress

    async def served() -> bytes:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(files))
        try:
            return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()

    before = await served()
    rotate_certs(files / "tls")
    after = await served()
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert((files / "tls" / "ingress.crt").read_text())
