"""The HTTP/REST bodies of the Open Inference Protocol ↔ protobuf: every datatype as JSON,
binary tensor data both ways, and each malformed body refused with a message naming it."""

import gzip
import json
import struct
import zlib

import numpy
import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.ingress.http_codec import (
    OutputEncoding,
    decode_infer,
    dump,
    encode_body,
    encode_infer,
    encode_request,
    json_to_raw,
    message_json,
    raw_to_json,
    response_coding,
)
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import model_config_pb2 as mc


def framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@pytest.mark.parametrize(("datatype", "data", "raw"), [
    ("BOOL", [True, False, True], b"\x01\x00\x01"),
    ("UINT8", [0, 255], b"\x00\xff"),
    ("UINT16", [1, 65535], numpy.array([1, 65535], "<u2").tobytes()),
    ("UINT32", [7, 4294967295], numpy.array([7, 4294967295], "<u4").tobytes()),
    ("UINT64", [0, 2**64 - 1], numpy.array([0, 2**64 - 1], "<u8").tobytes()),
    ("INT8", [-128, 127], numpy.array([-128, 127], "i1").tobytes()),
    ("INT16", [-3, 3], numpy.array([-3, 3], "<i2").tobytes()),
    ("INT32", [-2**31, 2**31 - 1], numpy.array([-2**31, 2**31 - 1], "<i4").tobytes()),
    ("INT64", [-2**63, 2**63 - 1], numpy.array([-2**63, 2**63 - 1], "<i8").tobytes()),
    ("FP16", [0.5, -2.0], numpy.array([0.5, -2.0], "<f2").tobytes()),
    ("FP32", [0.25, 1.0], numpy.array([0.25, 1.0], "<f4").tobytes()),
    ("FP64", [0.1, 2.0], numpy.array([0.1, 2.0], "<f8").tobytes()),
    ("BF16", [1.0, -0.5], numpy.array([0x3F80, 0xBF00], "<u2").tobytes()),
    ("BYTES", ["héllo", ""], framed("héllo".encode(), b"")),
])
def test_every_datatype_as_json_both_ways(datatype, data, raw):
    assert json_to_raw(data, datatype, [len(data)], "input 'x'") == raw
    assert raw_to_json(raw, datatype, "output 'x'") == data


def test_nested_lists_are_read_row_major():
    nested = [[1, 2, 3], [4, 5, 6]]
    assert json_to_raw(nested, "INT32", [2, 3], "input 'x'") == \
        numpy.arange(1, 7, dtype="<i4").tobytes()
    assert json_to_raw([["a"], ["b"]], "BYTES", [2, 1], "input 'x'") == framed(b"a", b"b")


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bf16 values: it rounds to the even one, 1.0.
    assert json_to_raw([1 + 2**-8], "BF16", [1], "x") == struct.pack("<H", 0x3F80)
    assert json_to_raw([1 + 3 * 2**-9], "BF16", [1], "x") == struct.pack("<H", 0x3F81)


@pytest.mark.parametrize(("data", "datatype", "shape", "message"), [
    ([1, 2], "FP32", [3], "input 'x' data holds 2 values; shape [3] needs 3"),
    ([1.5], "INT32", [1], "input 'x' data of INT32 must be integers"),
    (["a"], "FP32", [1], "input 'x' data of FP32 must be numbers in lists of equal length"),
    ([300], "UINT8", [1], "input 'x' data holds a value outside the range of UINT8"),
    ([-1], "UINT32", [1], "input 'x' data holds a value outside the range of UINT32"),
    ([1], "BOOL", [1], "input 'x' data of BOOL must be true or false"),
    ([1], "BYTES", [1], "input 'x' data of BYTES must be strings"),
    ([1], "COMPLEX", [1], "input 'x' has datatype COMPLEX, which is not one of the "
                          "protocol's datatypes"),
    ({"a": 1}, "FP32", [1], "input 'x' data must be a JSON array"),
])
def test_json_data_refused(data, datatype, shape, message):
    with pytest.raises(InvalidArgument) as refused:
        json_to_raw(data, datatype, shape, "input 'x'")
    assert refused.value.message == message


def test_bytes_outputs_that_are_not_utf8_must_be_asked_as_binary():
    with pytest.raises(InvalidArgument) as refused:
        raw_to_json(framed(b"\xff"), "BYTES", "output 'y'")
    assert refused.value.message == ("output 'y' holds bytes that are not UTF-8; ask for it "
                                     "with parameter 'binary_data': true")


def infer_body(inputs, outputs=None, parameters=None, binary=b""):
    document = {"id": "r1", "inputs": inputs}
    if outputs is not None:
        document["outputs"] = outputs
    if parameters is not None:
        document["parameters"] = parameters
    header = json.dumps(document).encode()
    return header + binary, (len(header) if binary else None)


