"""A TorchScript model behind meshserve's model contract: decode → predict → encode.

Raw request bytes become tensors without a copy (`torch.frombuffer`); outputs leave as the
bytes of a contiguous CPU tensor. Inputs and outputs are matched to `forward`'s arguments and
results as Triton's libtorch backend matches them (`torchscript_config`: by argument name,
by `<name>__<index>`, or in config order). As there, an output must be of its configured
datatype (never cast), a scalar output is refused, and an error the model raises fails the
batch with the model's own text.

Whatever a model needs beyond tensors in and tensors out — one Dict[str, Tensor] input,
TYPE_STRING tensors as List[str], outputs picked from its results, or parameters that change
how a batch runs — is decided when it loads: such a model is given the general decode,
predict and encode; any other keeps the plain ones.
"""

import contextlib
import io
import threading
import time
from pathlib import Path

import numpy
import torch

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import (
    CONFIG_FROM_WIRE,
    LENGTH,
    WIRE_FROM_CONFIG,
    element_ends,
    serialize_bytes,
)
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.common.server import internal_error_message
from meshserve.common.validation import NEAR_LIMIT
from meshserve.compute.tensors import check_answer_bytes, warmup_requests
from meshserve.compute.timings import Timings
from meshserve.compute.torchscript_config import (
    Settings,
    check_inputs,
    input_positions,
    output_positions,
    settings_of,
)
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import TYPE_STRING, DataType, ModelConfig

TORCH_DTYPE = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
WIRE_FROM_TORCH = {dtype: wire for wire, dtype in TORCH_DTYPE.items()}


