"""HTTP/REST paths to routes, and the one table from status codes to HTTP statuses."""

import json

import pytest

from meshserve.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from meshserve.ingress.auth import InsufficientScope, MalformedAuthorization
from meshserve.ingress.http_errors import MAX_DESCRIPTION, description, error_response
from meshserve.ingress.http_routes import Route, route
from meshserve.ingress.tokens import InvalidToken


@pytest.mark.parametrize(("path", "expected"), [
    ("/v2", Route("server_metadata", "GET")),
    ("/v2/", Route("server_metadata", "GET")),
    ("/v2/health/live", Route("live", "GET")),
    ("/v2/health/ready", Route("ready", "GET")),
    ("/v2/models/stats", Route("statistics", "GET")),
    ("/v2/repository/index", Route("repository_index", "POST")),
    ("/v2/models/mlp", Route("model_metadata", "GET", model="mlp")),
    ("/v2/models/mlp/versions/2", Route("model_metadata", "GET", model="mlp", version="2")),
    ("/v2/models/mlp/ready", Route("model_ready", "GET", model="mlp")),
    ("/v2/models/mlp/versions/1/config", Route("model_config", "GET", model="mlp",
                                               version="1")),
    ("/v2/models/mlp/stats", Route("statistics", "GET", model="mlp")),
    ("/v2/models/a%2Fb/infer", Route("infer", "POST", model="a/b")),
    ("/v2/models/mlp/versions/2/infer", Route("infer", "POST", model="mlp", version="2")),
    ("/v2/models/mlp/infer/async", Route("submit", "POST", model="mlp")),
    ("/v2/async/abc123", Route("result", "GET", id="abc123")),
    ("/v2/async/abc123/cancel", Route("cancel", "POST", id="abc123")),
    ("/v2/logging", Route("log_settings", "GET POST")),
    ("/v2/trace/setting", Route("trace_settings", "GET POST")),
    ("/v2/models/mlp/trace/setting", Route("trace_settings", "GET POST", model="mlp")),
    ("/v2/models/mlp/versions/1/trace/setting", None),
    ("/v2/async//cancel", None),
    ("/v2/async/abc123/stop", None),
    ("/v2/models", None),
    ("/v2/models//infer", None),
    ("/v2/models/mlp/versions//infer", None),
    ("/v2/models/mlp/versions", None),
    ("/v2/models/mlp/explain", None),
    ("/v1/models/mlp", None),
    ("/", None),
])
def test_routes(path, expected):
    assert route(path) == expected


@pytest.mark.parametrize(("path", "extension"), [
    ("/v2/repository/models/mlp/load", "model_repository"),
    ("/v2/repository/models/mlp/unload", "model_repository"),
    ("/v2/systemsharedmemory/status", "system_shared_memory"),
    ("/v2/systemsharedmemory/region/r/register", "system_shared_memory"),
    ("/v2/systemsharedmemory/unregister", "system_shared_memory"),
    ("/v2/cudasharedmemory/region/r/status", "cuda_shared_memory"),
    ("/v2/cudasharedmemory/region/r/register", "cuda_shared_memory"),
])
def test_paths_of_extensions_not_served_say_which(path, extension):
    """Answered 501 naming the extension (as gRPC answers UNIMPLEMENTED), not 404."""
    found = route(path)
    assert found.name == "unserved"
    assert f"(Triton's {extension} extension)" in found.unserved



@pytest.mark.parametrize(("error", "status"), [
    (InvalidArgument("bad"), 400),
    (Unauthenticated("who"), 401),
    (PermissionDenied("no"), 403),
    (NotFound("none"), 404),
    (ResourceExhausted("full"), 429),
    (Unavailable("down"), 503),
    (DeadlineExceeded("late"), 504),
    (Internal("boom"), 500),
])
def test_status_of_each_error(error, status):
    response = error_response(error)
    assert response.status == status
    assert json.loads(response.body) == {"error": error.message}


def test_refusals_say_when_to_retry_and_401_names_the_scheme():
    response = error_response(ResourceExhausted("rate limit reached", retry_after=0.05))
    headers = dict(response.headers)
    assert headers["retry-after"] == "1"  # whole seconds, rounded up
    assert headers["retry-after-ms"] == "50"
    assert json.loads(response.body)["error"] == "rate limit reached; retry after 0.05 s"
    assert dict(error_response(Unavailable("x", retry_after=2.5)).headers)["retry-after"] == "3"
    assert dict(error_response(Unauthenticated("x")).headers)["www-authenticate"] == \
        'Bearer realm="meshserve"'
    assert error_response(InvalidArgument("x")).headers == ()


def test_a_request_past_a_size_limit_is_413_not_429():
    """Too large is RESOURCE_EXHAUSTED over gRPC, as gRPC has it, but sending it again will
    not help: HTTP 413, no retry hint."""
    response = error_response(TooLarge("the request is 67108000 bytes, past the 67104768"))
    assert response.status == 413 and response.headers == ()
    assert error_response(ResourceExhausted("queue full")).status == 429


def challenge(error) -> str | None:
    return dict(error_response(error).headers).get("www-authenticate")


@pytest.mark.parametrize(("error", "status", "expected"), [
    # No token sent: the scheme and realm only (RFC 6750 §3.1).
    (Unauthenticated("no credentials"), 401, 'Bearer realm="meshserve"'),
    (InvalidToken("bearer token has expired"), 401,
     'Bearer realm="meshserve", error="invalid_token", '
     'error_description="bearer token has expired"'),
    (MalformedAuthorization("authorization metadata must hold one 'Bearer <token>' and be "
                            "sent once"), 401,
     'Bearer realm="meshserve", error="invalid_request", error_description="authorization '
     "metadata must hold one 'Bearer <token>' and be sent once\""),
    (InsufficientScope("'app/a' may not infer model 'mlp'"), 403,
     'Bearer realm="meshserve", error="insufficient_scope", '
     "error_description=\"'app/a' may not infer model 'mlp'\""),
    # A 403 the policy gave (not the token's narrowing): no challenge.
    (PermissionDenied("'app/a' may not infer model 'mlp'"), 403, None),
])
def test_a_refused_token_is_named_in_the_challenge(error, status, expected):
    """A 401 for an expired or forged token said only `Bearer realm="meshserve"`: a client
    could not tell it from a missing token, nor a 403 of its token's scope from the policy's."""
    assert error_response(error).status == status
    assert challenge(error) == expected


@pytest.mark.parametrize(("message", "expected"), [
    ('say "hi"', "say 'hi'"),
    ("a\\b\nc\x00d\u00e9", "a?b?c?d?"),
    ("x" * MAX_DESCRIPTION, "x" * MAX_DESCRIPTION),
    ("x" * (MAX_DESCRIPTION + 1), "x" * (MAX_DESCRIPTION - 3) + "..."),
])
def test_a_description_is_safe_inside_its_quotes_and_bounded(message, expected):
    assert description(message) == expected


def test_a_hostile_message_cannot_break_out_of_the_challenge():
    header = challenge(InvalidToken('x", error="none\r\nset-cookie: a=b' + "\u2028" * 500))
    value = header.split('error_description="', 1)[1]
    assert value.endswith('"') and '"' not in value[:-1] and "\\" not in value
    assert all(0x20 <= ord(c) < 0x7F for c in header)
    assert len(value) - 1 <= MAX_DESCRIPTION
