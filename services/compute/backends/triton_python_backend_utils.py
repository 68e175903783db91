"""The module Triton Python models import (`import triton_python_backend_utils as pb_utils`),
implemented for meshserve from Triton's published description of its API.

The Python backend registers this module under the name `triton_python_backend_utils`
before it runs a `model.py`, so a model written for Triton runs unchanged. What it offers:
`Tensor` (`name`, `as_numpy`, `shape`, `triton_dtype`, `is_cpu`, `to_dlpack`, `from_dlpack`,
and the DLPack protocol), `InferenceRequest` (`inputs`, `requested_output_names`,
`request_id`, `correlation_id`, `flags`, `parameters`, `timeout`, `is_cancelled`),
`InferenceResponse` (`output_tensors`, `has_error`, `error`, `parameters`), `TritonError`
with its codes, `TritonModelException`, `MetricFamily` and its `Metric`s (the model's own
Prometheus metrics, served by the compute with its own: `model_metrics`),
`get_input_tensor_by_name`, `get_output_tensor_by_name`, `get_input_config_by_name`,
`get_output_config_by_name`, `get_model_dir`, `triton_string_to_numpy`,
`triton_to_numpy_type`, `numpy_to_triton_type`, `serialize_byte_tensor`,
`deserialize_bytes_tensor`, `using_decoupled_model_transaction_policy`, the
`TRITONSERVER_*` flag constants and `Logger`. Tensors live on the CPU.
A decoupled model (its config's `model_transaction_policy { decoupled: true }`) answers each
request through `request.get_response_sender()`: `send(response)` any number of times, from
any thread, during `execute` or after it returned, and `send(flags=
TRITONSERVER_RESPONSE_COMPLETE_FINAL)` (or `send(response, flags=...)`, or `close()`) last.
`InferenceRequest(model_name=..., inputs=..., requested_output_names=...).exec()` (and
`await ... .async_exec()`) calls another model through the mesh, when the compute is given
where (`--bls-target`; `meshserve.compute.backends.model_calls`); `exec(decoupled=True)`
iterates over a decoupled model's responses as they come. Not offered (calling them
raises TritonModelException): the model loading API (`load_model`, `unload_model`,
`is_model_ready`).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy

from meshserve.common.arrays import NUMPY_DTYPE, datatype_of, deserialize_bytes
from meshserve.common.datatypes import element_ends, serialize_bytes

_log = logging.getLogger("meshserve.compute.python_model")

# Flags of Triton's C API a model may name (requests to stateful models, decoupled answers,
# rescheduling): of these meshserve reads only the final flag of a decoupled model's answers,
# but models that name the others still load.
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# The numbers of Triton's C API data types (TRITONSERVER_DataType), by protocol datatype.
_TRITON_TYPE_NUMBER = {"BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5,
                       "INT8": 6, "INT16": 7, "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11,
                       "FP64": 12, "BYTES": 13, "BF16": 14}

# The version directory of the model this process runs (`get_model_dir`).
_model_dir = ""

class ModelCalls(Protocol):
    """How a model's calls to other models are made: `calls(request)` answers once,
    `calls.stream(request)` yields each answer of a decoupled model."""

    def __call__(self, request: InferenceRequest) -> InferenceResponse: ...

    def stream(self, request: InferenceRequest) -> Iterator[InferenceResponse]: ...


# How a model's calls to other models are made (`InferenceRequest.exec`): set by the compute
# that runs the model (`set_model_calls`); None: it was not told where they go.
_model_calls: ModelCalls | None = None


def set_model_calls(calls: ModelCalls | None) -> None:
    global _model_calls
    _model_calls = calls


def set_model_dir(path: Path) -> None:
    global _model_dir
    _model_dir = str(path)


def get_model_dir() -> str:
    """The directory of the model's version (where its `model.py` is), as in Triton."""
    return _model_dir


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

    def triton_dtype(self) -> int:
        """The number of its data type in Triton's C API (`TYPE_FP32`: 11)."""
        number = _TRITON_TYPE_NUMBER.get(datatype_of(self._array.dtype))
        if number is None:
            raise TritonModelException(f"tensor '{self._name}' is of dtype "
                                       f"{self._array.dtype}, which no data type holds")
        return number

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        return self._array.__dlpack__()

    def __dlpack__(self, **options):
        """The DLPack protocol: `torch.from_dlpack(tensor)` takes it as Triton's does."""
        return self._array.__dlpack__(**options)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

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
                 flags: int = 0, timeout: int = 0, parameters=None,
                 sender: InferenceResponseSender | None = None,
                 cancelled: threading.Event | None = None, **_) -> None:
        """`sender`: given by the Python backend to a decoupled model's requests; `cancelled`:
        set by it once the request's batch is given up."""
        self.model_name = model_name
        self._sender = sender
        self._cancelled = cancelled
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
        """Whether the client gave this request up (cancelled its call or stream, or its
        deadline passed), learnt while the model runs."""
        return self._cancelled is not None and self._cancelled.is_set()

    def get_response_sender(self) -> InferenceResponseSender:
        """Where a decoupled model sends this request's answers."""
        if self._sender is None:
            raise TritonModelException(
                "get_response_sender is for decoupled models: the model's config sets no "
                "model_transaction_policy { decoupled: true }")
        return self._sender

    def exec(self, decoupled: bool = False, **_):
        """This request, sent to its model through the mesh: its response (an error in
        `error()` when the call failed); with `decoupled`, an iterator of the responses as
        they come (a decoupled model's: the last empty when the model sent its final flag
        alone)."""
        if _model_calls is None:
            raise TritonModelException(
                "calling another model from a model (exec) needs the compute to be told where "
                "the mesh's ingress is (meshserve compute --bls-target)")
        return _model_calls.stream(self) if decoupled else _model_calls(self)

    async def async_exec(self, decoupled: bool = False, **_):
        """`exec` awaited; with `decoupled`, the list of the responses."""
        if decoupled:
            return await asyncio.to_thread(lambda: list(self.exec(True)))
        return await asyncio.to_thread(self.exec)


