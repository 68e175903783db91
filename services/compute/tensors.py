"""Request bytes to numpy arrays and back, for the backends that speak numpy (ONNX
Runtime, Python models), and the warm-up requests every backend runs before it is ready.

Fixed-size tensors become read-only views of the request's bytes (no copy); BYTES tensors
become object arrays of `bytes`; BF16 is `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple

import numpy

from meshserve.common.arrays import NUMPY_DTYPE, deserialize_bytes
from meshserve.common.datatypes import (
    WIRE_FROM_CONFIG,
    element_count,
    element_ends,
    serialize_bytes,
)
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.common.repository import named_file
from meshserve.common.validation import NEAR_LIMIT, check_message_bytes
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig


def numpy_dtype(datatype: str) -> numpy.dtype:
    """The numpy dtype of a protocol datatype (BYTES: object)."""
    if datatype == "BYTES":
        return numpy.dtype(object)
    if datatype == "BF16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return NUMPY_DTYPE[datatype]


def decode(request: ModelInferRequest, config: ModelConfig) -> dict[str, numpy.ndarray]:
    """The request's inputs as arrays, by name, in config order (optional ones when sent)."""
    position = {t.name: i for i, t in enumerate(request.inputs)}
    arrays = {}
    for spec in config.input:
        i = position.get(spec.name)
        if i is None:
            if spec.optional:
                continue
            raise InvalidArgument(f"input '{spec.name}' is missing")
        tensor, raw = request.inputs[i], request.raw_input_contents[i]
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            arrays[spec.name] = deserialize_bytes(raw, shape)
        else:
            arrays[spec.name] = numpy.frombuffer(raw, numpy_dtype(tensor.datatype)).reshape(shape)
    return arrays


def wanted_outputs(request: ModelInferRequest, config: ModelConfig) -> list[str]:
    """The outputs the request asked for (all of the config's when it names none)."""
    wanted = {o.name for o in request.outputs}
    return [t.name for t in config.output if not wanted or t.name in wanted]


def encode(outputs: dict[str, numpy.ndarray], names: list[str], config: ModelConfig,
           request: ModelInferRequest, version: str, where: str) -> ModelInferResponse:
    """A response holding `names` from `outputs`, each as the config's datatype (a numpy
    value of the same kind is cast, e.g. float64 to FP32; anything else is refused)."""
    response = ModelInferResponse(model_name=request.model_name, model_version=version,
                                  id=request.id)
    datatypes = {t.name: WIRE_FROM_CONFIG[t.data_type] for t in config.output}
    size = 0
    for name in names:
        if name not in outputs:
            raise Internal(f"{where} did not produce output '{name}'")
        datatype = datatypes[name]
        array = numpy.asarray(outputs[name])
        out = response.outputs.add(name=name, datatype=datatype)
        out.shape.extend(array.shape)
        raw = _raw(array, datatype, name, where)
        size += len(raw)
        response.raw_output_contents.append(raw)
    if size > NEAR_LIMIT:
        check_answer_bytes(response, where)
    return response


def check_answer_bytes(response: ModelInferResponse, where: str) -> None:
    """Refuse an answer past what one message between the services carries, naming each
    output's size: sent, it would break the stream that carries it, and its caller would
    hear only INTERNAL."""
    each = ", ".join(f"'{out.name}' {len(raw)} bytes"
                     for out, raw in zip(response.outputs, response.raw_output_contents))
    check_message_bytes(response.ByteSize(), f"{where}: the answer (outputs {each})")


def _raw(array: numpy.ndarray, datatype: str, name: str, where: str) -> bytes:
    if datatype == "BYTES":
        if array.dtype.kind not in "OSU":
            raise Internal(f"{where}: output '{name}' is {array.dtype}; config.pbtxt says "
                           "TYPE_STRING (bytes or str elements)")
        return serialize_bytes(array.reshape(-1).tolist())
    dtype = numpy_dtype(datatype)
    if array.dtype != dtype:
        if not numpy.can_cast(array.dtype, dtype, casting="same_kind"):
            raise Internal(f"{where}: output '{name}' is {array.dtype}; config.pbtxt says "
                           f"{datatype}")
        array = array.astype(dtype)
    return numpy.ascontiguousarray(array).tobytes()


WARMUP_DIR = "warmup"  # in a model's directory: the files its model_warmup inputs name


