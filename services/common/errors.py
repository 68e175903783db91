"""Domain errors: each carries the gRPC status it maps to and whether a retry may help.

Core logic raises these and never imports grpc; `meshserve.common.server` is the one
place where they become gRPC statuses.
"""

import re


class ServingError(Exception):
    """An error a caller should see, with a message that names the field or the limit."""

    code = "INTERNAL"
    retryable = False

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        """`retry_after` (seconds): when a retry may succeed; the message ends with the hint
        and the guarded handler sends it as trailing metadata `retry-after-ms`."""
        if retry_after is not None:
            message = f"{message}; {retry_hint(retry_after)}"
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after if retry_after is not None else retry_after_of(message)


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"
    retryable = True


class TooLarge(ResourceExhausted):
    """A request past a size limit: sending it again will not help (HTTP 413, not 429)."""

    retryable = False
    http_status = 413


class OverLimit(ResourceExhausted):
    """A limit met past the edge that sending the request again will not pass (an answer
    over the message limit between the services): the server's failure, HTTP 500."""

    retryable = False
    http_status = 500


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"
    retryable = True


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class Internal(ServingError):
    code = "INTERNAL"


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"


class Unsupported(Unimplemented):
    """What a model does not do the way it was called (a decoupled model called for one
    answer): HTTP 400, as Triton answers it, not 501."""

    http_status = 400


def called_for_one_answer(model: str) -> Unsupported:
    """The refusal of a call that takes one answer (ModelInfer, HTTP) to a decoupled model."""
    return Unsupported(f"model '{model}' is decoupled (it may answer a request any number of "
                       "times): call it with ModelStreamInfer, which carries each answer")


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServingError):
    code = "PERMISSION_DENIED"


BY_CODE: dict[str, type[ServingError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, DeadlineExceeded, Unavailable,
                FailedPrecondition, Internal, Unimplemented, Unauthenticated,
                PermissionDenied)
}


_RETRY_HINT = re.compile(r"retry after (\d+(?:\.\d+)?) s$")


def retry_hint(seconds: float) -> str:
    """The hint every refusal ends with: `retry after 0.05 s`."""
    return f"retry after {round(max(seconds, 0.001), 3):g} s"


def retry_after_of(message: str) -> float | None:
    """The seconds of a message's retry hint (an upstream's refusal), if it has one."""
    match = _RETRY_HINT.search(message)
    return float(match.group(1)) if match else None


def past_a_limit(code: str, message: str) -> bool:
    """Whether a relayed refusal is one a retry will not pass: every refusal for capacity
    ends with a retry hint, so a RESOURCE_EXHAUSTED without one is a limit."""
    return code == ResourceExhausted.code and retry_after_of(message) is None


def from_code(code: str, message: str) -> ServingError:
    """The domain error for a status code name (an upstream's answer, say); a limit a retry
    will not pass is `OverLimit` (`past_a_limit`)."""
    cls = OverLimit if past_a_limit(code, message) else BY_CODE.get(code, ServingError)
    error = cls(message)
    error.code = code
    return error
