"""A TorchScript model behind meshserve's model contract: decode → predict → encode.

Raw request bytes become tensors without a copy (`torch.frombuffer`); outputs leave as the
bytes of a contiguous CPU tensor. Inputs and outputs are matched to the model's
positional arguments and results in the order of config.pbtxt, as Triton's libtorch backend
does.
"""

import io
import time
from pathlib import Path

import torch

from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import InvalidArgument
from meshserve.compute.tensors import warmup_requests
from meshserve.compute.timings import Timings
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig

TORCH_DTYPE = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}


def pick_device(requested: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class TorchScriptModel:
    def __init__(self, path: Path | io.BytesIO, config: ModelConfig,
                 device: torch.device) -> None:
        """`path`: the TorchScript file, or its bytes in memory (a decrypted artifact)."""
        self.config = config
        self.device = device
        source = path if isinstance(path, io.BytesIO) else str(path)
        self.module = torch.jit.load(source, map_location=device).eval()
        self._inputs = [(t.name, WIRE_FROM_CONFIG[t.data_type]) for t in config.input]
        self._outputs = [(t.name, WIRE_FROM_CONFIG[t.data_type]) for t in config.output]

    def decode(self, request: ModelInferRequest) -> list[torch.Tensor]:
        position = {t.name: i for i, t in enumerate(request.inputs)}
        tensors = []
        for name, datatype in self._inputs:
            if name not in position:
                raise InvalidArgument(f"input '{name}' is missing")
            i = position[name]
            raw = request.raw_input_contents[i]
            tensor = torch.frombuffer(raw, dtype=TORCH_DTYPE[datatype])
            tensors.append(tensor.reshape(tuple(request.inputs[i].shape)).to(self.device))
        return tensors

    def predict(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            result = self.module(*tensors)
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def encode(self, outputs: list[torch.Tensor], request: ModelInferRequest,
               version: str) -> ModelInferResponse:
        wanted = {o.name for o in request.outputs}
        response = ModelInferResponse(model_name=request.model_name, model_version=version,
                                      id=request.id)
        for (name, datatype), tensor in zip(self._outputs, outputs, strict=True):
            if wanted and name not in wanted:
                continue
            host = tensor.detach().to("cpu", TORCH_DTYPE[datatype]).contiguous()
            out = response.outputs.add(name=name, datatype=datatype)
            out.shape.extend(host.shape)
            response.raw_output_contents.append(host.view(torch.uint8).numpy().tobytes())
        return response

    def run(self, request: ModelInferRequest, version: str) -> tuple[ModelInferResponse, Timings]:
        """The whole contract, timed per phase (runs on a worker thread)."""
        start = time.perf_counter_ns()
        tensors = self.decode(request)
        decoded = time.perf_counter_ns()
        outputs = self.predict(tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        predicted = time.perf_counter_ns()
        response = self.encode(outputs, request, version)
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, predicted - decoded, done - predicted)

    def warmup_requests(self) -> list[ModelInferRequest]:
        """The config's model_warmup samples, or zeros at batch 1, preferred and max sizes."""
        return warmup_requests(self.config)
