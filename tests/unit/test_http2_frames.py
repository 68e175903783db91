"""HTTP/2 frames, header blocks and gRPC's framing as the ingress's own gRPC server writes and
reads them (meshserve.common.http2_frames); blocks are read back with the `hpack` package."""

import re
from urllib.parse import unquote

import hpack
import pytest

from meshserve.common import http2_frames as h2
from meshserve.common.http2_connection import Http2Stream


def decoded(block: bytes) -> list[tuple[bytes, bytes]]:
    return hpack.Decoder().decode(block, raw=True)


def test_answer_headers_and_trailers_decode_as_grpc_expects():
    assert decoded(h2.response_headers((("x-id", "7"), ("trace-bin", b"\x00\xff")))) == [
        (b":status", b"200"), (b"content-type", b"application/grpc"),
        (b"grpc-accept-encoding", b"identity,deflate,gzip"),
        (b"x-id", b"7"), (b"trace-bin", b"AP8")]
    assert decoded(h2.trailers(0)) == [(b"grpc-status", b"0")]
    assert decoded(h2.trailers(8, "model 'mlp' is saturated: 100%", (("retry-after-ms", "50"),))) \
        == [(b"grpc-status", b"8"), (b"grpc-message", b"model 'mlp' is saturated: 100%25"),
            (b"retry-after-ms", b"50")]


def test_a_long_field_uses_hpack_multibyte_lengths():
    value = "x" * 1000  # past the 7-bit prefix: the length continues in more bytes
    assert decoded(h2.trailers(3, value)) == [(b"grpc-status", b"3"),
                                             (b"grpc-message", value.encode())]


def test_grpc_message_is_percent_encoded():
    message = "tensor 'ß' shape [1, 3] ≠ [1, 4]; 50% off"
    encoded = h2.percent_encoded(message)
    assert encoded.isascii() and b"%25" in encoded and b"%C3%9F" in encoded
    assert unquote(encoded.decode()) == message


@pytest.mark.parametrize(("value", "seconds"), [
    (b"5S", 5.0), (b"250m", 0.25), (b"1H", 3600.0), (b"2M", 120.0), (b"300u", 3e-4),
    (b"99999999n", 0.099999999)])
def test_grpc_timeout(value, seconds):
    assert h2.timeout_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"5", b"5s", b"123456789S", b"-1S", b"1.5S"])
def test_malformed_grpc_timeout_is_refused(value):
    with pytest.raises(ValueError, match="grpc-timeout"):
        h2.timeout_seconds(value)


def test_request_head_reads_path_timeout_encoding_and_metadata():
    head = h2.request_head([
        (b":method", b"POST"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"grpc-timeout", b"20m"), (b"grpc-encoding", b"gzip"),
        (b"authorization", b"Bearer t"), (b"x-ids-bin", b"AAE")])
    assert head.path == "/inference.GRPCInferenceService/ModelInfer"
    assert head.timeout == pytest.approx(0.02)
    assert head.encoding == b"gzip"
    assert head.metadata == (("authorization", "Bearer t"), ("x-ids-bin", b"\x00\x01"))
    assert h2.request_head([(b":path", b"/s/m"), (b"grpc-timeout", b"soon")]).timeout is None


def test_head_decoder_keeps_blocks_of_indexes_only_until_the_table_changes():
    encoder = hpack.Encoder()
    fields = [(":method", "POST"), (":path", "/s/A"), ("x-user", "ann")]
    heads = h2.HeadDecoder(1 << 16)
    first = encoder.encode(fields)  # literals: entries added to the dynamic table
    assert heads.head(first).metadata == (("x-user", "ann"),)
    again = encoder.encode(fields)  # now indexes alone
    assert min(again) >= 0x80
    kept = heads.head(again)
    assert heads.head(again) is kept
    # Another block adds entries that shift the dynamic table's indexes: the same bytes
    # would now mean other fields, and nothing kept from before is used.
    assert heads.head(encoder.encode([(":path", "/s/B"), ("x-user", "bob")])).path == "/s/B"
    assert heads.head(again).metadata == (("x-user", "bob"),)
    assert heads.head(again) is not kept


def test_settings_and_frames_round_trip():
    frame = h2.settings_frame({h2.INITIAL_WINDOW_SIZE: 1 << 22, h2.MAX_FRAME_SIZE: 1 << 20})
    high, low, kind, flags, stream = h2.FRAME_HEADER.unpack_from(frame)
    assert (high << 16 | low, kind, flags, stream) == (12, h2.SETTINGS, 0, 0)
    assert h2.parse_settings(frame[9:]) == {h2.INITIAL_WINDOW_SIZE: 1 << 22,
                                            h2.MAX_FRAME_SIZE: 1 << 20}
    with pytest.raises(ValueError, match="multiple of 6"):
        h2.parse_settings(b"\x00\x04\x00")
    big = h2.frame(h2.DATA, h2.END_STREAM, 3, b"x" * 70_000)
    high, low, kind, flags, stream = h2.FRAME_HEADER.unpack_from(big)
    assert (high << 16 | low, kind, flags, stream) == (70_000, h2.DATA, h2.END_STREAM, 3)


