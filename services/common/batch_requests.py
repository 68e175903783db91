"""Whose rows a batch holds, for the models that answer each request of a batch on its own
(Python models: Triton calls `execute` with one request per client request). Pure.

The batcher joins the requests of a batch into one request. For such a model it also writes,
under the batch request's parameter `meshserve_requests`, a JSON list with one entry per
request in batch order:

    {"rows": 2, "id": "the request's id", "outputs": ["OUT"] or null (all),
     "parameters": {"name": value, ...}}

Compute answers every request's rows in that order, leaving out the rows of the requests
that failed on their own, and lists those under the answer's parameter `meshserve_failed`:
a JSON list of `[position, gRPC status code, message]`. When the requests' answers to an
output differ in their dims after the batch dimension (an object detector's boxes, a
tokenizer's sequences: the config says -1 there), compute answers that output as the
answered requests' elements one after the other (a flat tensor) and lists each answered
request's shape, in order, under the answer's parameter `meshserve_shapes`: a JSON object
`{output name: [shape, ...]}`; the batcher splits such an output by those shapes instead of
by rows. The parameters a request's own response carries (Triton's
`InferenceResponse(parameters=...)`) travel under the answer's parameter
`meshserve_parameters`: a JSON object `{position: {name: value, ...}}` of the requests that
set any; the batcher gives each request its own. A batch of one request carries no
`meshserve_requests`: it is the request itself, so a request to such a model may not set it
(the batcher refuses it, INVALID_ARGUMENT); when that request fails on its own, the answer
lists it under `meshserve_failed` all the same (`failed_alone`), so that its failure is not
taken for the compute replica's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from meshserve.common.errors import Internal, InvalidArgument, ServingError
from meshserve.common.forwarding import error_result
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.protocol.grpc_service_pb2 import (
    InferParameter,
    ModelInferRequest,
    ModelInferResponse,
)

REQUESTS = "meshserve_requests"
FAILED = "meshserve_failed"
SHAPES = "meshserve_shapes"
PARAMETERS = "meshserve_parameters"
INT64_MAX = (1 << 63) - 1


class RequestFailed(ServingError):
    """The model's own answer to the only request of a batch: that request's failure, as for
    a request of a larger batch, not the compute replica's (an UNAVAILABLE from the model says
    nothing of the replica). `error` is what the request gets."""

    def __init__(self, error: ServingError) -> None:
        super().__init__(error.message)
        self.code = error.code
        self.error = error


def failed_alone(request: ModelInferRequest, version: str,
                 error: ServingError) -> ModelInferResponse:
    """The answer to a batch of one `request` that failed on its own with `error`."""
    response = ModelInferResponse(model_name=request.model_name, model_version=version,
                                  id=request.id)
    write_failed(response, [(0, error_result(error))])
    return response


class Member(NamedTuple):
    """One request of a batch, as the batcher described it."""

    rows: int
    id: str
    outputs: list[str] | None  # the outputs it names; None: all
    parameters: dict  # its parameters by name, each value as JSON has it


def parameter_values(parameters: Mapping) -> dict:
    """A request's `parameters` map as plain values (bool, int, str or float)."""
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(parameter, kind)
    return values


