"""Checks a request against its model's configuration before anything moves. Pure.

Names, datatypes, shapes and byte lengths are checked from metadata, without decoding the
payload. Typed `contents` (for clients that do not send raw bytes) are turned into raw bytes
here, once, so every later hop sees only raw_input_contents.
"""

import struct

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import (
    ELEMENT_SIZE,
    WIRE_FROM_CONFIG,
    bytes_elements,
    element_count,
)
from meshserve.common.errors import InvalidArgument
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest
from meshserve.protocol.model_config_pb2 import ModelConfig

TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def expected_shape(config: ModelConfig, dims) -> list[int]:
    return ([-1] if config.max_batch_size > 0 else []) + list(dims)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate(request: ModelInferRequest, config: ModelConfig) -> None:
    """Raise InvalidArgument naming the field and the expected value, or return quietly.

    May rewrite typed `contents` into `raw_input_contents`.
    """
    model = config.name
    inputs = {t.name: t for t in config.input}
    if not request.inputs:
        raise InvalidArgument(f"request has no inputs; model '{model}' expects "
                              f"{', '.join(inputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for "
                              f"{len(request.inputs)} inputs")
    seen: set[str] = set()
    batch_sizes: set[int] = set()
    for index, tensor in enumerate(request.inputs):
        spec = inputs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unknown input '{tensor.name}' for model '{model}' "
                                  f"(inputs: {', '.join(inputs)})")
        if tensor.name in seen:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once")
        seen.add(tensor.name)
        datatype = WIRE_FROM_CONFIG[spec.data_type]
        if tensor.datatype != datatype:
            raise InvalidArgument(f"input '{tensor.name}' has datatype "
                                  f"{tensor.datatype or '(empty)'}; model '{model}' expects "
                                  f"{datatype}")
        _check_shape(tensor, spec, config, batch_sizes)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input '{tensor.name}' sets contents while the request "
                                      "uses raw_input_contents; use one or the other")
            _check_bytes(tensor.name, datatype, tensor.shape, raw[index])
    missing = [name for name, spec in inputs.items() if name not in seen and not spec.optional]
    if missing:
        raise InvalidArgument(f"missing input '{missing[0]}' (model '{model}' expects "
                              f"{', '.join(inputs)})")
    outputs = {t.name for t in config.output}
    for wanted in request.outputs:
        if wanted.name not in outputs:
            raise InvalidArgument(f"unknown output '{wanted.name}' requested (model '{model}' "
                                  f"outputs: {', '.join(t.name for t in config.output)})")
    if not raw:
        _typed_to_raw(request)


def _check_shape(tensor, spec, config: ModelConfig, batch_sizes: set[int]) -> None:
    dims = list(tensor.shape)
    expected = expected_shape(config, spec.dims)
    batched = config.max_batch_size > 0
    shown = f"; model '{config.name}' expects {_fmt(expected)}"
    if batched:
        shown += f" with batch size 1 to {config.max_batch_size}"
    if len(dims) != len(expected) or any(
            d < 0 or (e != -1 and d != e) for d, e in zip(dims, expected)):
        raise InvalidArgument(f"input '{tensor.name}' has shape {_fmt(dims)}{shown}")
    if batched:
        batch = dims[0]
        if batch < 1 or batch > config.max_batch_size:
            raise InvalidArgument(f"input '{tensor.name}' has batch size {batch}; "
                                  f"max_batch_size of model '{config.name}' is "
                                  f"{config.max_batch_size}")
        batch_sizes.add(batch)
        if len(batch_sizes) > 1:
            raise InvalidArgument(f"inputs disagree on the batch size: "
                                  f"{sorted(batch_sizes)}")


def _check_bytes(name: str, datatype: str, shape, raw: bytes) -> None:
    elements = element_count(shape)
    if datatype == "BYTES":
        found = bytes_elements(raw)
        if found != elements:
            raise InvalidArgument(f"input '{name}' raw_input_contents holds {found} BYTES "
                                  f"elements; shape {_fmt(shape)} needs {elements}")
        return
    needed = elements * ELEMENT_SIZE[datatype]
    if len(raw) != needed:
        raise InvalidArgument(f"input '{name}' raw_input_contents holds {len(raw)} bytes; "
                              f"shape {_fmt(shape)} of {datatype} needs {needed}")


def _typed_to_raw(request: ModelInferRequest) -> None:
    for tensor in request.inputs:
        field = TYPED_FIELD.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field else ()
        elements = element_count(tensor.shape)
        if not field:
            raise InvalidArgument(f"input '{tensor.name}': {tensor.datatype} data must come in "
                                  "raw_input_contents")
        if len(values) != elements:
            raise InvalidArgument(f"input '{tensor.name}' contents.{field} holds "
                                  f"{len(values)} values; shape {_fmt(tensor.shape)} needs "
                                  f"{elements}")
        if tensor.datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(v)) + v for v in values)
        else:
            try:
                data = numpy.asarray(values, dtype=NUMPY_DTYPE[tensor.datatype]).tobytes()
            except (OverflowError, ValueError):
                raise InvalidArgument(f"input '{tensor.name}' contents.{field} holds a value "
                                      f"outside the range of {tensor.datatype}") from None
        request.raw_input_contents.append(data)
        tensor.ClearField("contents")
