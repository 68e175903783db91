"""A TorchScript model behind meshserve's model contract: decode → predict → encode.

Raw request bytes become tensors without a copy (`torch.frombuffer`); outputs leave as the
bytes of a contiguous CPU tensor. Inputs and outputs are matched to the model's
positional arguments and results in the order of config.pbtxt, as Triton's libtorch backend
does. As there, an output must be of its configured datatype (never cast), a scalar output
is refused, and an error the model raises fails the batch with the model's own text.
"""

import io
import time
from pathlib import Path

import torch

from meshserve.common.datatypes import CONFIG_FROM_WIRE, WIRE_FROM_CONFIG
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.common.server import internal_error_message
from meshserve.common.validation import NEAR_LIMIT
from meshserve.compute.tensors import check_answer_bytes, warmup_requests
from meshserve.compute.timings import Timings
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import DataType, ModelConfig

TORCH_DTYPE = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
WIRE_FROM_TORCH = {dtype: wire for wire, dtype in TORCH_DTYPE.items()}


def config_name(dtype: torch.dtype) -> str:
    """A torch dtype as config.pbtxt names it (TYPE_FP32), as Triton's messages do."""
    wire = WIRE_FROM_TORCH.get(dtype)
    return DataType.Name(CONFIG_FROM_WIRE[wire]) if wire else str(dtype)


def pick_device(requested: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class TorchScriptModel:
    waits = False  # a batch runs on the event loop when it is quick (Pace)

    def __init__(self, path: Path | io.BytesIO, config: ModelConfig,
                 device: torch.device, where: str = "") -> None:
        """`path`: the TorchScript file, or its bytes in memory (a decrypted artifact);
        `where` names the file in a refusal."""
        self.config = config
        self.device = device
        strings = [t.name for t in (*config.input, *config.output)
                   if WIRE_FROM_CONFIG[t.data_type] not in TORCH_DTYPE]
        if strings:
            raise FailedPrecondition(
                f"{where or config.name}: TYPE_STRING tensors are not supported by TorchScript "
                f"models ({', '.join(strings)}); serve them with an ONNX or Python model")
        source = path if isinstance(path, io.BytesIO) else str(path)
        self.module = torch.jit.load(source, map_location=device).eval()
        self._inputs = [(t.name, WIRE_FROM_CONFIG[t.data_type]) for t in config.input]
        self._outputs = [(t.name, WIRE_FROM_CONFIG[t.data_type],
                          TORCH_DTYPE[WIRE_FROM_CONFIG[t.data_type]]) for t in config.output]

    def decode(self, request: ModelInferRequest) -> list[torch.Tensor]:
        position = {t.name: i for i, t in enumerate(request.inputs)}
        tensors = []
        for name, datatype in self._inputs:
            if name not in position:
                raise InvalidArgument(f"input '{name}' is missing")
            i = position[name]
            raw = request.raw_input_contents[i]
            dtype = TORCH_DTYPE[datatype]
            # frombuffer refuses an empty buffer: a tensor with a 0 dimension has none.
            tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors.append(tensor.reshape(tuple(request.inputs[i].shape)).to(self.device))
        return tensors

    def predict(self, tensors: list[torch.Tensor], version: str = "") -> list[torch.Tensor]:
        try:
            with torch.inference_mode():
                result = self.module(*tensors)
        except Exception as error:  # noqa: BLE001 — whatever the model raises: its own words
            # (the last line of TorchScript's traceback), and an id its whole trace is logged by
            said = str(error).strip().splitlines() or [type(error).__name__]
            raise Internal(f"{self._where(version)}: the TorchScript model failed: {said[-1]} "
                           f"({internal_error_message(error)})") from None
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def encode(self, outputs: list[torch.Tensor], request: ModelInferRequest,
               version: str) -> ModelInferResponse:
        if len(outputs) != len(self._outputs):
            raise Internal(f"{self._where(version)}: the model returned {len(outputs)} "
                           f"outputs; config.pbtxt declares {len(self._outputs)}")
        wanted = {o.name for o in request.outputs}
        response = ModelInferResponse(model_name=request.model_name, model_version=version,
                                      id=request.id)
        size = 0
        for (name, datatype, dtype), tensor in zip(self._outputs, outputs):
            if wanted and name not in wanted:
                continue
            if getattr(tensor, "dtype", None) != dtype or not tensor.dim():
                raise self._refused(name, dtype, tensor, version)
            host = tensor.detach().to("cpu").contiguous()
            out = response.outputs.add(name=name, datatype=datatype)
            out.shape.extend(host.shape)
            size += host.nbytes
            response.raw_output_contents.append(host.view(torch.uint8).numpy().tobytes())
        if size > NEAR_LIMIT:
            check_answer_bytes(response, self._where(version))
        return response

    def _where(self, version: str) -> str:
        return f"model '{self.config.name}' version {version}"

    def _refused(self, name: str, dtype: torch.dtype, tensor, version: str) -> Exception:
        """Why an output cannot be sent (Triton's messages): not a tensor, a scalar, or
        another datatype than the configuration's (never cast: that changes the numbers)."""
        where = self._where(version)
        if not isinstance(tensor, torch.Tensor):
            return Internal(f"{where}: output '{name}' is a {type(tensor).__name__}, "
                            "not a tensor")
        if tensor.dtype != dtype:
            return InvalidArgument(f"{where}: configuration expects datatype "
                                   f"{config_name(dtype)} for output '{name}', model "
                                   f"provides {config_name(tensor.dtype)}")
        return Internal(f"{where}: output '{name}' is a scalar which is not supported")

    def run(self, request: ModelInferRequest, version: str) -> tuple[ModelInferResponse, Timings]:
        """The whole contract, timed per phase (runs on a worker thread)."""
        start = time.perf_counter_ns()
        tensors = self.decode(request)
        decoded = time.perf_counter_ns()
        outputs = self.predict(tensors, version)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        predicted = time.perf_counter_ns()
        response = self.encode(outputs, request, version)
        done = time.perf_counter_ns()
        return response, Timings(decoded - start, predicted - decoded, done - predicted)

    def warmup_requests(self) -> list[ModelInferRequest]:
        """The config's model_warmup samples, or zeros at batch 1, preferred and max sizes."""
        return warmup_requests(self.config)
