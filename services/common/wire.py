"""Protocol Buffers' wire format written by hand, for messages that are mostly bytes already
serialized: a field appended to a message's bytes, or serialized messages joined into a
repeated field, without parsing and encoding them again (pure functions).

A parser takes a message's fields in any order, and a singular field's last occurrence wins,
so a message's bytes followed by more fields are the message with those fields set.
"""

LENGTH_DELIMITED = 2  # wire type of bytes, strings and messages

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
