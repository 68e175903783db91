"""The module Triton Python models import (`import triton_python_backend_utils as pb_utils`),
implemented for meshserve from Triton's published description of its API.

The Python backend registers this module under the name `triton_python_backend_utils`
before it runs a `model.py`, so a model written for Triton runs unchanged. What it offers:
`Tensor` (`name`, `as_numpy`, `is_cpu`, `to_dlpack`, `from_dlpack`), `InferenceRequest`
(`inputs`, `requested_output_names`, `request_id`, `correlation_id`, `flags`,
`parameters`, `timeout`, `is_cancelled`), `InferenceResponse` (`output_tensors`,
`has_error`, `error`), `TritonError` with its codes, `TritonModelException`,
`get_input_tensor_by_name`, `get_output_tensor_by_name`, `get_input_config_by_name`,
`get_output_config_by_name`, `triton_string_to_numpy` and `Logger`. Tensors live on the CPU.
`InferenceRequest(model_name=..., inputs=..., requested_output_names=...).exec()` (and
`await ... .async_exec()`) calls another model through the mesh, when the compute is given
where (`--bls-target`; `meshserve.compute.backends.model_calls`). Not offered (calling them
raises TritonModelException): decoupled responses (`get_response_sender`,
`exec(decoupled=True)`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import numpy

_log = logging.getLogger("meshserve.compute.python_model")

# How a model's calls to other models are made (`InferenceRequest.exec`): set by the compute
# that runs the model (`set_model_calls`); None: it was not told where they go.
_model_calls: Callable[[InferenceRequest], InferenceResponse] | None = None


def set_model_calls(calls: Callable[[InferenceRequest], InferenceResponse] | None) -> None:
    global _model_calls
    _model_calls = calls


class TritonModelException(Exception):
    """Raised by a model (or by this module) to fail `initialize`, `execute` or `finalize`."""


class TritonError:
    """An error answered for one request: `InferenceResponse(error=TritonError(...))`."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code})"


class _Capsule:
    """Lets numpy take a bare DLPack capsule (as torch's `to_dlpack` makes) of CPU memory."""

    def __init__(self, capsule) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_):
        return self._capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


class Tensor:
    """A named tensor: a numpy array (BYTES tensors: an object array of bytes)."""

    def __init__(self, name: str, array) -> None:
        self._name = name
        self._array = numpy.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> numpy.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, tensor) -> Tensor:
        """From an object with `__dlpack__` (a torch tensor, ...) or a DLPack capsule."""
        source = tensor if hasattr(tensor, "__dlpack__") else _Capsule(tensor)
        return Tensor(name, numpy.from_dlpack(source))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._array.dtype}, {list(self._array.shape)})"


def _unsupported(what: str):
    raise TritonModelException(f"{what} is not supported by meshserve's Python backend")


class InferenceRequest:
    """One client request of a batch as `execute` sees it: its rows of the inputs, and its
    own id, parameters and requested outputs."""

    def __init__(self, model_name: str = "", requested_output_names=(), inputs=(),
                 request_id: str = "", correlation_id=0, model_version: int = -1,
                 flags: int = 0, timeout: int = 0, parameters=None, **_) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(
            parameters or {})

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested)

    def request_id(self) -> str:
        return self._id

    def correlation_id(self):
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON object string."""
        return self._parameters

    def is_cancelled(self) -> bool:
        return False

    def get_response_sender(self):
        _unsupported("decoupled mode (get_response_sender)")

    def exec(self, decoupled: bool = False, **_) -> InferenceResponse:
        """This request, sent to its model through the mesh; its response (an error in
        `error()` when the call failed)."""
        if decoupled:
            _unsupported("decoupled mode (exec(decoupled=True))")
        if _model_calls is None:
            raise TritonModelException(
                "calling another model from a model (exec) needs the compute to be told where "
                "the mesh's ingress is (meshserve compute --bls-target)")
        return _model_calls(self)

    async def async_exec(self, decoupled: bool = False, **_) -> InferenceResponse:
        return await asyncio.to_thread(self.exec, decoupled)


class InferenceResponse:
    """The answer to one request: output tensors, or an error."""

    def __init__(self, output_tensors=None, error: TritonError | None = None, **_) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    """The entry of `model_config["input"]` (the parsed `args["model_config"]`) named so."""
    return next((t for t in model_config.get("input", []) if t.get("name") == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((t for t in model_config.get("output", []) if t.get("name") == name), None)


_NUMPY_OF_CONFIG_TYPE = {
    "TYPE_BOOL": numpy.bool_, "TYPE_UINT8": numpy.uint8, "TYPE_UINT16": numpy.uint16,
    "TYPE_UINT32": numpy.uint32, "TYPE_UINT64": numpy.uint64, "TYPE_INT8": numpy.int8,
    "TYPE_INT16": numpy.int16, "TYPE_INT32": numpy.int32, "TYPE_INT64": numpy.int64,
    "TYPE_FP16": numpy.float16, "TYPE_FP32": numpy.float32, "TYPE_FP64": numpy.float64,
    "TYPE_STRING": numpy.object_,
}


def triton_string_to_numpy(triton_type_string: str):
    """The numpy type of a config data type name (`"TYPE_FP32"` -> numpy.float32)."""
    return _NUMPY_OF_CONFIG_TYPE.get(triton_type_string)


class Logger:
    """A model's log lines, in the compute process's log."""

    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR
    VERBOSE = logging.DEBUG

    @staticmethod
    def log(message: str, level: int = logging.INFO) -> None:
        _log.log(level, "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        _log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug("%s", message)
