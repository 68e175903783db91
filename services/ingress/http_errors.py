"""The one table from the ingress's status codes to HTTP statuses, and the error body. Pure.

An error is `{"error": "<message>"}` with the HTTP status of its gRPC code (Google's
canonical mapping). A refusal that carries a retry hint also sends `Retry-After` (whole
seconds, rounded up) and `retry-after-ms`, like the gRPC trailer. UNAUTHENTICATED sends the
challenge `WWW-Authenticate: Bearer realm="meshserve"`; a refusal of a bearer token (its
class names the RFC 6750 error: `invalid_token`, `invalid_request`, and on a 403
`insufficient_scope`) adds `error` and `error_description` (the refusal's message, made safe
for a quoted string and cut to MAX_DESCRIPTION characters). A request that sent no token
gets no error attribute (RFC 6750 §3.1).
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


REALM = "meshserve"
# The longest `error_description` sent in a challenge; a longer message is cut, ending "...".
MAX_DESCRIPTION = 200
# What RFC 6750 §3 lets an error_description hold: printable ASCII but '"' and '\'.
_DESCRIPTION_CHARACTERS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


def description(message: str, limit: int = MAX_DESCRIPTION) -> str:
    """`message` as an error_description may hold it: '"' becomes "'", any other character
    RFC 6750 leaves out (backslash, control characters, non-ASCII) "?", and at most `limit`
    characters, ending "..." when cut."""
    text = "".join(c if c in _DESCRIPTION_CHARACTERS else "'" if c == '"' else "?"
                   for c in message[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def challenge(error: ServingError) -> str | None:
    """The `WWW-Authenticate` value of a refusal (None: it sends none): the Bearer scheme
    for every UNAUTHENTICATED, with the RFC 6750 error of a refused token or scope."""
    bearer_error = getattr(error, "bearer_error", None)
    if error.code != "UNAUTHENTICATED" and bearer_error is None:
        return None
    value = f'Bearer realm="{REALM}"'
    if bearer_error is not None:
        value += f', error="{bearer_error}", error_description="{description(error.message)}"'
    return value


def error_response(error: ServingError) -> HttpResponse:
    headers: list[tuple[str, str]] = []
    authenticate = challenge(error)
    if authenticate is not None:
        headers.append(("www-authenticate", authenticate))
    if error.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(error.retry_after)))))
        headers.extend(retry_metadata(error))
    status = getattr(error, "http_status", None) or http_status(error.code)
    return HttpResponse(status, dump({"error": error.message}), headers=tuple(headers))
