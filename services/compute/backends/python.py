"""A Python model written to Triton's Python backend API, behind meshserve's model contract.

`backend: "python"`, file `model.py` defining `TritonPythonModel`: `initialize(args)` once at
load (an exception refuses the version, naming the file and the reason), `execute(requests)`
for every batch, returning one `InferenceResponse` per request, and `finalize()` when the
compute process stops. The model runs in its version's compute process, on the worker
thread. As in Triton, `execute` receives one `InferenceRequest` per client request of the
batch, each with its own rows (views of the batch's inputs, writable arrays as in Triton),
`parameters()`, `request_id()`, `requested_output_names()` and `timeout()`: the batcher joins
the requests into one batch and says whose rows it holds (`batch_requests`), and the
responses are joined back into the batch's answer, their rows in the requests' order, and
each response's own `parameters` go to its request's answer. A `TritonError` in one
response fails that request only, with the status Triton gives its code
(`_STATUS_OF_CODE`); an exception in `execute` (SystemExit and KeyboardInterrupt too) fails
that batch's requests only. Every response's output must hold its request's rows. Where
the requests' dims after them differ (boxes, sequences: a -1 in config.pbtxt that varies),
the output is joined as their elements one after the other and the answer lists each
request's shape (`batch_requests.SHAPES`), so each request still gets its own tensor, as in
Triton. `auto_complete_config` is not called: the config is read by every service without
running model code, so declare inputs and outputs. A decoupled model (`run_decoupled`) gets a
response sender in each request instead, and its answers are passed on as it sends them.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from meshserve.common import batch_requests, errors
from meshserve.common.batch_requests import Member, parameter_values
from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import FailedPrecondition, Internal, ServingError
from meshserve.common.forwarding import error_result
from meshserve.compute import tensors
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.timings import Timings
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

MODULE_NAME = "triton_python_backend_utils"

# The status a request gets for the code of the TritonError its response carries, as Triton
# answers it; an unknown code is INTERNAL.
_STATUS_OF_CODE = {
    pb_utils.TritonError.UNKNOWN: "UNKNOWN",
    pb_utils.TritonError.INTERNAL: "INTERNAL",
    pb_utils.TritonError.NOT_FOUND: "NOT_FOUND",
    pb_utils.TritonError.INVALID_ARG: "INVALID_ARGUMENT",
    pb_utils.TritonError.UNAVAILABLE: "UNAVAILABLE",
    pb_utils.TritonError.UNSUPPORTED: "UNIMPLEMENTED",
    pb_utils.TritonError.ALREADY_EXISTS: "ALREADY_EXISTS",
    pb_utils.TritonError.CANCELLED: "CANCELLED",
}

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def config_json(config: ModelConfig) -> str:
    """The config as Triton hands it to `initialize`: JSON with proto field names, enums by
    name and 64-bit integers as numbers."""
    data = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    _numbers(config.DESCRIPTOR, data)
    return json.dumps(data)


def _numbers(descriptor, data: dict) -> None:
    """Turn the 64-bit integers json_format writes as strings back into numbers."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            for key in value:
                if inner.message_type is not None:
                    _numbers(inner.message_type, value[key])
                elif inner.type in _INT64:
                    value[key] = int(value[key])
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(field.message_type, item)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)


def import_model(source: str, path: Path) -> types.ModuleType:
    """Run `model.py`'s source as a module, with `triton_python_backend_utils` importable
    and the version directory on the path for the model's own helper modules."""
    sys.modules[MODULE_NAME] = pb_utils
    pb_utils.set_model_dir(path.parent)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = types.ModuleType(f"meshserve_python_model_{path.parent.parent.name}")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 — the model's code
    return module