def host_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements in row-major order: numpy's copy (on the CPU, one torch call where
    detach, a move, contiguous and a view took four); BF16, which numpy lacks, as bytes."""
    if tensor.requires_grad or tensor.device.type != "cpu":
        tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.contiguous().view(torch.uint8)
    return tensor.numpy().tobytes()


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
        where = where or config.name
        try:
            self.settings = settings_of({key: value.string_value
                                         for key, value in config.parameters.items()})
            check_strings(config)
        except FailedPrecondition as error:
            raise FailedPrecondition(f"{where}: {error.message}") from None
        source = path if isinstance(path, io.BytesIO) else str(path)
        self.module = torch.jit.load(source, map_location=device).eval()
        inputs = [(t.name, WIRE_FROM_CONFIG[t.data_type]) for t in config.input]
        self._keys = self._dict_keys(inputs, where)
        if self._keys is None:  # in the order of forward's arguments
            inputs = [inputs[i] for i in self._argument_order(where)]
        self._inputs = inputs
        self._outputs = [(t.name, WIRE_FROM_CONFIG[t.data_type],
                          TORCH_DTYPE.get(WIRE_FROM_CONFIG[t.data_type])) for t in config.output]
        picks = output_positions([t.name for t in config.output])
        self._picks = None if picks == list(range(len(picks))) else picks
        self._mode = batch_mode(self.settings, device)
        if (self._keys is not None or self._picks is not None or self.settings.per_batch
                or any(t.data_type == TYPE_STRING for t in (*config.input, *config.output))):
            self.decode, self.predict, self.encode = (self._decode_any, self._predict_any,
                                                      self._encode_any)

    def _arguments(self, where: str) -> list:
        """forward's arguments, after `self`."""
        forward = getattr(self.module, "forward", None)
        if forward is None:
            raise FailedPrecondition(f"{where}: the TorchScript module has no forward method")
        arguments = list(forward.schema.arguments)
        return arguments[1:] if arguments and arguments[0].type.kind() == "ClassType" \
            else arguments

    def _dict_keys(self, inputs: list[tuple[str, str]], where: str) -> list[str] | None:
        """The inputs' names, when forward takes them as one Dict[str, Tensor] (keyed by
        name, as in Triton); None when it takes them as arguments."""
        arguments = self._arguments(where)
        if len(arguments) != 1 or arguments[0].type.kind() != "DictType":
            return None
        strings = [name for name, datatype in inputs if datatype == "BYTES"]
        if strings:
            raise FailedPrecondition(f"{where}: forward takes a Dict[str, Tensor]; input "
                                     f"'{strings[0]}' is TYPE_STRING, not a tensor")
        return [name for name, _ in inputs]

    def _argument_order(self, where: str) -> list[int]:
        """The config's inputs in the order of forward's arguments (indices into config)."""
        arguments = self._arguments(where)
        names = [t.name for t in self.config.input]
        positions = input_positions(names, [a.name for a in arguments])
        required = next((i for i, a in enumerate(arguments) if a.has_default_value()),
                        len(arguments))
        try:
            check_inputs(names, positions, [a.name for a in arguments], required)
        except FailedPrecondition as error:
            raise FailedPrecondition(f"{where}: {error.message}") from None
        return sorted(range(len(names)), key=positions.__getitem__)

    def decode(self, request: ModelInferRequest) -> list[torch.Tensor]:
        return [self._tensor_in(raw, datatype, shape)
                for _, datatype, raw, shape in self._raw_inputs(request)]

    def _raw_inputs(self, request: ModelInferRequest):
        """(name, datatype, bytes, shape) of each input, in config order (InvalidArgument
        naming one the request lacks)."""
        position = {t.name: i for i, t in enumerate(request.inputs)}
        for name, datatype in self._inputs:
            i = position.get(name)
            if i is None:
                raise InvalidArgument(f"input '{name}' is missing")
            yield name, datatype, request.raw_input_contents[i], request.inputs[i].shape

    def _tensor_in(self, raw: bytes, datatype: str, shape) -> torch.Tensor:
        """An input's bytes as a tensor of its shape on the model's device, without a copy
        on the CPU: numpy's view of them (one torch call where torch.frombuffer, a reshape
        and a move took three), but for BF16, which numpy lacks."""
        dtype = NUMPY_DTYPE.get(datatype)
        if dtype is not None:
            tensor = torch.from_numpy(numpy.frombuffer(raw, dtype).reshape(shape))
        else:  # frombuffer refuses an empty buffer: a tensor with a 0 dimension has none
            dtype = TORCH_DTYPE[datatype]
            tensor = (torch.frombuffer(raw, dtype=dtype) if raw
                      else torch.empty(0, dtype=dtype)).reshape(tuple(shape))
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def predict(self, tensors: list[torch.Tensor], version: str = "") -> list[torch.Tensor]:
        try:
            with torch.inference_mode():
                result = self.module(*tensors)
        except Exception as error:  # noqa: BLE001 — whatever the model raises: its own words
            raise self._failed(error, version) from None
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def encode(self, outputs: list[torch.Tensor], request: ModelInferRequest,
               version: str, strings: bool = False) -> ModelInferResponse:
        """The response of `outputs` in config order; with `strings`, a TYPE_STRING output
        comes from a List[str] (a BYTES tensor of one dimension)."""
        if len(outputs) < len(self._outputs):  # results past the config's are not sent
            raise Internal(f"{self._where(version)}: the model returned {len(outputs)} "
                           f"outputs; config.pbtxt declares {len(self._outputs)}")
        wanted = {o.name for o in request.outputs}
        response = ModelInferResponse(model_name=request.model_name, model_version=version,
                                      id=request.id)
        size = 0
        for (name, datatype, dtype), value in zip(self._outputs, outputs):
            if wanted and name not in wanted:
                continue
            if strings and dtype is None:
                shape, raw = self._strings_out(name, value, version)
            else:
                if getattr(value, "dtype", None) != dtype or not value.dim():
                    raise self._refused(name, dtype, value, version)
                shape, raw = value.shape, host_bytes(value)
            response.outputs.add(name=name, datatype=datatype).shape.extend(shape)
            response.raw_output_contents.append(raw)
            size += len(raw)
        if size > NEAR_LIMIT:
            check_answer_bytes(response, self._where(version))
        return response

    # The general decode, predict and encode, for a model that needs them (see __init__).

    def _decode_any(self, request: ModelInferRequest) -> list:
        """Tensors, List[str] for TYPE_STRING inputs, and all as one Dict when forward
        takes one."""
        values = [strings_of(raw, name) if datatype == "BYTES" else
                  self._tensor_in(raw, datatype, shape)
                  for name, datatype, raw, shape in self._raw_inputs(request)]
        return values if self._keys is None else [dict(zip(self._keys, values))]

    def _predict_any(self, values: list, version: str = "") -> list:
        """The results in config order, the module run as the settings say."""
        try:
            with self._mode():
                result = self.module(*values)
        except Exception as error:  # noqa: BLE001 — whatever the model raises: its own words
            raise self._failed(error, version) from None
        strings = isinstance(result, list) and all(isinstance(s, str) for s in result)
        outputs = list(result) if isinstance(result, (tuple, list)) and not strings \
            else [result]
        if self._picks is None:
            return outputs
        for (name, _, _), pick in zip(self._outputs, self._picks):
            if pick >= len(outputs):
                raise Internal(f"{self._where(version)}: output '{name}' is result {pick}; "
                               f"the model returned {len(outputs)}")
        return [outputs[pick] for pick in self._picks]

    def _encode_any(self, outputs: list, request: ModelInferRequest,
                    version: str) -> ModelInferResponse:
        # The class's encode: this instance's `encode` is this method.
        return TorchScriptModel.encode(self, outputs, request, version, strings=True)

    def _strings_out(self, name: str, value, version: str) -> tuple[list[int], bytes]:
        """A TYPE_STRING output's shape and BYTES contents: the model returns a List[str]."""
        if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise Internal(f"{self._where(version)}: output '{name}' is TYPE_STRING: the "
                           f"model must return a List[str] for it, not a "
                           f"{type(value).__name__}")
        return [len(value)], serialize_bytes(value)

    def _failed(self, error: Exception, version: str) -> Internal:
        """An error the model raised: its own words (the last line of TorchScript's
        traceback), and an id its whole trace is logged by."""
        said = str(error).strip().splitlines() or [type(error).__name__]
        return Internal(f"{self._where(version)}: the TorchScript model failed: {said[-1]} "
                        f"({internal_error_message(error)})")

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

    def run(self, request: ModelInferRequest, version: str,
            cancelled: threading.Event | None = None) -> tuple[ModelInferResponse, Timings]:
        """The whole contract, timed per phase (runs on a worker thread). A forward pass runs
        to its end: `cancelled` (the batch was given up) is for models that can stop early."""
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

    def warmup_requests(self, warmup_dir: Path | None = None) -> list[ModelInferRequest]:
        """The config's model_warmup samples, or zeros at batch 1, preferred and max sizes."""
        return warmup_requests(self.config, warmup_dir=warmup_dir)


