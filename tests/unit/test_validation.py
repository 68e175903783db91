"""Table-driven tests of request validation against a model configuration (pure, no I/O)."""

import struct

import numpy
import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.common.validation import Checked, validate
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.grpc_service_pb2 import InferTensorContents, ModelInferRequest


def mlp_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="mlp", max_batch_size=32)
    config.input.add(name="INPUT__0", data_type=mc.TYPE_FP32, dims=[256])
    config.output.add(name="OUTPUT__0", data_type=mc.TYPE_FP32, dims=[10])
    return config


def text_config(max_batch_size: int = 8) -> mc.ModelConfig:
    config = mc.ModelConfig(name="echo", max_batch_size=max_batch_size)
    config.input.add(name="TEXT", data_type=mc.TYPE_STRING, dims=[2])
    config.output.add(name="OUT", data_type=mc.TYPE_STRING, dims=[2])
    return config


def unbatched_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="flat", max_batch_size=0)
    config.input.add(name="X", data_type=mc.TYPE_FP32, dims=[3, 4])
    config.output.add(name="Y", data_type=mc.TYPE_FP32, dims=[3])
    return config


def int8_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="q", max_batch_size=4)
    config.input.add(name="Q", data_type=mc.TYPE_INT8, dims=[2])
    config.output.add(name="R", data_type=mc.TYPE_INT8, dims=[2])
    return config


def frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def fp32(count: int) -> bytes:
    return numpy.arange(count, dtype="<f4").tobytes()


def raw_request(batch: int = 2, *, name: str = "INPUT__0", datatype: str = "FP32",
                shape=None, raw=None, outputs=()) -> ModelInferRequest:
    request = ModelInferRequest(model_name="mlp", id="r1")
    tensor_shape = [batch, 256] if shape is None else list(shape)
    request.inputs.add(name=name, datatype=datatype, shape=tensor_shape)
    count = int(numpy.prod(tensor_shape)) if tensor_shape else 1
    request.raw_input_contents.append(fp32(max(count, 0)) if raw is None else raw)
    for output in outputs:
        request.outputs.add(name=output)
    return request


# --- accepted requests ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2, 32])
def test_valid_raw_request_passes_unchanged(batch):
    request = raw_request(batch, outputs=["OUTPUT__0"])
    before = request.SerializeToString(deterministic=True)
    assert validate(request, mlp_config()) == Checked(size=batch * 256 * 4, rows=batch,
                                                      outputs=["OUTPUT__0"])
    assert request.SerializeToString(deterministic=True) == before
    assert request.raw_input_contents[0] == fp32(batch * 256)


def test_typed_fp32_contents_become_raw_bytes():
    values = [float(i) * 0.5 - 3.25 for i in range(2 * 256)]
    request = ModelInferRequest(model_name="mlp")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[2, 256],
                       contents=InferTensorContents(fp32_contents=values))
    assert validate(request, mlp_config()) == Checked(size=2 * 256 * 4, rows=2, outputs=None)
    assert list(request.raw_input_contents) == [numpy.asarray(values, dtype=numpy.float32)
                                                .tobytes()]
    assert len(request.raw_input_contents[0]) == 2 * 256 * 4
    assert not request.inputs[0].HasField("contents")
    assert list(request.inputs[0].shape) == [2, 256]


def test_typed_bytes_contents_become_framed_raw():
    request = ModelInferRequest(model_name="echo")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 2],
                       contents=InferTensorContents(bytes_contents=[b"ab", b""]))
    validate(request, text_config())
    assert list(request.raw_input_contents) == [b"\x02\x00\x00\x00ab\x00\x00\x00\x00"]
    assert not request.inputs[0].HasField("contents")


@pytest.mark.parametrize("raw", [frame(b"hello", b""), frame(b"", b"\x00" * 70000)],
                         ids=["short", "long-and-empty"])
def test_bytes_input_with_good_framing_passes(raw):
    request = ModelInferRequest(model_name="echo")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(raw)
    validate(request, text_config())
    assert list(request.raw_input_contents) == [raw]


def test_unbatched_model_accepts_exact_dims():
    request = ModelInferRequest(model_name="flat")
    request.inputs.add(name="X", datatype="FP32", shape=[3, 4])
    request.raw_input_contents.append(fp32(12))
    assert validate(request, unbatched_config()) == Checked(size=48, rows=1, outputs=None)
    assert list(request.raw_input_contents) == [fp32(12)]