class PythonModel:
    # Its code may wait on others (calls to other models, an async execute): it never runs
    # on the compute's event loop.
    waits = True

    def __init__(self, source: str, config: ModelConfig, path: Path, version: str) -> None:
        self.config = config
        self.device = "cpu"
        self._where = f"model '{config.name}' version {version}"
        try:
            module = import_model(source, path)
        except BaseException as error:  # noqa: BLE001 — whatever the model's code raises
            raise FailedPrecondition(f"{path}: cannot import it: {_said(error)}") from None
        model_class = getattr(module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            raise FailedPrecondition(f"{path}: defines no class TritonPythonModel")
        if hasattr(model_class, "auto_complete_config"):
            log.warning("%s: auto_complete_config is not called; config.pbtxt declares the "
                        "inputs and outputs", path)
        try:
            self.instance = model_class()
            initialize = getattr(self.instance, "initialize", None)
            if initialize is not None:
                initialize({
                    "model_config": config_json(config), "model_instance_kind": "CPU",
                    "model_instance_name": f"{config.name}_0_0",
                    "model_instance_device_id": "0", "model_repository": str(path.parent.parent),
                    "model_version": version, "model_name": config.name})
        except BaseException as error:  # noqa: BLE001 — whatever the model's code raises
            raise FailedPrecondition(f"{path}: initialize raised {_said(error)}") from None
        self._declared = declared_dims(config)  # for a ragged output's unasked pieces
        self._finalized = False
        atexit.register(self.close)

    def run(self, request: ModelInferRequest, version: str,
            cancelled: threading.Event | None = None) -> tuple[ModelInferResponse, Timings]:
        """A batch: `execute`, each of its requests' `is_cancelled()` true once `cancelled` is
        set (the batch was given up)."""
        start = time.perf_counter_ns()
        names = tensors.wanted_outputs(request, self.config)
        members = self._members(request)
        requests = self._requests(request, names, members, version, cancelled=cancelled)
        decoded = time.perf_counter_ns()
        responses = self._execute(requests)
        executed = time.perf_counter_ns()
        if members is None:
            [answer] = responses
            if answer.has_error():
                raise batch_requests.RequestFailed(_error_of(answer.error(), self._where))
            outputs = {t.name(): t.as_numpy() for t in answer.output_tensors()}
            response = tensors.encode(outputs, names, self.config, request, version, self._where)
        else:
            outputs, failed, shapes = join(responses, members, names, self.config, self._where,
                                           self._declared)
            response = tensors.encode(outputs, [n for n in names if n in outputs], self.config,
                                      request, version, self._where)
            batch_requests.write_failed(response, failed)
            batch_requests.write_shapes(response, shapes)
        batch_requests.write_parameters(response, {
            index: pb_utils.parameters_of(answer) for index, answer in enumerate(responses)
            if not answer.has_error()})
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, executed - decoded, done - executed)

    def run_decoupled(self, request: ModelInferRequest, version: str,
                      send: Callable[[int, ItemResult], None],
                      cancelled: threading.Event | None = None) -> Timings:
        """A decoupled model's batch: `execute` with a response sender in each request, and
        each answer it sends passed on as it is sent, from the thread that sends it:
        `send(the position of its request in the batch, its result)`, `more` set on all but
        the last (the one with the final flag; a final flag alone is a response without
        outputs). Returns once `execute` has; the model may go on sending after. Once
        `cancelled` is set, each request's `is_cancelled()` says so."""
        start = time.perf_counter_ns()
        names = tensors.wanted_outputs(request, self.config)
        members = self._members(request)
        requests = self._requests(request, names, members, version, send, cancelled)
        decoded = time.perf_counter_ns()
        returned = self._call_execute(requests)
        if returned is not None:
            raise Internal(f"{self._where}: execute of a decoupled model returned a "
                           f"{type(returned).__name__}; it answers through each request's "
                           "response sender and returns None")
        return Timings(decoded - start, time.perf_counter_ns() - decoded, 0)

    def requests_in(self, request: ModelInferRequest) -> int:
        """How many client requests the batch `request` holds."""
        members = self._members(request)
        return 1 if members is None else len(members)

    def _members(self, request: ModelInferRequest) -> list[Member] | None:
        return batch_requests.members(request, _rows(request)) if (
            self.config.max_batch_size) else None

    def _requests(self, request: ModelInferRequest, names: list[str],
                  members: list[Member] | None, version: str,
                  send: Callable[[int, ItemResult], None] | None = None,
                  cancelled: threading.Event | None = None
                  ) -> list[pb_utils.InferenceRequest]:
        """One request per member of the batch (the batch itself when it has none), its
        inputs views of its rows; with `send`, each with its response sender; each cancelled
        once `cancelled` is set."""
        arrays = {name: _writable(array)
                  for name, array in tensors.decode(request, self.config).items()}
        if members is None:
            return [self._request(arrays, names, request.id, parameter_values(
                request.parameters), version,
                self._sender(send, 0, names, request.id, version, cancelled), cancelled)]
        requests, offset = [], 0
        for position, member in enumerate(members):
            end = offset + member.rows
            names = [t.name for t in self.config.output
                     if member.outputs is None or t.name in member.outputs]
            requests.append(self._request(
                {name: array[offset:end] for name, array in arrays.items()}, names,
                member.id, member.parameters, version,
                self._sender(send, position, names, member.id, version, cancelled), cancelled))
            offset = end
        return requests

    def _request(self, inputs: dict[str, numpy.ndarray], names: list[str], request_id: str,
                 parameters: dict, version: str,
                 sender: pb_utils.InferenceResponseSender | None,
                 cancelled: threading.Event | None) -> pb_utils.InferenceRequest:
        timeout = parameters.get("timeout", 0)
        return pb_utils.InferenceRequest(
            model_name=self.config.name, requested_output_names=names,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
            request_id=request_id, model_version=int(version),
            timeout=timeout if type(timeout) is int else 0, parameters=json.dumps(parameters),
            sender=sender, cancelled=cancelled)

    def _sender(self, send: Callable[[int, ItemResult], None] | None, position: int,
                names: list[str], request_id: str, version: str,
                cancelled: threading.Event | None) -> pb_utils.InferenceResponseSender | None:
        """The response sender of the request at `position` of a decoupled model's batch."""
        if send is None:
            return None
        head = ModelInferRequest(model_name=self.config.name, id=request_id)

        def deliver(response: pb_utils.InferenceResponse | None, final: bool) -> None:
            result = self._answer(response, names, head, version)
            result.more = not final
            send(position, result)

        return pb_utils.InferenceResponseSender(deliver, cancelled)

    def _answer(self, response: pb_utils.InferenceResponse | None, names: list[str],
                head: ModelInferRequest, version: str) -> ItemResult:
        """One answer of a decoupled model, as its request gets it: its outputs of those
        asked for, and its parameters, or its error."""
        if response is None:
            return ItemResult(response=ModelInferResponse(
                model_name=head.model_name, model_version=version, id=head.id))
        if response.has_error():
            return error_result(_error_of(response.error(), self._where))
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        try:
            encoded = tensors.encode(outputs, [n for n in names if n in outputs], self.config,
                                     head, version, self._where)
            for name, value in pb_utils.parameters_of(response).items():
                batch_requests.set_parameter(encoded.parameters[name], value,
                                             f"{self._where}: response parameter '{name}'")
        except ServingError as error:
            return error_result(error)
        return ItemResult(response=encoded)

    def _execute(self, requests: list[pb_utils.InferenceRequest]
                 ) -> list[pb_utils.InferenceResponse]:
        responses = self._call_execute(requests)
        count = len(requests)
        if not isinstance(responses, (list, tuple)) or len(responses) != count:
            got = len(responses) if isinstance(responses, (list, tuple)) else type(
                responses).__name__
            raise Internal(f"{self._where}: execute returned {got} responses for {count} "
                           f"request{'s' if count > 1 else ''}")
        for response in responses:
            if not isinstance(response, pb_utils.InferenceResponse):
                raise Internal(f"{self._where}: execute returned a {type(response).__name__}, "
                               "not an InferenceResponse")
        return list(responses)

    def _call_execute(self, requests: list[pb_utils.InferenceRequest]):
        """What the model's `execute` returns (awaited, when it is a coroutine)."""
        try:
            returned = self.instance.execute(requests)
            if inspect.iscoroutine(returned):
                returned = asyncio.run(returned)
        except ServingError:
            raise
        except BaseException as error:  # noqa: BLE001 — whatever the model's code raises
            # SystemExit and KeyboardInterrupt too: they fail this batch, not the process.
            # (This is plain code, run on the worker thread or between awaits: no
            # cancellation of the service can pass through it.)
            raise Internal(f"{self._where}: execute raised {_said(error)}") from None
        return returned

    def warmup_requests(self, warmup_dir: Path | None = None) -> list[ModelInferRequest]:
        """Only the config's model_warmup: a Python model may not accept zeros."""
        return tensors.warmup_requests(self.config, default=False, warmup_dir=warmup_dir)

    def close(self) -> None:
        """Call the model's `finalize` once (also when the process exits)."""
        if self._finalized:
            return
        self._finalized = True
        atexit.unregister(self.close)
        finalize = getattr(self.instance, "finalize", None)
        if finalize is not None:
            try:
                finalize()
            except Exception as error:  # noqa: BLE001 — logged, the process is stopping
                log.error("%s: finalize raised %s", self._where, _said(error))


