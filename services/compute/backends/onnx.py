"""An ONNX model run by ONNX Runtime behind meshserve's model contract.

`platform: "onnxruntime_onnx"` (or `backend: "onnxruntime"`), file `model.onnx`. The CUDA
execution provider is used when the device asks for it (or is `auto`) and onnxruntime has
it (the `onnxruntime-gpu` build); otherwise the CPU one. The config is checked against the
graph before the session is made, so a mismatch is refused at load, naming the file.
"""

from __future__ import annotations

import ctypes
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
    def __init__(self, data: bytes, config: ModelConfig, device: str, threads: int,
                 where: str) -> None:
        """`data`: the model.onnx bytes; `where` names the model, version and file."""
        import onnxruntime

        self.config = config
        self._where = where
        onnx_graph.check_config(config, onnx_graph.read_graph(data, where), where)
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
        self._bf16_out = {t.name for t in config.output if t.data_type == mc.TYPE_BF16}

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
        """A run whose outputs include BF16 ones, which onnxruntime cannot hand back as numpy
        arrays: their bytes are read from the OrtValue."""
        import ml_dtypes
        import onnxruntime

        values = {name: value if isinstance(value, onnxruntime.OrtValue)
                  else onnxruntime.OrtValue.ortvalue_from_numpy(value)
                  for name, value in feeds.items()}
        results = []
        for name, value in zip(names, self.session.run_with_ort_values(names, values)):
            if name in self._bf16_out:
                raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
                results.append(numpy.frombuffer(raw, ml_dtypes.bfloat16).reshape(value.shape()))
            else:
                results.append(value.numpy())
        return results

    def warmup_requests(self) -> list[ModelInferRequest]:
        return tensors.warmup_requests(self.config)


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