def test_optional_input_may_be_missing():
    config = mlp_config()
    config.input.add(name="MASK", data_type=mc.TYPE_FP32, dims=[256], optional=True)
    request = raw_request(3, outputs=["OUTPUT__0", "OUTPUT__0"])
    assert validate(request, config) == Checked(size=3 * 256 * 4, rows=3,
                                                outputs=["OUTPUT__0", "OUTPUT__0"])
    assert [t.name for t in request.inputs] == ["INPUT__0"]


# --- rejected requests ------------------------------------------------------------------

def no_inputs():
    return ModelInferRequest(model_name="mlp")


def unknown_input():
    return raw_request(1, name="INPUT__9")


def duplicate_input():
    request = raw_request(1)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(fp32(256))
    return request


def wrong_datatype():
    return raw_request(1, datatype="FP64", raw=fp32(512))


def empty_datatype():
    return raw_request(1, datatype="")


def wrong_rank():
    return raw_request(shape=[256], raw=fp32(256))


def wrong_dim():
    return raw_request(shape=[1, 128], raw=fp32(128))


def negative_batch():
    return raw_request(shape=[-1, 256], raw=b"")


def wrong_byte_length():
    return raw_request(2, raw=fp32(2 * 256)[:-4])


def raw_count_mismatch():
    request = raw_request(1)
    request.raw_input_contents.append(fp32(256))
    return request


def unknown_output():
    return raw_request(1, outputs=["OUTPUT__0", "PROBS"])


def contents_with_raw():
    request = raw_request(1)
    request.inputs[0].contents.fp32_contents.extend([1.0] * 256)
    return request


def typed_count_wrong():
    request = ModelInferRequest(model_name="mlp")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[2, 256],
                       contents=InferTensorContents(fp32_contents=[1.0] * 511))
    return request


def typed_missing_contents():
    request = ModelInferRequest(model_name="mlp")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 256])
    return request


REJECTED = [
    pytest.param(no_inputs, ["request has no inputs", "'mlp'", "INPUT__0"], id="no-inputs"),
    pytest.param(unknown_input, ["unknown input 'INPUT__9'", "'mlp'", "(inputs: INPUT__0)"],
                 id="unknown-input"),
    pytest.param(duplicate_input, ["input 'INPUT__0' appears more than once"],
                 id="duplicate-input"),
    pytest.param(wrong_datatype, ["input 'INPUT__0' has datatype FP64", "expects FP32"],
                 id="wrong-datatype"),
    pytest.param(empty_datatype, ["input 'INPUT__0' has datatype (empty)", "expects FP32"],
                 id="empty-datatype"),
    pytest.param(wrong_rank, ["input 'INPUT__0' has shape [256]",
                              "expects [-1, 256] with batch size 1 to 32"], id="wrong-rank"),
    pytest.param(wrong_dim, ["input 'INPUT__0' has shape [1, 128]", "expects [-1, 256]"],
                 id="wrong-dim"),
    pytest.param(negative_batch, ["has shape [-1, 256]", "expects [-1, 256]"],
                 id="negative-batch"),
    pytest.param(lambda: raw_request(shape=list(range(1, 10_001)), raw=b""),
                 ["input 'INPUT__0' has shape [1, 2, 3, 4, 5, 6, 7, 8, ... 9990 more ..., "
                  "9999, 10000]; model 'mlp' expects [-1, 256]"], id="long-shape"),
    pytest.param(lambda: raw_request(0, raw=b""),
                 ["input 'INPUT__0' has batch size 0", "max_batch_size of model 'mlp' is 32"],
                 id="batch-0"),
    pytest.param(lambda: raw_request(33),
                 ["input 'INPUT__0' has batch size 33", "max_batch_size of model 'mlp' is 32"],
                 id="batch-33"),
    pytest.param(wrong_byte_length, ["raw_input_contents holds 2044 bytes",
                                     "shape [2, 256] of FP32 needs 2048"], id="byte-length"),
    pytest.param(raw_count_mismatch, ["raw_input_contents has 2 entries for 1 inputs"],
                 id="raw-count"),
    pytest.param(unknown_output, ["unknown output 'PROBS' requested",
                                  "outputs: OUTPUT__0"], id="unknown-output"),
    pytest.param(contents_with_raw, ["input 'INPUT__0' sets contents",
                                     "raw_input_contents"], id="contents-and-raw"),
    pytest.param(typed_count_wrong, ["contents.fp32_contents holds 511 values",
                                     "shape [2, 256] needs 512"], id="typed-count"),
    pytest.param(typed_missing_contents, ["contents.fp32_contents holds 0 values",
                                          "needs 256"], id="typed-none"),
]


@pytest.mark.parametrize("make, fragments", REJECTED)
def test_mlp_rejects(make, fragments):
    with pytest.raises(InvalidArgument) as caught:
        validate(make(), mlp_config())
    assert caught.value.code == "INVALID_ARGUMENT"
    for fragment in fragments:
        assert fragment in caught.value.message