def test_padding_and_priority_are_removed():
    assert h2.unpadded(h2.PADDED, b"\x02abc\x00\x00") == b"abc"
    assert h2.header_payload(h2.PRIORITY_FLAG, b"\x00\x00\x00\x01\x10block") == b"block"
    with pytest.raises(ValueError, match="padding"):
        h2.unpadded(h2.PADDED, b"\x09abc")


def test_message_prefix():
    assert h2.message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert h2.message(b"", compressed=True) == b"\x01\x00\x00\x00\x00"


def test_a_write_joins_runs_of_small_pieces_and_leaves_large_ones_as_they_are():
    large = memoryview(b"x" * 40)
    assert h2.gathered([b"ab", b"c", large, b"d", large, large, b"e", b"f"], apart=40) == [
        b"abc", large, b"d", large, large, b"ef"]
    assert h2.gathered([b"ab", b"c"], apart=40) == [b"abc"]
    assert h2.gathered([large], apart=40) == [large]


class _Stream(Http2Stream):
    def __init__(self) -> None:
        super().__init__(None, 1)


def test_messages_are_taken_whole_from_frames_however_they_split():
    """Several messages in one DATA frame, and one that starts in a frame and ends two later,
    its prefix split too: each comes out once, whole, in order."""
    first, second, third = b"a" * 10, b"", b"c" * 300
    stream = _Stream()
    data = h2.message(first) + h2.message(second) + h2.message(third)
    split = len(h2.message(first) + h2.message(second)) + 3  # inside the third's prefix
    assert stream._messages_in(memoryview(data)[:split], 1000) == [(False, first),
                                                                   (False, second)]
    assert stream._messages_in(memoryview(data)[split:split + 100], 1000) == []
    assert stream._messages_in(memoryview(data)[split + 100:], 1000) == [(False, third)]
    assert not stream._partial


def test_a_message_taken_from_a_frame_is_a_copy_of_its_bytes():
    """Frames are views of the connection's read buffer, which the next read overwrites: a
    message must not be a view of them."""
    buffer = bytearray(h2.message(b"abc") + h2.message(b"def")[:4])
    stream = _Stream()
    [(_, message)] = stream._messages_in(memoryview(buffer), 1000)
    kept = bytes(stream._partial)
    buffer[:] = bytes(len(buffer))
    assert (type(message), message, bytes(stream._partial)) == (bytes, b"abc", kept)


@pytest.mark.parametrize("whole", [True, False])
def test_a_message_past_the_limit_is_refused_once_its_prefix_is_read(whole):
    stream = _Stream()
    if not whole:
        stream._messages_in(b"\x00\x00", 1000)  # a prefix split across frames
    data = h2.message(b"x" * 1001)
    with pytest.raises(ValueError, match=r"larger than max \(1001 vs. 1000\)"):
        stream._messages_in(data if whole else data[2:], 1000)


@pytest.mark.parametrize(("settings", "says"), [
    ({h2.MAX_FRAME_SIZE: 0}, "SETTINGS_MAX_FRAME_SIZE of 0 (from 16384 to 16777215)"),
    ({h2.MAX_FRAME_SIZE: 16_383}, "SETTINGS_MAX_FRAME_SIZE of 16383"),
    ({h2.MAX_FRAME_SIZE: 1 << 24}, "SETTINGS_MAX_FRAME_SIZE of 16777216"),
    ({h2.ENABLE_PUSH: 2}, "SETTINGS_ENABLE_PUSH of 2 (0 or 1)"),
])
def test_settings_values_the_protocol_does_not_allow_are_refused(settings, says):
    """RFC 9113, 6.5.2: a frame size of 0 would leave every answer unsent."""
    with pytest.raises(ValueError, match=rf"^{re.escape(says)}"):
        h2.parse_settings(h2.settings_frame(settings)[9:])


@pytest.mark.parametrize("settings", [
    {h2.MAX_FRAME_SIZE: 16_384}, {h2.MAX_FRAME_SIZE: (1 << 24) - 1}, {h2.ENABLE_PUSH: 0},
    {h2.ENABLE_PUSH: 1}, {0x99: 7}])
def test_settings_values_within_the_protocols_bounds_are_read(settings):
    assert h2.parse_settings(h2.settings_frame(settings)[9:]) == settings


@pytest.mark.parametrize("value", [b"A", b"AAAAA", b"AB=C"])
def test_binary_metadata_that_is_not_base64_makes_the_head_malformed_naming_it(value):
    """Its call is refused saying so; the block itself decoded, so the connection goes on."""
    head = h2.request_head([(b":path", b"/s/m"), (b"x-trace-bin", value), (b"x-user", b"ann")])
    assert head.malformed.startswith("metadata 'x-trace-bin' is not valid base64: ")
    assert head.path == "/s/m" and ("x-user", "ann") in head.metadata
