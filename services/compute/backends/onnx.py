"""An ONNX model run by ONNX Runtime behind meshserve's model contract.

`platform: "onnxruntime_onnx"` (or `backend: "onnxruntime"`), file `model.onnx`. The CUDA
execution provider is used when the device asks for it (or is `auto`) and onnxruntime has
it (the `onnxruntime-gpu` build); otherwise the CPU one. The config is checked against the
graph before the session is made, so a mismatch is refused at load, naming the file.

onnxruntime's Python API hands back no BF16 array, and takes no string tensor in the run
that would hand back its raw values; so a model with BF16 outputs is given, at load, an
exact FLOAT copy (a Cast) of each of them as an extra graph output, which is fetched
instead and turned back into BF16.
"""

from __future__ import annotations

import time
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


def providers_for(device: str, available: list[str]) -> list[str]:
    """The execution providers for a device request: `auto` or `cuda[:N]` take CUDA when
    onnxruntime has it; `cuda` without it is refused; the CPU is always last."""
    if device.startswith("cuda") and CUDA not in available:
        raise FailedPrecondition(f"device '{device}' asked for, but this onnxruntime has no "
                                 f"{CUDA} (install onnxruntime-gpu)")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class OnnxModel:
    waits = False  # a batch runs on the event loop when it is quick (Pace)

    def __init__(self, data: bytes, config: ModelConfig, device: str, threads: int,
                 where: str) -> None:
        """`data`: the model.onnx bytes; `where` names the model, version and file."""
        import onnxruntime

        self.config = config
        self._where = where
        onnx_graph.check_config(config, onnx_graph.read_graph(data, where), where)
        self._bf16_out = {t.name: t.name + AS_FLOAT for t in config.output
                          if t.data_type == mc.TYPE_BF16}
        if self._bf16_out:
            data = with_float_copies(data, self._bf16_out)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
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
            if name in self._bf16:  # numpy has no bfloat16 onnxruntime accepts directly
                array = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    numpy.ascontiguousarray(array).view(numpy.uint16), BF16_ONNX_TYPE)
            elif array.dtype == object:
                array = numpy.vectorize(_text, otypes=[object])(array) if array.size else array
            feeds[name] = array
        return feeds

    def run(self, request: ModelInferRequest, version: str) -> tuple[ModelInferResponse, Timings]:
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
        response = tensors.encode(dict(zip(names, results)), names, self.config, request,
                                  version, self._where)
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, predicted - decoded, done - predicted)

    def _run_bf16(self, names: list[str], feeds: dict) -> list[numpy.ndarray]:
        """A run whose outputs include BF16 ones: their FLOAT copies are fetched instead,
        and cast back (exactly: BF16 is FLOAT's upper half)."""
        import ml_dtypes

        fetched = self.session.run([self._bf16_out.get(name, name) for name in names], feeds)
        return [value.astype(ml_dtypes.bfloat16) if name in self._bf16_out else value
                for name, value in zip(names, fetched)]

    def warmup_requests(self) -> list[ModelInferRequest]:
        return tensors.warmup_requests(self.config)


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
