"""HTTP/2 frames and gRPC's framing on them, for the ingress's own gRPC server (pure logic).

RFC 9113 (HTTP/2) frames, HPACK (RFC 7541) header blocks as this server writes them (every
field a literal that touches no table, so the blocks can be built once and need no encoder
state), and what gRPC adds (its HTTP/2 protocol document): a 5-byte prefix before each
message, `grpc-timeout`, `grpc-status` and `grpc-message` in the trailers, binary metadata
in base64 under names ending `-bin`.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import NamedTuple
from urllib.parse import quote

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY",
               RST_STREAM: "RST_STREAM", SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE",
               PING: "PING", GOAWAY: "GOAWAY", WINDOW_UPDATE: "WINDOW_UPDATE",
               CONTINUATION: "CONTINUATION"}
# Flags.
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# Settings.
ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x2, 0x3, 0x4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x5, 0x6
# Error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
PING_SIZE = 8

FRAME_HEADER = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream
MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return frame_header(kind, flags, stream, len(payload)) + payload


def frame_header(kind: int, flags: int, stream: int, size: int) -> bytes:
    """The header of a frame of `size` bytes (its payload may be written apart from it)."""
    return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream)


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", key, value)
                                          for key, value in settings.items()))


def parse_settings(payload: bytes) -> dict[int, int]:
    """A SETTINGS frame's values; ValueError naming the setting for a value RFC 9113 (6.5.2)
    does not allow (a frame size of 0 would leave every answer unsent)."""
    if len(payload) % 6:
        raise ValueError("SETTINGS payload is not a multiple of 6 bytes")
    settings = dict(struct.iter_unpack(">HI", payload))
    if settings.get(ENABLE_PUSH, 0) > 1:
        raise ValueError(f"SETTINGS_ENABLE_PUSH of {settings[ENABLE_PUSH]} (0 or 1)")
    frame_size = settings.get(MAX_FRAME_SIZE, DEFAULT_FRAME_SIZE)
    if not DEFAULT_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(f"SETTINGS_MAX_FRAME_SIZE of {frame_size} (from "
                         f"{DEFAULT_FRAME_SIZE} to {MAX_FRAME_SIZE_LIMIT})")
    return settings


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def goaway(last_stream: int, code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream, code) + debug)


def unpadded(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (and a HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise ValueError("padding longer than the frame")
        start, end = 1, end - payload[0]
    return payload[start:end]


def header_payload(flags: int, payload: bytes) -> bytes:
    block = unpadded(flags, payload)
    return block[5:] if flags & PRIORITY_FLAG else block


# --- HPACK as written: literal fields "without indexing", names and values as is ---------

def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header field that neither uses nor changes the decoder's dynamic table."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


STATUS_200 = b"\x88"  # ":status: 200", static table entry 8


_ANSWER_HEADERS = (STATUS_200 + literal(b"content-type", b"application/grpc")
                   + literal(b"grpc-accept-encoding", b"identity,deflate,gzip"))
_OK = literal(b"grpc-status", b"0")


def response_headers(metadata: tuple[tuple[str, str | bytes], ...] = ()) -> bytes:
    """The block that opens a gRPC answer: 200, the content type, what the server decodes."""
    return _ANSWER_HEADERS + metadata_block(metadata) if metadata else _ANSWER_HEADERS


def trailers(code: int, message: str = "",
             metadata: tuple[tuple[str, str | bytes], ...] = ()) -> bytes:
    if code == 0 and not message and not metadata:
        return _OK
    block = literal(b"grpc-status", str(code).encode())
    if message:
        block += literal(b"grpc-message", percent_encoded(message))
    return block + metadata_block(metadata)


def metadata_block(metadata) -> bytes:
    return b"".join(literal(*wire_metadatum(key, value)) for key, value in metadata)


def wire_metadatum(key: str, value: str | bytes) -> tuple[bytes, bytes]:
    name = key.lower().encode()
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return name, base64.b64encode(raw).rstrip(b"=")
    return name, value.encode() if isinstance(value, str) else value


def percent_encoded(message: str) -> bytes:
    """grpc-message: UTF-8, with '%' and anything outside printable ASCII percent-encoded."""
    return quote(message, safe=" !\"#$&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                               "[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~").encode()


# --- gRPC request headers -----------------------------------------------------------------

# Headers gRPC itself uses: never handed to a handler as metadata.
RESERVED = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                      b"grpc-accept-encoding", b"grpc-message-type", b"connection",
                      b"grpc-status", b"grpc-message"))
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                  ord("u"): 1e-6, ord("n"): 1e-9}


def timeout_seconds(value: bytes) -> float:
    """grpc-timeout: up to 8 digits and a unit (H, M, S, m, u, n)."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _TIMEOUT_UNITS:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


