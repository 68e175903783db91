"""Requests with random inputs built from a model's metadata: what `meshserve infer`, the load
generator and the drill send when no input is given.

A `-1` dimension becomes `batch` in the first place and 1 elsewhere. Values are seeded:
floating point uniform in [0, 1) (BF16: FP32 values' top 16 bits), UINT8 the whole range (an
image), other integers 0 to 99, BOOL 0 or 1, BYTES decimal numbers as text.
"""

from __future__ import annotations

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import serialize_bytes
from meshserve.protocol import grpc_service_pb2 as pb


def input_shape(shape: list[int] | tuple[int, ...], batch: int) -> list[int]:
    """Metadata shape with -1 as `batch` in the first dimension and 1 elsewhere."""
    return [d if d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(shape)]


def random_array(datatype: str, shape: list[int], rng: numpy.random.Generator) -> numpy.ndarray:
    """A random tensor of `datatype` (BYTES: an object array of `bytes`; BF16: uint16)."""
    if datatype == "BYTES":
        return rng.integers(0, 10**6, shape).astype(str).astype(bytes).astype(object)
    if datatype == "BF16":
        return (rng.random(shape, dtype=numpy.float32).view(numpy.uint32) >> 16).astype("<u2")
    dtype = NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise ValueError(f"datatype {datatype!r} is not supported; use one of "
                         f"{', '.join([*NUMPY_DTYPE, 'BF16', 'BYTES'])}")
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    high = {"b": 2, "u": 256 if datatype == "UINT8" else 100}.get(dtype.kind, 100)
    return rng.integers(0, high, size=shape).astype(dtype)


def raw_contents(datatype: str, array: numpy.ndarray) -> bytes:
    """`array` as the raw little-endian bytes of a tensor of `datatype`."""
    if datatype == "BYTES":
        return serialize_bytes(array.reshape(-1).tolist())
    return array.tobytes()


def random_request(metadata: pb.ModelMetadataResponse, batch: int = 1, seed: int = 0, *,
                   model: str = "", version: str = ""
                   ) -> tuple[pb.ModelInferRequest, dict[str, numpy.ndarray]]:
    """A request for `model` (default: the metadata's name) at `version` with a random tensor
    per model input in `raw_input_contents`, and those tensors by input name."""
    if not metadata.inputs:
        raise ValueError(f"model {model or metadata.name!r} declares no inputs")
    rng = numpy.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model or metadata.name, model_version=version)
    arrays = {}
    for tensor in metadata.inputs:
        shape = input_shape(list(tensor.shape), batch)
        arrays[tensor.name] = random_array(tensor.datatype, shape, rng)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(raw_contents(tensor.datatype, arrays[tensor.name]))
    return request, arrays