def join(responses: list[pb_utils.InferenceResponse], members: list[Member], names: list[str],
         config: ModelConfig, where: str, declared: dict[str, tuple[int, ...]]
         ) -> tuple[dict[str, numpy.ndarray], list[tuple[int, ItemResult]],
                    dict[str, list[list[int]]]]:
    """The batch's outputs (`names`, each the rows of the requests that answered, in order),
    the results of the requests that failed on their own, by position, and the shapes of the
    outputs whose dims differ from request to request (each such output is joined as the
    requests' elements one after the other, and listed with each answered request's shape).
    A request that did not ask for an output its response lacks gets zeros (empty strings)
    in its rows, or none of them where the dims differ. `declared`: `declared_dims(config)`."""
    failed = []
    parts: dict[str, list[tuple[int, numpy.ndarray | None]]] = {name: [] for name in names}
    for index, (member, response) in enumerate(zip(members, responses, strict=True)):
        if response.has_error():
            failed.append((index, error_result(_error_of(response.error(), where))))
            continue
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        for name in names:
            array = outputs.get(name)
            if array is not None:
                array = numpy.asarray(array)
                if array.ndim < 1 or array.shape[0] != member.rows:
                    raise Internal(f"{where}: output '{name}' of request {index} has shape "
                                   f"{list(array.shape)}; its request has {member.rows} rows")
            elif member.outputs is None or name in member.outputs:
                raise Internal(f"{where} did not produce output '{name}' for request {index}")
            parts[name].append((member.rows, array))
    datatypes = {t.name: WIRE_FROM_CONFIG[t.data_type] for t in config.output}
    joined, shapes = {}, {}
    for name, pieces in parts.items():
        dims = {array.shape[1:] for _, array in pieces if array is not None}
        if not dims:  # no request that answered made or asked for it
            continue
        if len(dims) > 1:
            joined[name], shapes[name] = _ragged(pieces, datatypes[name], declared[name])
            continue
        [after] = dims
        joined[name] = numpy.concatenate([
            array if array is not None else _unasked((rows, *after), datatypes[name])
            for rows, array in pieces])
    return joined, failed, shapes


