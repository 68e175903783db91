import struct

import numpy
import pytest

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import (
    CONFIG_FROM_WIRE,
    ELEMENT_SIZE,
    WIRE_FROM_CONFIG,
    bytes_elements,
    element_count,
    serialize_bytes,
    split_bytes_rows,
)
from meshserve.common.errors import InvalidArgument
from meshserve.protocol import model_config_pb2 as mc


def frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def test_tables_agree():
    assert WIRE_FROM_CONFIG[mc.TYPE_FP32] == "FP32"
    assert WIRE_FROM_CONFIG[mc.TYPE_STRING] == "BYTES"
    assert WIRE_FROM_CONFIG[mc.TYPE_BF16] == "BF16"
    assert mc.TYPE_INVALID not in WIRE_FROM_CONFIG
    assert len(WIRE_FROM_CONFIG) == 14
    assert CONFIG_FROM_WIRE["BYTES"] == mc.TYPE_STRING
    assert "BYTES" not in ELEMENT_SIZE
    assert set(ELEMENT_SIZE) == set(WIRE_FROM_CONFIG.values()) - {"BYTES"}
    assert set(NUMPY_DTYPE) == set(ELEMENT_SIZE) - {"BF16"}
    for wire, dtype in NUMPY_DTYPE.items():
        assert dtype.itemsize == ELEMENT_SIZE[wire]
        assert dtype.byteorder in ("<", "|", "=")
        assert numpy.dtype(dtype).newbyteorder("<") == dtype


def test_element_count():
    assert element_count([]) == 1
    assert element_count(()) == 1
    assert element_count([4, 256]) == 1024
    assert element_count([2, 0, 3]) == 0
    assert element_count((1, 3, 64, 64)) == 12288


def test_bytes_elements_good():
    assert bytes_elements(b"") == 0
    assert bytes_elements(frame(b"")) == 1
    assert bytes_elements(frame(b"abc", b"", b"\x00" * 300)) == 3
    assert bytes_elements(bytearray(frame(b"x", b"y"))) == 2
    assert bytes_elements(memoryview(frame(b"x"))) == 1


def test_bytes_elements_truncated_length():
    with pytest.raises(InvalidArgument, match="truncated length"):
        bytes_elements(frame(b"abc") + b"\x01\x00")


def test_bytes_elements_truncated_data():
    raw = frame(b"abc", b"hello")[:-2]
    with pytest.raises(InvalidArgument, match=r"element 1 .*declares 5 bytes but only 3 remain"):
        bytes_elements(raw)


def test_split_bytes_rows():
    items = [b"a", b"bb", b"", b"dddd", b"eeeee"]
    raw = frame(*items)
    chunks = split_bytes_rows(raw, [2, 0, 1, 2])
    assert chunks == [frame(b"a", b"bb"), b"", frame(b""), frame(b"dddd", b"eeeee")]
    assert b"".join(chunks) == raw
    assert split_bytes_rows(raw, [5]) == [raw]
    assert split_bytes_rows(b"", [0, 0]) == [b"", b""]


def test_split_bytes_rows_wrong_counts():
    raw = frame(b"a", b"b", b"c")
    with pytest.raises(InvalidArgument, match="3 elements"):
        split_bytes_rows(raw, [1, 1])
    with pytest.raises(InvalidArgument, match="negative"):
        split_bytes_rows(raw, [4, -1])
    with pytest.raises(InvalidArgument, match="malformed"):
        split_bytes_rows(raw[:-1], [3])


def test_serialize_bytes_writes_other_objects_as_their_str_as_triton_does():
    big = 10**12  # bytes(big) would allocate a terabyte of zeros
    elements = [b"raw", bytearray(b"ba"), "é", 7, big, 1.5, numpy.int64(-3), numpy.bytes_(b"n")]
    assert serialize_bytes(elements) == frame(b"raw", b"ba", "é".encode(), b"7",
                                              str(big).encode(), b"1.5", b"-3", b"n")