class WarmupInput(NamedTuple):
    """How one input of a warm-up sample is made: its dims (without the batch), and random
    data, zeros, or one row read from a file."""

    dims: list[int]
    random: bool = False
    row: bytes | None = None


def warmup_requests(config: ModelConfig, default: bool = True,
                    warmup_dir: Path | None = None) -> list[ModelInferRequest]:
    """The config's model_warmup samples; without them and with `default`, zeros at batch 1,
    the preferred batch sizes and max_batch_size. An input's `input_data_file` is read from
    `warmup_dir` (the model's `warmup` directory): one row, repeated to the sample's batch
    size, as in Triton. FailedPrecondition names a file that cannot be read or is short."""
    samples = []
    if config.model_warmup:
        for warmup in config.model_warmup:
            batch = max(1, warmup.batch_size) if config.max_batch_size else 0
            given = {t.name: _warmup_input(warmup.name, t.name, WIRE_FROM_CONFIG[t.data_type],
                                           warmup.inputs[t.name], warmup_dir)
                     for t in config.input if t.name in warmup.inputs}
            for _ in range(max(1, warmup.count)):
                samples.append(_sample(config, batch, given))
        return samples
    if not default:
        return []
    sizes = {1, config.max_batch_size, *config.dynamic_batching.preferred_batch_size}
    for size in sorted(s for s in sizes if s > 0) if config.max_batch_size else [0]:
        samples.append(_sample(config, size, {}))
    return samples


def _warmup_input(warmup: str, name: str, datatype: str, sample,
                  warmup_dir: Path | None) -> WarmupInput:
    dims = list(sample.dims)
    if not sample.input_data_file:
        return WarmupInput(dims, sample.random_data)
    where = (f"model_warmup '{warmup}' input '{name}': input_data_file "
             f"'{sample.input_data_file}'")
    if warmup_dir is None:
        raise FailedPrecondition(f"{where}: the model's {WARMUP_DIR} directory is not known")
    path = named_file(warmup_dir, sample.input_data_file)
    if path is None:
        raise FailedPrecondition(f"{where} is outside the model's {WARMUP_DIR} directory")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FailedPrecondition(f"{where} cannot be read ({path}): "
                                 f"{error.strerror or error}") from None
    row = _sample_dims(dims)
    count = element_count(row)
    if datatype == "BYTES":
        try:
            ends = list(itertools.islice(element_ends(data), count))
        except InvalidArgument as error:
            raise FailedPrecondition(f"{where}: {error.message}") from None
        if len(ends) < count:
            raise FailedPrecondition(f"{where} holds {len(ends)} BYTES elements; dims "
                                     f"{row} need {count}")
        return WarmupInput(dims, row=data[:ends[-1]] if ends else b"")
    needed = count * numpy_dtype(datatype).itemsize
    if len(data) < needed:
        raise FailedPrecondition(f"{where} holds {len(data)} bytes; dims {row} of "
                                 f"{datatype} need {needed}")
    return WarmupInput(dims, row=data[:needed])


def _sample_dims(dims: list[int]) -> list[int]:
    """A warm-up row's dims: a variable one (-1) is 1."""
    return [d if d > 0 else 1 for d in dims]


def _sample(config: ModelConfig, batch: int,
            given: dict[str, WarmupInput]) -> ModelInferRequest:
    """Zeros (or seeded random data, or a file's row) for every input; BYTES elements are
    empty (or random digits), as in Triton's warm-up."""
    generator = numpy.random.default_rng(0)
    request = ModelInferRequest(model_name=config.name)
    for tensor in config.input:
        datatype = WIRE_FROM_CONFIG[tensor.data_type]
        spec = given.get(tensor.name, WarmupInput(list(tensor.dims)))
        shape = ([batch] if batch else []) + _sample_dims(spec.dims)
        if spec.row is not None:
            raw = spec.row * max(1, batch)
        elif datatype == "BYTES":
            elements = [str(generator.integers(10**6)) if spec.random else b""
                        for _ in range(element_count(shape))]
            raw = serialize_bytes(elements)
        else:
            values = generator.random(shape) if spec.random else numpy.zeros(shape)
            raw = numpy.asarray(values).astype(numpy_dtype(datatype)).tobytes()
        request.inputs.add(name=tensor.name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request
