"""Tensor datatype tables shared by every stage, and the BYTES tensor framing.

Three names for one element type meet in meshserve: the model configuration's `DataType`
enum (`TYPE_FP32`), the Open Inference Protocol's datatype string on the wire (`"FP32"`),
and the numpy dtype the bytes are viewed as (`meshserve.common.arrays`, so that what needs no
numpy does not import it). The tables below translate between the first two.

A BYTES tensor's raw contents are its elements one after another, each framed as a
4-byte little-endian unsigned length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable

from meshserve.common.errors import InvalidArgument
from meshserve.protocol import model_config_pb2 as mc

WIRE_FROM_CONFIG: dict[int, str] = {
    mc.TYPE_BOOL: "BOOL",
    mc.TYPE_UINT8: "UINT8",
    mc.TYPE_UINT16: "UINT16",
    mc.TYPE_UINT32: "UINT32",
    mc.TYPE_UINT64: "UINT64",
    mc.TYPE_INT8: "INT8",
    mc.TYPE_INT16: "INT16",
    mc.TYPE_INT32: "INT32",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP64: "FP64",
    mc.TYPE_STRING: "BYTES",
    mc.TYPE_BF16: "BF16",
}
"""Model configuration `DataType` value -> Open Inference Protocol datatype string."""

CONFIG_FROM_WIRE: dict[str, int] = {wire: config for config, wire in WIRE_FROM_CONFIG.items()}
"""Open Inference Protocol datatype string -> model configuration `DataType` value."""

ELEMENT_SIZE: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
}
"""Bytes per element of each fixed-size wire datatype (BYTES, being variable, is absent)."""


LENGTH = struct.Struct("<I")


def element_count(shape: Iterable[int]) -> int:
    """The number of elements of a tensor of this shape (1 for a scalar's empty shape)."""
    return math.prod(int(d) for d in shape)


def element_ends(raw: bytes | bytearray | memoryview) -> Iterable[int]:
    """Yield the end offset of each element of a serialized BYTES tensor, checking framing."""
    view = memoryview(raw).cast("B")
    size = len(view)
    offset = 0
    index = 0
    while offset < size:
        if size - offset < LENGTH.size:
            raise InvalidArgument(
                f"malformed BYTES tensor: element {index} at byte {offset} has a truncated "
                f"length prefix ({size - offset} of 4 bytes)"
            )
        (length,) = LENGTH.unpack_from(view, offset)
        start = offset + LENGTH.size
        if length > size - start:
            raise InvalidArgument(
                f"malformed BYTES tensor: element {index} at byte {offset} declares {length} "
                f"bytes but only {size - start} remain"
            )
        offset = start + length
        index += 1
        yield offset


def bytes_elements(raw: bytes | bytearray | memoryview) -> int:
    """Count the elements of a serialized BYTES tensor; InvalidArgument if framing is broken."""
    count = 0
    for _ in element_ends(raw):
        count += 1
    return count


def split_bytes_rows(raw: bytes | bytearray | memoryview, counts: list[int]) -> list[bytes]:
    """Split a serialized BYTES tensor into consecutive chunks of counts[i] elements each.

    The counts must add up to the tensor's element count exactly; each chunk is itself a
    well-formed serialized BYTES tensor.
    """
    for i, n in enumerate(counts):
        if n < 0:
            raise InvalidArgument(f"cannot split a BYTES tensor: count {i} is negative ({n})")
    view = memoryview(raw).cast("B")
    ends = list(element_ends(view))
    wanted = sum(counts)
    if wanted != len(ends):
        raise InvalidArgument(
            f"cannot split a BYTES tensor of {len(ends)} elements into chunks of "
            f"{counts} ({wanted} elements)"
        )
    chunks: list[bytes] = []
    start = 0
    taken = 0
    for n in counts:
        taken += n
        end = ends[taken - 1] if taken else 0
        chunks.append(bytes(view[start:end]))
        start = end
    return chunks


def serialize_bytes(elements: Iterable[object]) -> bytes:
    """The raw contents of a BYTES tensor holding `elements`: bytes as they are, str as
    UTF-8, and any other object as its `str()` in UTF-8 (as Triton's serialize_byte_tensor:
    7 is b"7")."""
    parts = []
    for element in elements:
        if isinstance(element, (bytes, bytearray, memoryview)):
            data = bytes(element)
        elif isinstance(element, str):
            data = element.encode("utf-8")
        else:
            data = str(element).encode("utf-8")
        parts.append(LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
