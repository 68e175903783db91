"""A Python model written to Triton's Python backend API, behind meshserve's model contract.

`backend: "python"`, file `model.py` defining `TritonPythonModel`: `initialize(args)` once at
load (an exception refuses the version, naming the file and the reason), `execute(requests)`
for every batch, returning one `InferenceResponse` per request, and `finalize()` when the
compute process stops. The model runs in its version's compute process, on the worker
thread. The batcher joins requests into one batch before compute, so `execute` receives
one request holding the batch's rows, its inputs writable arrays as in Triton; an exception
in `execute` (SystemExit and KeyboardInterrupt too), or a `TritonError` in its response,
fails that batch's requests only. `auto_complete_config` is not called: the config is read
by every service without running model code, so declare inputs and outputs.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import logging
import sys
import time
import types
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from meshserve.common import errors
from meshserve.common.errors import FailedPrecondition, Internal, ServingError
from meshserve.compute import tensors
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.timings import Timings
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

MODULE_NAME = "triton_python_backend_utils"

_ERROR_OF_CODE = {
    pb_utils.TritonError.INVALID_ARG: errors.InvalidArgument,
    pb_utils.TritonError.NOT_FOUND: errors.NotFound,
    pb_utils.TritonError.UNAVAILABLE: errors.Unavailable,
    pb_utils.TritonError.UNSUPPORTED: errors.FailedPrecondition,
    pb_utils.TritonError.ALREADY_EXISTS: errors.FailedPrecondition,
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


def _parameters(request: ModelInferRequest) -> str:
    values = {}
    for key, parameter in request.parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(parameter, kind)
    return json.dumps(values)


def import_model(source: str, path: Path) -> types.ModuleType:
    """Run `model.py`'s source as a module, with `triton_python_backend_utils` importable
    and the version directory on the path for the model's own helper modules."""
    sys.modules[MODULE_NAME] = pb_utils
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = types.ModuleType(f"meshserve_python_model_{path.parent.parent.name}")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 — the model's code
    return module


class PythonModel:
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
        self._finalized = False
        atexit.register(self.close)

    def run(self, request: ModelInferRequest, version: str) -> tuple[ModelInferResponse, Timings]:
        start = time.perf_counter_ns()
        arrays = tensors.decode(request, self.config)
        names = tensors.wanted_outputs(request, self.config)
        timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters \
            else 0
        inference_request = pb_utils.InferenceRequest(
            model_name=self.config.name, requested_output_names=names,
            inputs=[pb_utils.Tensor(name, _writable(array)) for name, array in arrays.items()],
            request_id=request.id, model_version=int(version), timeout=timeout,
            parameters=_parameters(request))
        decoded = time.perf_counter_ns()
        answer = self._execute(inference_request)
        executed = time.perf_counter_ns()
        outputs = {t.name(): t.as_numpy() for t in answer.output_tensors()}
        response = tensors.encode(outputs, names, self.config, request, version, self._where)
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, executed - decoded, done - executed)

    def _execute(self, request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        try:
            responses = self.instance.execute([request])
            if inspect.iscoroutine(responses):
                responses = asyncio.run(responses)
        except ServingError:
            raise
        except BaseException as error:  # noqa: BLE001 — whatever the model's code raises
            # SystemExit and KeyboardInterrupt too: they fail this batch, not the process.
            # (This is plain code, run on the worker thread or between awaits: no
            # cancellation of the service can pass through it.)
            raise Internal(f"{self._where}: execute raised {_said(error)}") from None
        if not isinstance(responses, (list, tuple)) or len(responses) != 1:
            got = len(responses) if isinstance(responses, (list, tuple)) else type(
                responses).__name__
            raise Internal(f"{self._where}: execute returned {got} responses for 1 request")
        [response] = responses
        if not isinstance(response, pb_utils.InferenceResponse):
            raise Internal(f"{self._where}: execute returned a {type(response).__name__}, "
                           "not an InferenceResponse")
        if response.has_error():
            error = response.error()
            kind = _ERROR_OF_CODE.get(error.code(), Internal)
            raise kind(f"{self._where}: {error.message()}")
        return response

    def warmup_requests(self) -> list[ModelInferRequest]:
        """Only the config's model_warmup: a Python model may not accept zeros."""
        return tensors.warmup_requests(self.config, default=False)

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