def check_strings(config: ModelConfig) -> None:
    """A TYPE_STRING tensor reaches and leaves a TorchScript model as a List[str]: of one
    dimension, the batch's when batching (`dims: [ 1 ] reshape: { shape: [ ] }`), as in
    Triton."""
    batch = 1 if config.max_batch_size > 0 else 0
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            if tensor.data_type != TYPE_STRING:
                continue
            field, shape = (("reshape.shape", list(tensor.reshape.shape))
                            if tensor.HasField("reshape") else ("dims", list(tensor.dims)))
            if len(shape) + batch != 1:
                raise FailedPrecondition(
                    f"TYPE_STRING {kind} '{tensor.name}' is a List[str] to a TorchScript "
                    f"model, of one dimension; its {field} {shape} give it "
                    f"{len(shape) + batch}{' with the batch dimension' if batch else ''}")


def strings_of(raw: bytes, name: str) -> list[str]:
    """A BYTES tensor's elements as the List[str] TorchScript takes: each must be UTF-8."""
    view, values, start = memoryview(raw), [], 0
    for end in element_ends(view):
        try:
            values.append(str(view[start + LENGTH.size:end], "utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}': element {len(values)} is not UTF-8, which "
                                  "a TorchScript List[str] needs") from None
        start = end
    return values


def batch_mode(settings: Settings, device: torch.device):
    """What each batch runs in: inference mode, or as the config's parameters say (no_grad
    without INFERENCE_MODE, as in Triton; graph-executor optimization, which is per
    thread; the CUDA cache emptied after the batch)."""
    if not settings.per_batch:
        return torch.inference_mode

    @contextlib.contextmanager
    def mode():
        try:
            with (torch.inference_mode() if settings.inference_mode else torch.no_grad()), \
                    torch.jit.optimized_execution(settings.optimized_execution):
                yield
        finally:
            if settings.cache_cleaning and device.type == "cuda":
                torch.cuda.empty_cache()

    return mode
