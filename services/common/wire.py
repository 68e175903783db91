"""Protocol Buffers' wire format by hand, for messages that are mostly bytes already
serialized: a field appended to a message's bytes, or serialized messages joined into a
repeated field, without parsing and encoding them again; and a message's top-level fields
read without parsing what they hold (pure functions).

A parser takes a message's fields in any order, and a singular field's last occurrence wins,
so a message's bytes followed by more fields are the message with those fields set.
"""

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2  # wire type of bytes, strings and messages
FIXED32 = 5

_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    """`value` (not negative) as a base-128 varint."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int = LENGTH_DELIMITED) -> bytes:
    """The key that starts field `number`."""
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (a string's UTF-8, bytes, or a serialized message)."""
    return tag(number) + varint(len(payload)) + payload


def read_field(data: bytes | memoryview, position: int) -> tuple[int, int, int, int]:
    """The top-level field of the serialized message `data` that starts at `position`: its
    number and wire type, and where its value lies, `data[start:end]` (a length-delimited
    field's payload, a fixed field's bytes), the next field starting at `end`; a varint's
    value itself stands as `start`. ValueError where `data` holds no field there."""
    key, position = read_varint(data, position)
    number, kind = key >> 3, key & 7
    if kind == VARINT:
        value, end = read_varint(data, position)
        return number, kind, value, end
    if kind == LENGTH_DELIMITED:
        length, position = read_varint(data, position)
        end = position + length
    elif kind == FIXED64:
        end = position + 8
    elif kind == FIXED32:
        end = position + 4
    else:
        raise ValueError(f"field {number} has wire type {kind}, which is not supported")
    if number == 0 or end > len(data):
        raise ValueError(f"field {number} at byte {position} is cut short or misnumbered")
    return number, kind, position, end


def read_varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    """The varint at `position` and the position after it."""
    end = min(position + 10, len(data))
    value = shift = 0
    while position < end:
        byte = data[position]
        position += 1
        if byte < 0x80:
            return value | byte << shift, position
        value |= (byte & 0x7F) << shift
        shift += 7
    raise ValueError("a varint is cut short or longer than 10 bytes")