def test_missing_input_names_it():
    config = mlp_config()
    config.input.add(name="INPUT__1", data_type=mc.TYPE_FP32, dims=[4])
    with pytest.raises(InvalidArgument) as caught:
        validate(raw_request(1), config)
    assert caught.value.message == ("missing input 'INPUT__1' (model 'mlp' expects "
                                    "INPUT__0, INPUT__1)")


def test_inputs_disagreeing_on_batch_size():
    config = mlp_config()
    config.input.add(name="INPUT__1", data_type=mc.TYPE_FP32, dims=[4])
    request = raw_request(2)
    request.inputs.add(name="INPUT__1", datatype="FP32", shape=[3, 4])
    request.raw_input_contents.append(fp32(12))
    with pytest.raises(InvalidArgument) as caught:
        validate(request, config)
    assert caught.value.message == "inputs disagree on the batch size: [2, 3]"


BROKEN_BYTES = [
    pytest.param(frame(b"a"), ["holds 1 BYTES elements", "shape [1, 2] needs 2"],
                 id="too-few-elements"),
    pytest.param(frame(b"a", b"b", b"c"), ["holds 3 BYTES elements"], id="too-many"),
    pytest.param(frame(b"a") + b"\x05\x00", ["truncated length prefix"], id="truncated-prefix"),
    pytest.param(frame(b"a") + struct.pack("<I", 9) + b"xy",
                 ["declares 9 bytes but only 2 remain"], id="overlong-element"),
]


@pytest.mark.parametrize("raw, fragments", BROKEN_BYTES)
def test_bytes_input_with_broken_framing(raw, fragments):
    request = ModelInferRequest(model_name="echo")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(raw)
    with pytest.raises(InvalidArgument) as caught:
        validate(request, text_config())
    for fragment in fragments:
        assert fragment in caught.value.message


UNBATCHED_SHAPES = [
    pytest.param([1, 3, 4], "has shape [1, 3, 4]; model 'flat' expects [3, 4]", id="batch-dim"),
    pytest.param([4, 3], "has shape [4, 3]; model 'flat' expects [3, 4]", id="swapped"),
    pytest.param([12], "has shape [12]; model 'flat' expects [3, 4]", id="flattened"),
]


@pytest.mark.parametrize("shape, fragment", UNBATCHED_SHAPES)
def test_unbatched_model_requires_exact_dims(shape, fragment):
    request = ModelInferRequest(model_name="flat")
    request.inputs.add(name="X", datatype="FP32", shape=shape)
    request.raw_input_contents.append(fp32(12))
    with pytest.raises(InvalidArgument) as caught:
        validate(request, unbatched_config())
    assert fragment in caught.value.message
    assert "batch size" not in caught.value.message


@pytest.mark.parametrize("values", [[1, 300], [-129, 0]], ids=["above", "below"])
def test_typed_int8_out_of_range_is_invalid_argument(values):
    request = ModelInferRequest(model_name="q")
    request.inputs.add(name="Q", datatype="INT8", shape=[1, 2],
                       contents=InferTensorContents(int_contents=values))
    with pytest.raises(InvalidArgument) as caught:
        validate(request, int8_config())
    assert caught.value.message == ("input 'Q' contents.int_contents holds a value outside "
                                    "the range of INT8")


def test_typed_int8_in_range_becomes_raw():
    request = ModelInferRequest(model_name="q")
    request.inputs.add(name="Q", datatype="INT8", shape=[1, 2],
                       contents=InferTensorContents(int_contents=[-128, 127]))
    validate(request, int8_config())
    assert list(request.raw_input_contents) == [b"\x80\x7f"]


def test_a_tensor_in_shared_memory_is_refused_naming_it_and_the_region():
    request = raw_request(1)
    request.raw_input_contents.pop()
    request.inputs[0].parameters["shared_memory_region"].string_param = "in0"
    with pytest.raises(InvalidArgument) as error:
        validate(request, mlp_config())
    assert error.value.message == (
        "input 'INPUT__0' names shared_memory_region 'in0': shared memory is not supported; "
        "leave the parameter out and send its bytes in raw_input_contents")
    request = raw_request(1)
    request.outputs.add(name="OUTPUT__0").parameters["shared_memory_region"].string_param = "o"
    with pytest.raises(InvalidArgument) as error:
        validate(request, mlp_config())
    assert error.value.message == (
        "output 'OUTPUT__0' names shared_memory_region 'o': shared memory is not supported; "
        "leave the parameter out and it comes back in raw_output_contents")