class InferenceResponseSender:
    """Sends a decoupled model's answers to one request, from any thread: each response as it
    is sent, and the final flag last (`deliver(response or None, final)`). The final flag
    closes the sender."""

    def __init__(self, deliver: Callable[[InferenceResponse | None, bool], None],
                 cancelled: threading.Event | None = None) -> None:
        self._deliver = deliver
        self._cancelled = cancelled  # set once the client gives the request up
        self._lock = threading.Lock()
        self._closed = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(
                f"send() takes an InferenceResponse, not a {type(response).__name__}")
        if response is None and not final:
            raise TritonModelException(
                "send() needs a response or the flag TRITONSERVER_RESPONSE_COMPLETE_FINAL")
        with self._lock:
            if self._closed:
                raise TritonModelException("this request's response sender is closed: its "
                                           "final flag was sent already")
            self._closed = final
            self._deliver(response, final)

    def close(self) -> None:
        """No more answers to this request: the final flag, without a response."""
        self.send(flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()


class InferenceResponse:
    """The answer to one request: output tensors, or an error; and its own parameters, which
    reach the client in its response (booleans, integers and strings, as in Triton)."""

    def __init__(self, output_tensors=None, error: TritonError | None = None,
                 parameters: dict | None = None, **_) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = _checked_parameters(parameters)

    def parameters(self) -> str:
        """Its parameters as a JSON object string."""
        return json.dumps(self._parameters)

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def _checked_parameters(parameters) -> dict:
    """A response's parameters, when they are a dict of str to bool, int or str."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise TritonModelException(f"parameters must be a dict, got {type(parameters)}")
    for name, value in parameters.items():
        if not isinstance(name, str):
            raise TritonModelException(
                f"parameter names must be of type str; {name!r} is of type {type(name)}")
        if not isinstance(value, (bool, int, str)):
            raise TritonModelException(f"parameter '{name}' must be of type bool, int or "
                                       f"str; it is of type {type(value)}")
    return dict(parameters)


def response_from_mesh(output_tensors: list[Tensor], parameters: dict) -> InferenceResponse:
    """A call's answer as the mesh sent it: its parameters as they came (numbers too)."""
    response = InferenceResponse(output_tensors=output_tensors)
    response._parameters = dict(parameters)
    return response


def parameters_of(response: InferenceResponse) -> dict:
    """A response's parameters, by name."""
    return response._parameters


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


def triton_to_numpy_type(data_type: int):
    """The numpy type of a data type of Triton's C API (11 -> numpy.float32); None for BF16
    (numpy has none) and unknown numbers."""
    datatype = next((d for d, n in _TRITON_TYPE_NUMBER.items() if n == data_type), None)
    if datatype == "BYTES":
        return numpy.object_
    return None if datatype not in NUMPY_DTYPE else NUMPY_DTYPE[datatype].type


def numpy_to_triton_type(data_type) -> int | None:
    """The number in Triton's C API of a numpy type (numpy.float32 -> 11); None when no
    data type holds it."""
    try:
        return _TRITON_TYPE_NUMBER.get(datatype_of(numpy.dtype(data_type)))
    except TypeError:
        return None


def serialize_byte_tensor(input_tensor: numpy.ndarray) -> bytes:
    """The elements of a BYTES array, each after its 4-byte little-endian length, in C
    order (str as UTF-8, other objects as their str())."""
    return serialize_bytes(numpy.asarray(input_tensor).reshape(-1).tolist())


def deserialize_bytes_tensor(encoded_tensor: bytes) -> numpy.ndarray:
    """The elements of serialized BYTES contents, as a 1-D object array of bytes."""
    count = sum(1 for _ in element_ends(encoded_tensor))
    return deserialize_bytes(encoded_tensor, [count])


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    """Whether the (parsed) config asks for decoupled responses."""
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def load_model(model_name: str, config: str = "", files=None) -> None:
    _unsupported("the model loading API (load_model)")


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    _unsupported("the model loading API (unload_model)")


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    _unsupported("the model loading API (is_model_ready)")


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


# ------------------------------------------------------------------ the model's own metrics

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class Metric:
    """One series of a MetricFamily, of its labels. A counter only grows (`increment`); a
    gauge is `set` or incremented; a histogram `observe`s."""

    def __init__(self, name: str, kind: str, labels: dict[str, str],
                 buckets: tuple[float, ...]) -> None:
        self._where = f"metric '{name}'" + (f" {labels}" if labels else "")
        self._kind = kind
        self.labels = labels
        self.buckets = buckets
        self._lock = threading.Lock()  # the model's thread writes, a scrape reads
        self._value = 0.0
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self._sum = 0.0

    def increment(self, value: float) -> None:
        self._only(MetricFamily.COUNTER, MetricFamily.GAUGE, doing="incremented")
        if self._kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException(f"{self._where}: a counter cannot be decremented "
                                       f"(increment {value})")
        with self._lock:
            self._value += float(value)

    def set(self, value: float) -> None:
        self._only(MetricFamily.GAUGE, doing="set")
        with self._lock:
            self._value = float(value)

    def observe(self, value: float) -> None:
        self._only(MetricFamily.HISTOGRAM, doing="observed")
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += float(value)

    def value(self) -> float:
        self._only(MetricFamily.COUNTER, MetricFamily.GAUGE, doing="read as one value")
        return self._value

    def observations(self) -> tuple[list[int], float]:
        """A histogram's counts per bucket (then above them) and their sum, read at once."""
        with self._lock:
            return list(self._counts), self._sum

    def _only(self, *kinds: str, doing: str) -> None:
        if self._kind not in kinds:
            raise TritonModelException(f"{self._where}: a {self._kind} cannot be {doing}")


class MetricFamily:
    """A metric the model defines: `MetricFamily(name, description, kind)`, then
    `.Metric(labels={...})` for each series (a histogram's with `buckets=[...]`). Families
    of one name are one family, as in Triton; the compute serves them with its own metrics,
    under their own names."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"metric family '{name}': kind must be "
                                       "MetricFamily.COUNTER, GAUGE or HISTOGRAM")
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise TritonModelException(f"metric family name {name!r} is not a Prometheus "
                                       "metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
        with _families.lock:
            known = _families.by_name.get(name)
            if known is not None and known.kind != kind:
                raise TritonModelException(f"metric family '{name}' is a {known.kind} "
                                           f"already; it cannot be a {kind} too")
            self._shared = known or _families.by_name.setdefault(
                name, _Family(name, str(description), kind))

    def Metric(self, labels: dict | None = None,  # noqa: N802 — Triton's name
               buckets: list | None = None) -> Metric:
        family = self._shared
        if labels is not None and not isinstance(labels, dict):
            raise TritonModelException(f"metric family '{family.name}': labels must be a dict")
        labels = {str(k): str(v) for k, v in (labels or {}).items()}
        bad = [k for k in labels if not _LABEL_NAME.fullmatch(k)]
        if bad:
            raise TritonModelException(f"metric family '{family.name}': label name {bad[0]!r} "
                                       "is not a Prometheus label name")
        if (buckets is None) != (family.kind != self.HISTOGRAM):
            raise TritonModelException(
                f"metric family '{family.name}': a histogram needs buckets (a list of upper "
                "bounds); a counter or gauge takes none")
        bounds = tuple(sorted(float(b) for b in buckets or ()))
        key = tuple(sorted(labels.items()))
        with _families.lock:
            metric = family.metrics.get(key)
            if metric is None:
                metric = family.metrics[key] = Metric(family.name, family.kind, labels, bounds)
            elif metric.buckets != bounds:
                raise TritonModelException(f"metric family '{family.name}': labels {labels} "
                                           f"have buckets {list(metric.buckets)} already")
        return metric


class _Family:
    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.metrics: dict[tuple, Metric] = {}


class _Families:
    """Every family the models of this process defined, and the Prometheus collector that
    serves them: a counter under its exact name (untyped in the text format, as the compute's
    Triton counters), a gauge, a histogram (`_bucket{le}`, `_count`, `_sum`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_name: dict[str, _Family] = {}

    def describe(self) -> list:
        return []  # families come and go with the model: nothing to reserve

    def collect(self) -> list:
        from prometheus_client.metrics_core import Metric as Exposed

        with self.lock:
            families = [(f, list(f.metrics.values())) for f in self.by_name.values()]
        exposed = []
        for family, metrics in families:
            kind = "unknown" if family.kind == MetricFamily.COUNTER else family.kind
            out = Exposed(family.name, family.description, kind)
            for metric in metrics:
                if family.kind != MetricFamily.HISTOGRAM:
                    out.add_sample(family.name, metric.labels, metric.value())
                    continue
                counts, total = metric.observations()
                running = 0
                for bound, count in zip((*metric.buckets, float("inf")), counts, strict=True):
                    running += count
                    out.add_sample(f"{family.name}_bucket",
                                   {**metric.labels, "le": _bound(bound)}, running)
                out.add_sample(f"{family.name}_count", metric.labels, running)
                out.add_sample(f"{family.name}_sum", metric.labels, total)
            exposed.append(out)
        return exposed


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


_families = _Families()


def model_metrics() -> _Families:
    """The collector of the metrics the models define, for the compute's Prometheus registry
    (`registry.register(model_metrics())`)."""
    return _families