def set_parameter(target: InferParameter, value: object, where: str) -> None:
    """A plain parameter value (as JSON has it) as an InferParameter: a boolean, an integer,
    a number or a string."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value > INT64_MAX:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidArgument(f"{where} must be a boolean, a number or a string")


def refuse_reserved(request: ModelInferRequest) -> None:
    """Raise InvalidArgument when a request sets the parameter that describes a batch."""
    if REQUESTS in request.parameters:
        raise InvalidArgument(f"parameter '{REQUESTS}' is reserved: meshserve describes a "
                              "batch's requests with it")


def describe(requests: Sequence[ModelInferRequest], rows: Sequence[int],
             wanted: Sequence[list[str] | None]) -> str:
    """The `meshserve_requests` value of a batch of `requests` (rows and outputs as `merge`
    takes them)."""
    return json.dumps([{"rows": count, "id": request.id, "outputs": names,
                        "parameters": parameter_values(request.parameters)}
                       for request, count, names in zip(requests, rows, wanted, strict=True)],
                      separators=(",", ":"))


def members(request: ModelInferRequest, total: int) -> list[Member] | None:
    """The requests a batch request of `total` rows joins (None: it is one request).
    Raises InvalidArgument naming the parameter when the description does not fit the batch."""
    if REQUESTS not in request.parameters:
        return None
    text = request.parameters[REQUESTS].string_param
    try:
        read = [Member(int(m["rows"]), str(m["id"]), m["outputs"], dict(m["parameters"]))
                for m in json.loads(text)]
    except (ValueError, TypeError, KeyError) as error:
        raise InvalidArgument(f"parameter '{REQUESTS}' is not a list of requests "
                              f"({type(error).__name__}: {error})") from None
    if len(read) < 2 or any(m.rows < 0 for m in read) or sum(m.rows for m in read) != total:
        raise InvalidArgument(f"parameter '{REQUESTS}' describes {len(read)} requests of "
                              f"{[m.rows for m in read]} rows; the batch has {total} rows")
    return read


def write_failed(response: ModelInferResponse, failed: Sequence[tuple[int, ItemResult]]) -> None:
    """Record in `response` the requests (by position in the batch) that failed on their own."""
    if failed:
        response.parameters[FAILED].string_param = json.dumps(
            [[index, result.code, result.message] for index, result in failed])


def read_failed(response: ModelInferResponse) -> dict[int, ItemResult]:
    """The results of the batch's requests that failed on their own, by position."""
    if FAILED not in response.parameters:
        return {}
    try:
        failed = {int(index): ItemResult(code=int(code), message=str(message))
                  for index, code, message in json.loads(response.parameters[FAILED].string_param)}
    except (ValueError, TypeError) as error:
        raise Internal(f"compute answered a malformed parameter '{FAILED}' "
                       f"({type(error).__name__}: {error})") from None
    if any(not result.code for result in failed.values()):
        raise Internal(f"compute answered a parameter '{FAILED}' with status code 0 (OK)")
    return failed


def write_shapes(response: ModelInferResponse, shapes: Mapping[str, Sequence[Sequence[int]]]
                 ) -> None:
    """Record in `response` each answered request's own shape of the outputs in `shapes`
    (those whose dims differ from request to request), in the requests' order."""
    if shapes:
        response.parameters[SHAPES].string_param = json.dumps(
            {name: [list(shape) for shape in each] for name, each in shapes.items()},
            separators=(",", ":"))


def read_shapes(response: ModelInferResponse) -> dict[str, list[list[int]]]:
    """Each answered request's own shape of the outputs whose dims differ from request to
    request, by output name (empty: every output splits by rows)."""
    if SHAPES not in response.parameters:
        return {}
    try:
        read = json.loads(response.parameters[SHAPES].string_param)
        shapes = {str(name): [[int(d) for d in shape] for shape in each]
                  for name, each in read.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise Internal(f"compute answered a malformed parameter '{SHAPES}' "
                       f"({type(error).__name__}: {error})") from None
    for name, each in shapes.items():
        if any(not shape or min(shape) < 0 for shape in each):
            raise Internal(f"compute answered a parameter '{SHAPES}' with a shape of output "
                           f"'{name}' that has no batch dimension or a negative dim: {each}")
    return shapes


def write_parameters(response: ModelInferResponse, parameters: Mapping[int, dict]) -> None:
    """Record in `response` the parameters of the requests' own responses, by position in
    the batch (each a dict of booleans, integers and strings; empty ones are left out)."""
    kept = {str(index): values for index, values in parameters.items() if values}
    if kept:
        response.parameters[PARAMETERS].string_param = json.dumps(kept, separators=(",", ":"))


def read_parameters(response: ModelInferResponse) -> dict[int, dict]:
    """The parameters of the requests' own responses, by position in the batch."""
    if PARAMETERS not in response.parameters:
        return {}
    try:
        read = json.loads(response.parameters[PARAMETERS].string_param)
        parameters = {int(index): dict(values) for index, values in read.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise Internal(f"compute answered a malformed parameter '{PARAMETERS}' "
                       f"({type(error).__name__}: {error})") from None
    for index, values in parameters.items():
        for name, value in values.items():
            if not isinstance(value, (bool, int, str)):
                raise Internal(f"compute answered a parameter '{PARAMETERS}' whose response "
                               f"parameter '{name}' of request {index} is not a boolean, "
                               "integer or string")
    return parameters
