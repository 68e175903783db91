"""The protocol's tensors as numpy arrays: dtypes of the fixed-size datatypes and BYTES
tensors as object arrays (apart from `datatypes`, which needs no numpy)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy

from meshserve.common.datatypes import LENGTH, WIRE_FROM_CONFIG, element_count, element_ends
from meshserve.common.errors import InvalidArgument

NUMPY_DTYPE: dict[str, numpy.dtype] = {
    "BOOL": numpy.dtype(numpy.bool_),
    "UINT8": numpy.dtype("u1"),
    "UINT16": numpy.dtype("<u2"),
    "UINT32": numpy.dtype("<u4"),
    "UINT64": numpy.dtype("<u8"),
    "INT8": numpy.dtype("i1"),
    "INT16": numpy.dtype("<i2"),
    "INT32": numpy.dtype("<i4"),
    "INT64": numpy.dtype("<i8"),
    "FP16": numpy.dtype("<f2"),
    "FP32": numpy.dtype("<f4"),
    "FP64": numpy.dtype("<f8"),
}
"""Little-endian numpy dtype of each fixed-size wire datatype; numpy has no BF16."""


_DATATYPE_OF_DTYPE = {dtype: datatype for datatype, dtype in NUMPY_DTYPE.items()}


def datatype_of(dtype: numpy.dtype) -> str | None:
    """The wire datatype that holds a numpy dtype (object and string kinds: BYTES; either byte
    order); None when none does."""
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    return _DATATYPE_OF_DTYPE.get(dtype.newbyteorder("<"))


def config_dtype(data_type: int) -> numpy.dtype | None:
    """The numpy dtype of a model configuration `DataType` value (None: BYTES, BF16)."""
    return NUMPY_DTYPE.get(WIRE_FROM_CONFIG.get(data_type, ""))


def deserialize_bytes(raw: bytes | bytearray | memoryview, shape: Iterable[int]) -> numpy.ndarray:
    """A BYTES tensor's raw contents as a numpy object array of `bytes` of `shape`."""
    view = memoryview(raw).cast("B")
    elements, start = [], 0
    for end in element_ends(view):
        elements.append(bytes(view[start + LENGTH.size:end]))
        start = end
    shape = tuple(int(d) for d in shape)
    if len(elements) != element_count(shape):
        raise InvalidArgument(f"a BYTES tensor of shape {list(shape)} needs "
                              f"{element_count(shape)} elements; it holds {len(elements)}")
    array = numpy.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)
