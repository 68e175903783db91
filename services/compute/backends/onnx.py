"""An ONNX model run by ONNX Runtime behind meshserve's model contract.

`platform: "onnxruntime_onnx"` (or `backend: "onnxruntime"`), file `model.onnx`. The CUDA
execution provider is used when the device asks for it (or is `auto`) and onnxruntime has
it (the `onnxruntime-gpu` build); otherwise the CPU one. The config is checked against the
graph before the session is made, so a mismatch is refused at load, naming the file.

The config's `parameters` set the session as Triton's onnxruntime backend reads them:
`intra_op_thread_count` and `inter_op_thread_count` (above 0; otherwise compute's
`--threads` and one), `execution_mode` (0 sequential, 1 parallel), `enable_mem_arena` and
`enable_mem_pattern` (1/0, true/false, on/off). A graph scalar (a tensor of no dimensions) is
sent and answered as the config's dims (`[ 1 ]`, as in Triton) and handed to the graph as a
scalar.

onnxruntime's Python API hands back no BF16 array, and takes no string tensor in the run
that would hand back its raw values; so a model with BF16 outputs is given, at load, an
exact FLOAT copy (a Cast) of each of them as an extra graph output, which is fetched
instead and turned back into BF16.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy

from meshserve.common import onnx_graph
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.compute import tensors
from meshserve.compute.timings import Timings
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
BF16_ONNX_TYPE = 16
AS_FLOAT = ".meshserve_as_float"  # the suffix of a BF16 output's FLOAT copy

# Triton's onnxruntime backend model parameters, and the SessionOptions attribute of each
THREAD_PARAMETERS = {"intra_op_thread_count": "intra_op_num_threads",
                     "inter_op_thread_count": "inter_op_num_threads"}
SWITCH_PARAMETERS = {"enable_mem_arena": "enable_cpu_mem_arena",
                     "enable_mem_pattern": "enable_mem_pattern"}
SWITCHES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def providers_for(device: str, available: list[str]) -> list[str]:
    """The execution providers for a device request: `auto` or `cuda[:N]` take CUDA when
    onnxruntime has it; `cuda` without it is refused; the CPU is always last."""
    if device.startswith("cuda") and CUDA not in available:
        raise FailedPrecondition(f"device '{device}' asked for, but this onnxruntime has no "
                                 f"{CUDA} (install onnxruntime-gpu)")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_settings(parameters: Mapping[str, str], threads: int) -> dict[str, int | bool]:
    """The SessionOptions attributes for a model's config `parameters` (Triton's onnxruntime
    backend's keys; others are not the backend's) and compute's `threads`. FailedPrecondition
    names a parameter whose value is not one the key takes."""
    settings: dict[str, int | bool] = {"intra_op_num_threads": threads,
                                       "inter_op_num_threads": 1}
    for key, attribute in THREAD_PARAMETERS.items():
        if key in parameters and (count := _integer(key, parameters[key])) > 0:
            settings[attribute] = count
    if "execution_mode" in parameters:
        mode = _integer("execution_mode", parameters["execution_mode"])
        if mode not in (0, 1):
            raise FailedPrecondition(f"parameter execution_mode is {mode}; it takes 0 "
                                     "(sequential) or 1 (parallel)")
        settings["execution_mode"] = mode
    for key, attribute in SWITCH_PARAMETERS.items():
        if key in parameters:
            value = SWITCHES.get(parameters[key].strip().lower())
            if value is None:
                raise FailedPrecondition(f"parameter {key} is {parameters[key]!r}; it takes "
                                         "1 or 0 (true/false, on/off)")
            settings[attribute] = value
    return settings


def _integer(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FailedPrecondition(f"parameter {key} is {value!r}; it takes an integer") \
            from None


class OnnxModel:
    waits = False  # a batch runs on the event loop when it is quick (Pace)

    def __init__(self, data: bytes, config: ModelConfig, device: str, threads: int,
                 where: str) -> None:
        """`data`: the model.onnx bytes; `where` names the model, version and file."""
        import onnxruntime

        self.config = config
        self._where = where
        graph = onnx_graph.read_graph(data, where)
        onnx_graph.check_config(config, graph, where)
        self._scalars = {t.name for t in (*graph.inputs, *graph.initializers, *graph.outputs)
                         if not t.dims}
        self._dims = {t.name: tuple(t.dims) for t in config.output}
        self._bf16_out = {t.name: t.name + AS_FLOAT for t in config.output
                          if t.data_type == mc.TYPE_BF16}
        if self._bf16_out:
            data = with_float_copies(data, self._bf16_out)
        options = onnxruntime.SessionOptions()
        try:
            settings = session_settings(
                {key: value.string_value for key, value in config.parameters.items()}, threads)
        except FailedPrecondition as error:
            raise FailedPrecondition(f"{where}: {error.message}") from None
        for attribute, value in settings.items():
            setattr(options, attribute, onnxruntime.ExecutionMode(value)
                    if attribute == "execution_mode" else value)
        options.log_severity_level = 3  # errors only: load failures are reported below
        providers = providers_for(device, onnxruntime.get_available_providers())
        try:
            self.session = onnxruntime.InferenceSession(data, options, providers=providers)
        except Exception as error:  # noqa: BLE001 — onnxruntime's own exception types
            raise FailedPrecondition(f"{where}: onnxruntime cannot load it: {error}") from None
        self.device = "cuda" if CUDA in self.session.get_providers() else "cpu"
        self._bf16 = {t.name for t in config.input if t.data_type == mc.TYPE_BF16}

    def _feeds(self, arrays: dict[str, numpy.ndarray]) -> dict:
        import onnxruntime

        feeds = {}
        for name, array in arrays.items():
            if name in self._scalars:  # sent as the config's dims, [ 1 ] in Triton's configs
                array = array.reshape(())
            if name in self._bf16:  # numpy has no bfloat16 onnxruntime accepts directly
                array = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    numpy.ascontiguousarray(array).view(numpy.uint16), BF16_ONNX_TYPE)
            elif array.dtype == object:
                array = numpy.vectorize(_text, otypes=[object])(array) if array.size else array
            feeds[name] = array
        return feeds

    def run(self, request: ModelInferRequest, version: str,
            cancelled: threading.Event | None = None) -> tuple[ModelInferResponse, Timings]:
        """A run of the graph, to its end (`cancelled`: see `TorchScriptModel.run`)."""
        start = time.perf_counter_ns()
        feeds = self._feeds(tensors.decode(request, self.config))
        names = tensors.wanted_outputs(request, self.config)
        decoded = time.perf_counter_ns()
        try:
            results = (self._run_bf16(names, feeds) if self._bf16_out
                       else self.session.run(names, feeds))
        except Exception as error:  # noqa: BLE001 — onnxruntime's own exception types
            raise Internal(f"{self._where}: onnxruntime failed: {error}") from None
        predicted = time.perf_counter_ns()
        outputs = {name: (value.reshape(self._dims[name])
                          if name in self._scalars and not value.ndim else value)
                   for name, value in zip(names, results)}
        response = tensors.encode(outputs, names, self.config, request, version, self._where)
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, predicted - decoded, done - predicted)

    def _run_bf16(self, names: list[str], feeds: dict) -> list[numpy.ndarray]:
        """A run whose outputs include BF16 ones: their FLOAT copies are fetched instead,
        and cast back (exactly: BF16 is FLOAT's upper half)."""
        import ml_dtypes

        fetched = self.session.run([self._bf16_out.get(name, name) for name in names], feeds)
        return [value.astype(ml_dtypes.bfloat16) if name in self._bf16_out else value
                for name, value in zip(names, fetched)]

    def warmup_requests(self, warmup_dir: Path | None = None) -> list[ModelInferRequest]:
        return tensors.warmup_requests(self.config, warmup_dir=warmup_dir)


def with_float_copies(data: bytes, copies: dict[str, str]) -> bytes:
    """The model `data` with, for each BF16 output named in `copies`, a Cast of it to FLOAT
    as an extra graph output of the name `copies` gives."""
    import onnx

    model = onnx.load_model_from_string(data)
    graph = model.graph
    outputs = {output.name: output for output in graph.output}
    for name, copy_name in copies.items():
        graph.node.append(onnx.helper.make_node("Cast", [name], [copy_name],
                                                to=onnx.TensorProto.FLOAT))
        copy = graph.output.add()
        copy.CopyFrom(outputs[name])
        copy.name = copy_name
        copy.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model.SerializeToString()


def _text(element: bytes) -> str:
    """ONNX Runtime's string tensors take str: BYTES elements must be UTF-8."""
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("a BYTES element is not UTF-8, which ONNX string tensors "
                              "need") from None


def load(source: bytes | Path, config: ModelConfig, device: str, threads: int,
         where: str) -> OnnxModel:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return OnnxModel(data, config, device, threads, where)