def test_a_json_request_becomes_the_grpc_request():
    body, length = infer_body(
        [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 2], "data": [[1.0, 2.0]]}],
        outputs=[{"name": "OUTPUT__0", "parameters": {"binary_data": True, "top_k": 3}}],
        parameters={"timeout": 5000, "priority": 1, "tag": "a", "ratio": 0.5, "flag": True})
    request, encoding = decode_infer(body, length, "mlp", "2")
    assert (request.model_name, request.model_version, request.id) == ("mlp", "2", "r1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == \
        [("INPUT__0", "FP32", [1, 2])]
    assert list(request.raw_input_contents) == [numpy.array([1, 2], "<f4").tobytes()]
    kinds = {name: p.WhichOneof("parameter_choice") for name, p in request.parameters.items()}
    assert kinds == {"timeout": "int64_param", "priority": "int64_param",
                     "tag": "string_param", "ratio": "double_param", "flag": "bool_param"}
    assert [o.name for o in request.outputs] == ["OUTPUT__0"]
    assert dict(request.outputs[0].parameters)["top_k"].int64_param == 3
    assert "binary_data" not in request.outputs[0].parameters
    assert encoding.binary("OUTPUT__0") and not encoding.binary("OTHER")


def test_binary_inputs_are_taken_in_order_after_the_json():
    a, b = numpy.arange(4, dtype="<f4").tobytes(), framed(b"xy", b"z")
    body, length = infer_body(
        [{"name": "A", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
         {"name": "J", "datatype": "INT8", "shape": [1], "data": [5]},
         {"name": "B", "datatype": "BYTES", "shape": [2],
          "parameters": {"binary_data_size": len(b)}}],
        parameters={"binary_data_output": True}, binary=a + b)
    request, encoding = decode_infer(body, length, "m")
    assert list(request.raw_input_contents) == [a, b"\x05", b]
    assert all("binary_data_size" not in t.parameters for t in request.inputs)
    assert "binary_data_output" not in request.parameters
    assert encoding == OutputEncoding(default=True)


ONE_INPUT = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'
CLAIMS_400 = (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
              b'"parameters": {"binary_data_size": 400}}]}')


@pytest.mark.parametrize(("body", "length", "message"), [
    (b"{not json", None, "request body is not valid JSON: Expecting property name enclosed "
                         "in double quotes: line 1 column 2 (char 1)"),
    (b"[]", None, "request body must be a JSON object"),
    (b'{"inputs": {}}', None, "inputs must be a JSON array"),
    (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', None,
     "inputs[0] name must be a string"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]}', None,
     "input 'x' shape must be a list of integers from 0 to 2^63 - 1"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [9223372036854775808], '
     b'"data": []}]}', None,
     "input 'x' shape must be a list of integers from 0 to 2^63 - 1"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None,
     "input 'x' has neither data nor parameter 'binary_data_size'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
     b'"parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}', None,
     "input 'x' names shared_memory_region 'r': shared memory is not supported; leave the "
     "parameter out and send its data or parameter 'binary_data_size'"),
    (ONE_INPUT, len(ONE_INPUT) + 1,
     f"Inference-Header-Content-Length is {len(ONE_INPUT) + 1}; the body holds "
     f"{len(ONE_INPUT)} bytes"),
    (CLAIMS_400 + b"abcd", len(CLAIMS_400),
     "input 'x' claims binary_data_size 400; only 4 bytes of binary data remain in the body"),
    (ONE_INPUT + b"abcd", len(ONE_INPUT),
     "the body holds 4 bytes after the binary data of the inputs"),
    (b'{"inputs": [], "parameters": {"p": [1]}}', None,
     "parameter 'p' must be a boolean, a number or a string"),
    (b'{"inputs": [], "parameters": {"binary_data_output": 1}}', None,
     "parameter 'binary_data_output' must be true or false"),
    (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}', None,
     "output 'y' parameter 'binary_data' must be true or false"),
    (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r", '
     b'"shared_memory_byte_size": 4}}]}', None,
     "output 'y' names shared_memory_region 'r': shared memory is not supported; leave the "
     "parameter out and it comes back in the response, as data or with 'binary_data': true"),
])
def test_malformed_bodies_are_refused_naming_the_field(body, length, message):
    with pytest.raises(InvalidArgument) as refused:
        decode_infer(body, length, "m")
    assert refused.value.message == message


def test_response_outputs_as_json_or_binary():
    response = pb.ModelInferResponse(model_name="mlp", model_version="1", id="r1")
    response.parameters["sequence_end"].bool_param = True
    for name, values in (("A", [1.5, 2.5]), ("B", [3.0])):
        response.outputs.add(name=name, datatype="FP32", shape=[len(values)])
        response.raw_output_contents.append(numpy.array(values, "<f4").tobytes())
    document, binary = encode_infer(response, OutputEncoding(by_name={"B": True}))
    assert document == {
        "model_name": "mlp", "model_version": "1", "id": "r1",
        "parameters": {"sequence_end": True},
        "outputs": [
            {"name": "A", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]},
            {"name": "B", "datatype": "FP32", "shape": [1],
             "parameters": {"binary_data_size": 4}}]}
    assert binary == [numpy.array([3.0], "<f4").tobytes()]


