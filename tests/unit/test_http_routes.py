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
    Unauthenticated,
    Unavailable,
)
from meshserve.ingress.http_errors import error_response
from meshserve.ingress.http_routes import Route, route


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
    ("/v2/trace/setting", "trace"),
    ("/v2/models/mlp/trace/setting", "trace"),
    ("/v2/logging", "logging"),
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
