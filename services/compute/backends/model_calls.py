"""A Python model's calls to other models (Triton's BLS: `InferenceRequest.exec()` and
`async_exec()`), made as an ordinary client of the mesh: a `ModelInfer` call to the ingress
over mutual TLS with the compute's own certificate, so each call is authenticated (principal
`compute`), authorized by the access policy, validated, routed by its model's traffic
policy, batched and counted like any client's request.

An answer's parameters are the response's `parameters()`. A call to a decoupled model
(`exec(decoupled=True)`) is a `ModelStreamInfer` of one request, its answers yielded as they
come. A call that fails comes back as
Triton's BLS has it: a response whose `error()` carries the status's message and its code
(INVALID_ARGUMENT → INVALID_ARG, NOT_FOUND, UNAVAILABLE, UNIMPLEMENTED → UNSUPPORTED,
ALREADY_EXISTS, CANCELLED, UNKNOWN, others INTERNAL): the code a callee's TritonError had.
A request the model built wrongly (an input whose dtype no datatype of the protocol holds, a
parameter that is not a boolean, number or string) raises TritonModelException, as
Triton's does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy

from meshserve.common.arrays import datatype_of, deserialize_bytes
from meshserve.common.batch_requests import parameter_values, set_parameter
from meshserve.common.datatypes import serialize_bytes
from meshserve.common.errors import InvalidArgument
from meshserve.common.stream_answers import (
    EMPTY_FINAL_RESPONSE,
    FINAL_RESPONSE,
    error_parts,
)
from meshserve.common.tls import TlsFiles, channel_credentials, channel_options
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.tensors import numpy_dtype
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub

# Where the calls go: the service whose certificate must name this identity.
INGRESS = "ingress"
# A call that sets no timeout of its own waits at most this long.
DEFAULT_TIMEOUT_S = 60.0
HOST = "127.0.0.1"

_ERROR_OF_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: pb_utils.TritonError.INVALID_ARG,
    grpc.StatusCode.NOT_FOUND: pb_utils.TritonError.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: pb_utils.TritonError.UNSUPPORTED,
    grpc.StatusCode.ALREADY_EXISTS: pb_utils.TritonError.ALREADY_EXISTS,
    grpc.StatusCode.CANCELLED: pb_utils.TritonError.CANCELLED,
    grpc.StatusCode.UNKNOWN: pb_utils.TritonError.UNKNOWN,
}


def input_datatype(name: str, array: numpy.ndarray) -> str:
    """The protocol's datatype of an input array; TritonModelException when none holds it."""
    datatype = datatype_of(array.dtype)
    if datatype is None:
        raise pb_utils.TritonModelException(
            f"input '{name}' is of dtype {array.dtype}, which no datatype of the protocol holds")
    return datatype


def request_of(call: pb_utils.InferenceRequest) -> pb.ModelInferRequest:
    """The ModelInferRequest a model's InferenceRequest stands for."""
    version = call.model_version
    request = pb.ModelInferRequest(model_name=call.model_name, id=call.request_id(),
                                   model_version="" if version is None or int(version) < 0
                                   else str(version))
    for tensor in call.inputs():
        array = tensor.as_numpy()
        datatype = input_datatype(tensor.name(), array)
        request.inputs.add(name=tensor.name(), datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            raw = serialize_bytes(array.reshape(-1).tolist())
        else:
            raw = numpy.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        request.raw_input_contents.append(raw)
    for name in call.requested_output_names():
        request.outputs.add(name=name)
    try:
        for name, value in json.loads(call.parameters() or "{}").items():
            set_parameter(request.parameters[name], value, f"parameter '{name}'")
    except (InvalidArgument, ValueError) as error:
        raise pb_utils.TritonModelException(str(error)) from None
    if call.timeout():
        request.parameters["timeout"].int64_param = call.timeout()
    return request


def response_of(answer: pb.ModelInferResponse) -> pb_utils.InferenceResponse:
    """The model's InferenceResponse of an answer: its outputs as tensors, and its
    parameters."""
    tensors = []
    for output, raw in zip(answer.outputs, answer.raw_output_contents, strict=True):
        shape = tuple(output.shape)
        array = (deserialize_bytes(raw, shape) if output.datatype == "BYTES" else
                 numpy.frombuffer(raw, numpy_dtype(output.datatype)).reshape(shape))
        tensors.append(pb_utils.Tensor(output.name, array))
    return pb_utils.response_from_mesh(tensors, parameter_values(answer.parameters))


def failed(code: grpc.StatusCode, message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        message, _ERROR_OF_STATUS.get(code, pb_utils.TritonError.INTERNAL)))


def timeout_of(call: pb_utils.InferenceRequest) -> float:
    """How long a call waits for its answers (its own timeout, in µs, else the default)."""
    return call.timeout() / 1e6 if call.timeout() else DEFAULT_TIMEOUT_S


def target_in(port_file: Path) -> str:
    """The ingress on this host, at the port its port file holds."""
    return f"{HOST}:{int(port_file.read_text())}"


class ModelCalls:
    """Sends a model's calls to the ingress at `target()` (read when first needed, and again
    whenever the TLS files change: the channel is then built anew with them)."""

    def __init__(self, target: Callable[[], str], tls: TlsFiles) -> None:
        self._target = target
        self._tls = tls
        self._lock = threading.Lock()
        self._stub: GRPCInferenceServiceStub | None = None
        self._signature: tuple | None = None

    def _current(self) -> GRPCInferenceServiceStub:
        with self._lock:
            signature = self._tls.signature()
            if self._stub is None or signature != self._signature:
                channel = grpc.secure_channel(self._target(), channel_credentials(self._tls),
                                              options=channel_options(INGRESS))
                self._stub, self._signature = GRPCInferenceServiceStub(channel), signature
            return self._stub

    def _reached(self) -> tuple[GRPCInferenceServiceStub | None, pb_utils.InferenceResponse]:
        """The stub to call the ingress with, or None and the failed response that says why
        it cannot be called."""
        try:
            return self._current(), None
        except (OSError, ValueError) as error:
            return None, failed(grpc.StatusCode.UNAVAILABLE, f"the ingress to call models "
                                                             f"through is not known yet: {error}")

    def __call__(self, call: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        request = request_of(call)
        stub, failure = self._reached()
        if stub is None:
            return failure
        try:
            return response_of(stub.ModelInfer(request, timeout=timeout_of(call)))
        except grpc.RpcError as error:
            return failed(error.code(), error.details() or error.code().name)

    def stream(self, call: pb_utils.InferenceRequest) -> Iterator[pb_utils.InferenceResponse]:
        """A call to a decoupled model (`exec(decoupled=True)`): its responses as they come,
        on a stream of one request; the last is empty when the model sent its final flag
        alone (as Triton's BLS gives it). A failed answer, or call, is a response whose
        `error()` says why."""
        request = request_of(call)
        request.parameters[EMPTY_FINAL_RESPONSE].bool_param = True
        stub, failure = self._reached()
        if stub is None:
            yield failure
            return
        try:
            for answer in stub.ModelStreamInfer(iter([request]), timeout=timeout_of(call)):
                if answer.error_message:
                    code, message = error_parts(answer.error_message)
                    yield failed(grpc.StatusCode[code], message)
                    continue
                del answer.infer_response.parameters[FINAL_RESPONSE]  # the stream's mark
                yield response_of(answer.infer_response)
        except grpc.RpcError as error:
            yield failed(error.code(), error.details() or error.code().name)