def test_non_finite_outputs_are_written_as_triton_writes_them():
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="Y", datatype="FP32", shape=[4])
    values = numpy.array([numpy.nan, numpy.inf, -numpy.inf, 0.5], "<f4")
    response.raw_output_contents.append(values.tobytes())
    document, _ = encode_infer(response, OutputEncoding())
    written = dump(document)
    assert b'"data":[NaN,Infinity,-Infinity,0.5]' in written
    numpy.testing.assert_array_equal(json.loads(written)["outputs"][0]["data"], values)


@pytest.mark.parametrize("binary", [True, False])
def test_a_client_body_decodes_to_the_request_it_was_made_from(binary):
    request = pb.ModelInferRequest(model_name="m", id="7")
    request.parameters["priority"].int64_param = 2
    request.inputs.add(name="A", datatype="INT16", shape=[2, 2])
    request.raw_input_contents.append(numpy.arange(4, dtype="<i2").tobytes())
    request.inputs.add(name="S", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(framed(b"text"))
    request.outputs.add(name="Y")
    body, length = encode_request(request, binary)
    decoded, encoding = decode_infer(body, length, "m")
    assert decoded == request
    assert encoding.binary("Y") is binary


def test_messages_as_json_the_way_triton_writes_them():
    stats = pb.ModelStatisticsResponse()
    model = stats.model_stats.add(name="mlp", version="1", inference_count=2**40)
    model.inference_stats.success.count = 3
    document = message_json(stats)["model_stats"][0]
    assert document["inference_count"] == 2**40  # a number, not a string
    assert document["execution_count"] == 0  # scalars are always present
    assert document["inference_stats"]["success"] == {"count": 3, "ns": 0}
    assert "cache_hit" not in document["inference_stats"]  # unset messages are not
    config = mc.ModelConfig(name="m", max_batch_size=8)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[3])
    config.parameters["k"].string_value = "v"
    config.version_policy.latest.num_versions = 1
    rendered = message_json(config)
    assert rendered["input"][0]["data_type"] == "TYPE_FP32"
    assert rendered["input"][0]["dims"] == [3]
    assert rendered["parameters"] == {"k": {"string_value": "v"}}
    assert rendered["version_policy"] == {"latest": {"num_versions": 1}}


@pytest.mark.parametrize(("data", "datatype", "message"), [
    ([[1.0, 2.0], [3.0]], "FP32", "input 'x' data of FP32 must be numbers in lists of equal "
                                  "length"),
    ([[1, 2], [3]], "INT32", "input 'x' data holds 3 values; shape [4] needs 4"),
    ([[1.0, 2.0], "ab"], "FP64", "input 'x' data of FP64 must be numbers in lists of equal "
                                 "length"),
    ([1, 2**64], "UINT64", "input 'x' data holds a value outside the range of UINT64"),
    ([True, False, 1, 0], "INT8", "input 'x' data of INT8 must be integers"),
])
def test_ragged_mixed_and_huge_values(data, datatype, message):
    with pytest.raises(InvalidArgument) as refused:
        json_to_raw(data, datatype, [4] if datatype != "UINT64" else [2], "input 'x'")
    assert refused.value.message == message


@pytest.mark.parametrize(("accept", "coding"), [
    ("gzip", "gzip"),  # tritonclient's response_compression_algorithm="gzip"
    ("deflate", "deflate"),
    ("", ""),
    ("identity", ""),
    ("br, deflate, gzip", "deflate"),  # the first listed among equals
    ("gzip;q=0.5, deflate;q=0.8", "deflate"),
    ("GZIP ; Q=1", "gzip"),
    ("gzip;q=0", ""),  # not acceptable
    ("gzip;q=x", ""),
    ("*", ""),  # any coding: identity is one
])
def test_the_response_coding_is_the_one_the_client_prefers(accept, coding):
    assert response_coding(accept) == coding


@pytest.mark.parametrize(("coding", "decompress"), [
    ("gzip", gzip.decompress),
    ("deflate", zlib.decompress),  # HTTP's deflate is the zlib format, as tritonclient reads it
])
def test_a_compressed_body_decompresses_to_itself(coding, decompress):
    body = dump({"outputs": [{"name": "y", "data": [0.5] * 1000}]}) + bytes(4000)
    encoded = encode_body(body, coding)
    assert len(encoded) < len(body) // 10
    assert decompress(encoded) == body
