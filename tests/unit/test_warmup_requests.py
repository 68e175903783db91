"""The warm-up requests compute runs before it is ready: an input's `input_data_file` (in
the model's `warmup` directory) gives one row, repeated to the sample's batch size, as in
Triton; a file that cannot give that row is refused, naming it."""

import struct

import numpy
import pytest
from google.protobuf import text_format

from meshserve.common.errors import FailedPrecondition
from meshserve.compute.tensors import warmup_requests
from meshserve.protocol.model_config_pb2 import ModelConfig

CONFIG = """
name: "m"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] },
        { name: "TEXT" data_type: TYPE_STRING dims: [ 2 ] } ]
model_warmup [ { name: "w" batch_size: 4 count: 2 inputs [
  { key: "X" value { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "x.bin" } },
  { key: "TEXT" value { data_type: TYPE_STRING dims: [ 2 ] input_data_file: "text.bin" } }
] } ]
"""


def config(text: str = CONFIG) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def framed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_each_input_is_its_files_row_repeated_to_the_batch_size(tmp_path):
    row = numpy.array([1.0, 2.5, -3.0], "f4")
    (tmp_path / "x.bin").write_bytes(row.tobytes() + b"trailing bytes are not read")
    (tmp_path / "text.bin").write_bytes(framed(b"hello", b"") + framed(b"unread"))
    samples = warmup_requests(config(), warmup_dir=tmp_path)
    assert len(samples) == 2  # count
    for sample in samples:
        assert [list(t.shape) for t in sample.inputs] == [[4, 3], [4, 2]]
        x = numpy.frombuffer(sample.raw_input_contents[0], "f4").reshape(4, 3)
        numpy.testing.assert_array_equal(x, numpy.tile(row, (4, 1)))
        assert sample.raw_input_contents[1] == framed(b"hello", b"") * 4


def test_an_input_without_a_file_keeps_zeros(tmp_path):
    (tmp_path / "x.bin").write_bytes(numpy.ones(3, "f4").tobytes())
    text = CONFIG.replace('input_data_file: "text.bin"', "zero_data: true")
    sample = warmup_requests(config(text), warmup_dir=tmp_path)[0]
    assert sample.raw_input_contents[1] == framed(b"", b"") * 4


@pytest.mark.parametrize(("files", "reason"), [
    ({"x.bin": b"\0" * 11}, "'x.bin' holds 11 bytes; dims [3] of FP32 need 12"),
    ({"x.bin": b"\0" * 12, "text.bin": framed(b"one")},
     "'text.bin' holds 1 BYTES elements; dims [2] need 2"),
    ({"x.bin": b"\0" * 12, "text.bin": b"\x09\0\0\0abc"},
     "'text.bin': malformed BYTES tensor: element 0 at byte 0 declares 9 bytes but only 3 "
     "remain"),
], ids=["short", "few-elements", "broken-framing"])
def test_a_file_that_cannot_give_a_row_is_refused_naming_it(tmp_path, files, reason):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(FailedPrecondition) as refused:
        warmup_requests(config(), warmup_dir=tmp_path)
    assert refused.value.message.endswith(reason)


def test_a_file_outside_the_warmup_directory_is_refused(tmp_path):
    (tmp_path / "secret").write_bytes(b"\0" * 12)
    (tmp_path / "warmup").mkdir()
    text = CONFIG.replace('"x.bin"', '"../secret"')
    with pytest.raises(FailedPrecondition) as refused:
        warmup_requests(config(text), warmup_dir=tmp_path / "warmup")
    assert refused.value.message == ("model_warmup 'w' input 'X': input_data_file "
                                     "'../secret' is outside the model's warmup directory")
