"""Domain errors: each carries the gRPC status it maps to and whether a retry may help.

Core logic raises these and never imports grpc; `meshserve.common.server` is the one
place where they become gRPC statuses.
"""


class ServingError(Exception):
    """An error a caller should see, with a message that names the field or the limit."""

    code = "INTERNAL"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"
    retryable = True


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"
    retryable = True


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class Internal(ServingError):
    code = "INTERNAL"


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServingError):
    code = "PERMISSION_DENIED"


BY_CODE: dict[str, type[ServingError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, DeadlineExceeded, Unavailable,
                FailedPrecondition, Internal, Unauthenticated, PermissionDenied)
}


def from_code(code: str, message: str) -> ServingError:
    """The domain error for a status code name (an upstream's answer, say)."""
    error = BY_CODE.get(code, ServingError)(message)
    error.code = code
    return error
