"""Protocol Buffers' wire format by hand: the same bytes as the protobuf library's encoder."""

import pytest

from meshserve.common import wire
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

VARINT = 0


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16_383, 16_384, 60_000_000, 2**32,
                                   2**64 - 1])
def test_varint_is_the_encoders(value):  # (proto3 writes no field that holds 0)
    encoded = InferGroup(timeout_us=value).SerializeToString()
    assert encoded == wire.tag(InferGroup.TIMEOUT_US_FIELD_NUMBER, VARINT) + wire.varint(value)


def test_zero_is_one_byte():
    assert wire.varint(0) == b"\x00"


@pytest.mark.parametrize("size", [1, 127, 128, 70_000])
def test_length_delimited_is_the_encoders(size):
    text = "x" * size
    assert (ModelInferRequest(id=text).SerializeToString()
            == wire.length_delimited(ModelInferRequest.ID_FIELD_NUMBER, text.encode()))


def test_a_message_joined_into_a_repeated_field_parses_as_its_items():
    items = [GroupItem(request=ModelInferRequest(model_name="mlp", id=str(n)), request_id=str(n))
             for n in range(3)]
    body = (InferGroup(model_name="mlp").SerializeToString()
            + b"".join(wire.length_delimited(InferGroup.ITEMS_FIELD_NUMBER,
                                             item.SerializeToString()) for item in items))
    assert InferGroup.FromString(body) == InferGroup(model_name="mlp", items=items)


def test_read_field_finds_each_field_where_the_encoder_put_it():
    body = InferGroup(model_name="mlp", version="2", timeout_us=300, group_id=7).SerializeToString()
    found, position = [], 0
    while position < len(body):
        number, kind, start, position = wire.read_field(body, position)
        found.append((number, kind, body[start:position] if kind != VARINT else start))
    assert found == [(1, wire.LENGTH_DELIMITED, b"mlp"), (3, wire.LENGTH_DELIMITED, b"2"),
                     (4, VARINT, 300), (15, wire.FIXED64, (7).to_bytes(8, "little"))]


@pytest.mark.parametrize("body", [b"\x0a\x05mlp", b"\xa0", b"\x0b\x00", b"\x02\x00",
                                  b"\x79\x00\x00"])
def test_read_field_refuses_what_is_not_a_field(body):
    # cut short, a varint cut short, wire type 3 (a group), field 0, a fixed64 cut short
    with pytest.raises(ValueError):
        wire.read_field(body, 0)


def test_read_varint_refuses_more_than_ten_bytes():
    with pytest.raises(ValueError, match="10 bytes"):
        wire.read_varint(b"\xff" * 11 + b"\x01", 0)
    assert wire.read_varint(wire.varint(2**64 - 1), 0) == (2**64 - 1, 10)
