"""The one table from the ingress's status codes to HTTP statuses, and the error body. Pure.

An error is `{"error": "<message>"}` with the HTTP status of its gRPC code (Google's
canonical mapping). A refusal that carries a retry hint also sends `Retry-After` (whole
seconds, rounded up) and `retry-after-ms`, like the gRPC trailer; UNAUTHENTICATED sends
`WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import math

from meshserve.common.errors import ServingError
from meshserve.common.server import retry_metadata
from meshserve.ingress.http_codec import dump
from meshserve.ingress.http_server import HttpResponse

HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


def error_response(error: ServingError) -> HttpResponse:
    headers: list[tuple[str, str]] = []
    if error.code == "UNAUTHENTICATED":
        headers.append(("www-authenticate", 'Bearer realm="meshserve"'))
    if error.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(error.retry_after)))))
        headers.extend(retry_metadata(error))
    return HttpResponse(http_status(error.code), dump({"error": error.message}),
                        headers=tuple(headers))