def _ragged(pieces: list[tuple[int, numpy.ndarray | None]], datatype: str,
            dims: tuple[int, ...]) -> tuple[numpy.ndarray, list[list[int]]]:
    """Pieces whose dims after the batch dimension (declared `dims`) differ: their elements
    one after the other, and each piece's shape (one a request neither asked for nor got has
    no elements: 0 where `dims` says -1)."""
    empty = [max(d, 0) for d in dims]
    arrays = [array if array is not None else _unasked((rows, *empty), datatype)
              for rows, array in pieces]
    return (numpy.concatenate([array.reshape(-1) for array in arrays]),
            [list(array.shape) for array in arrays])


def declared_dims(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The dims the model makes of each output after the batch dimension (-1: any size): its
    `reshape.shape` when it has one, else its `dims`."""
    return {t.name: tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
            for t in config.output}


def _unasked(shape: tuple, datatype: str) -> numpy.ndarray:
    """The rows of an output a request neither asked for nor got: zeros, or empty strings."""
    if datatype == "BYTES":
        return numpy.full(shape, b"", dtype=object)
    return numpy.zeros(shape, tensors.numpy_dtype(datatype))


def _rows(request: ModelInferRequest) -> int:
    """The batch's rows (its first input's first dimension)."""
    return request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0


def _error_of(error: pb_utils.TritonError, where: str) -> ServingError:
    return errors.from_code(_STATUS_OF_CODE.get(error.code(), "INTERNAL"),
                            f"{where}: {error.message()}")


def _writable(array):
    """A copy of a read-only view of the request's bytes: a model may write to its inputs
    (`img /= 255`) or export them (`to_dlpack`), as in Triton."""
    return array if array.flags.writeable else array.copy()


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def load(source: bytes | Path, config: ModelConfig, path: Path, version: str) -> PythonModel:
    """`source`: the verified model.py bytes, or its path when unsigned."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FailedPrecondition(f"{path}: not UTF-8 Python source ({error})") from None
    return PythonModel(text, config, path, version)