class RequestHead(NamedTuple):
    """What a call's header block says: the method, its timeout (seconds; None: none), how
    its messages are compressed, and the metadata a handler sees; `malformed` says what in
    it cannot be read ("": nothing), and the call is then refused saying so."""
    path: str
    timeout: float | None
    encoding: bytes
    metadata: tuple
    malformed: str = ""


def request_head(fields: list[tuple[bytes, bytes]]) -> RequestHead:
    path, timeout, encoding, metadata, malformed = "", None, b"identity", [], ""
    for name, value in fields:
        if name[:1] == b":":
            if name == b":path":
                path = value.decode("latin-1")
        elif name == b"grpc-timeout":
            try:
                timeout = timeout_seconds(value)
            except ValueError:
                timeout = None  # malformed: no deadline, as in gRPC
        elif name == b"grpc-encoding":
            encoding = value
        elif name not in RESERVED:
            try:
                metadata.append(metadatum(name, value))
            except ValueError as error:
                malformed = malformed or str(error)
    return RequestHead(path, timeout, encoding, tuple(metadata), malformed)


class HeadDecoder:
    """A connection's HPACK decoder, giving each header block's RequestHead.

    A client's calls mostly repeat the same fields, which its encoder then sends as indexes
    into the tables alone (a block whose every byte has its top bit set): such a block
    changes neither table, so it means what it meant the last time, and its head is kept
    (decoding it again took ~20 µs). Any other block may change the dynamic table, so it
    forgets what was kept.
    """

    KEEP = 64

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._kept: dict[bytes, RequestHead] = {}

    def head(self, block: bytes) -> RequestHead:
        """Raises hpack.HPACKError for a block that does not decode."""
        indexed_only = bool(block) and min(block) >= 0x80
        if indexed_only:
            head = self._kept.get(block)
            if head is not None:
                return head
        else:
            self._kept.clear()
        head = request_head(self._decoder.decode(block, raw=True))
        if indexed_only and len(self._kept) < self.KEEP:
            self._kept[block] = head
        return head

    def fields(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """A block's fields (the trailers a client may end its stream with)."""
        self._kept.clear()
        return self._decoder.decode(block, raw=True)


def metadatum(name: bytes, value: bytes) -> tuple[str, str | bytes]:
    """A header as a handler sees it: binary ones decoded from base64 (ValueError naming the
    header when its value is not base64)."""
    key = name.decode("latin-1")
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value + b"=" * (-len(value) % 4))
        except binascii.Error as error:
            raise ValueError(f"metadata '{key[:100]}' is not valid base64: {error}") from None
    return key, value.decode("latin-1")


# A message to send: its bytes, or a list of pieces whose join is its bytes (a large message
# built from large parts goes out without being joined).
Payload = bytes | memoryview | list


def payload_size(payload: Payload) -> int:
    return sum(map(len, payload)) if isinstance(payload, list) else len(payload)


def message(payload: bytes, compressed: bool = False) -> bytes:
    return message_prefix(len(payload), compressed) + payload


def message_prefix(size: int, compressed: bool = False) -> bytes:
    return MESSAGE_PREFIX.pack(1 if compressed else 0, size)


def whole_messages(data: bytes | memoryview,
                   limit: int) -> tuple[list[tuple[bool, bytes]], int]:
    """The whole messages at the start of `data`, each (compressed, a copy of its payload),
    and how many bytes they take; ValueError naming the limit for a message larger than
    `limit`, as soon as its prefix is whole."""
    taken = []
    position, end = 0, len(data)
    while end - position >= 5:
        compressed, size = MESSAGE_PREFIX.unpack_from(data, position)
        if size > limit:
            raise ValueError(f"Received message larger than max ({size} vs. {limit})")
        if end - position - 5 < size:
            break
        taken.append((bool(compressed), bytes(data[position + 5:position + 5 + size])))
        position += 5 + size
    return taken, position


def gathered(pieces: list, apart: int) -> list:
    """The pieces of one write, each run of small ones joined and every piece of `apart`
    bytes or more left as it is (a TLS transport encrypts each piece of a write apart: one
    record for a run of small frames, and no copy of a large payload to join it)."""
    writes, run = [], []
    for piece in pieces:
        if len(piece) < apart:
            run.append(piece)
            continue
        if run:
            writes.append(b"".join(run))
            run = []
        writes.append(piece)
    if run:
        writes.append(b"".join(run))
    return writes
