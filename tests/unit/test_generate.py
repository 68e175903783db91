"""Triton's generate extension's request and answer objects (meshserve.ingress.generate)."""

import numpy
import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.common.repository import parse_config
from meshserve.ingress.generate import generate_answer, generate_request, spread
from meshserve.ingress.http_codec import parameters_json
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of

CONFIG = parse_config('''
backend: "python"
max_batch_size: 8
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
        { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
        { name: "scores" data_type: TYPE_FP32 dims: [ -1 ] optional: true } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]
''', "llm/config.pbtxt", "llm")


@pytest.mark.parametrize(("count", "dims", "shape"), [
    (1, [-1, 1], [1, 1]),      # one string for a batching model of dims [1]
    (3, [-1, 1], [3, 1]),      # the batch dimension takes what [1] leaves
    (4, [-1, -1], [1, 4]),     # the innermost variable dimension takes it; the other 1
    (6, [-1, 2, -1], [1, 2, 3]),
    (4, [2, 2], [2, 2]),
])
def test_elements_spread_over_the_shape_as_triton_spreads_them(count, dims, shape):
    assert spread(count, dims, "x") == shape


@pytest.mark.parametrize(("count", "dims"), [(3, [2, -1]), (2, [4]), (3, [0, -1])])
def test_a_count_the_shape_cannot_take_is_refused(count, dims):
    with pytest.raises(InvalidArgument, match=rf"input 'x' holds {count} elements, which its "
                                              rf"shape \[.*\] cannot take"):
        spread(count, dims, "x")


def test_fields_become_inputs_and_parameters():
    request = generate_request({"id": "42", "text_input": "hello", "max_tokens": 5,
                                "scores": [0.5, 1.5, 2.5], "temperature": 0.25,
                                "parameters": {"stream": False, "seed": 7}}, CONFIG, "2")
    assert (request.model_name, request.model_version, request.id) == ("llm", "2", "42")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("text_input", "BYTES", [1, 1]), ("max_tokens", "INT32", [1, 1]),
        ("scores", "FP32", [1, 3])]
    assert request.raw_input_contents[0] == b"\x05\x00\x00\x00hello"
    assert numpy.frombuffer(request.raw_input_contents[2], "<f4").tolist() == [0.5, 1.5, 2.5]
    # a field that names no input is a parameter, as in Triton
    assert parameters_json(request.parameters) == {"stream": False, "seed": 7,
                                                   "temperature": 0.25}


@pytest.mark.parametrize(("document", "match"), [
    ([1], "a generate request is a JSON object"),
    ({"id": 4}, "generate request field 'id' must be a string"),
    ({"parameters": [1]}, "generate request field 'parameters' must be an object"),
    ({"max_tokens": "five"}, "input 'max_tokens' data of INT32 must be integers"),
    ({"text_input": 3}, "input 'text_input' data of BYTES must be strings"),
    ({"text_input": ["a", "b", "c"], "max_tokens": 1}, None),  # a batch of three
])
def test_what_cannot_be_a_request_is_refused_naming_the_field(document, match):
    if match is None:
        assert list(generate_request(document, CONFIG, "").inputs[0].shape) == [3, 1]
        return
    with pytest.raises(InvalidArgument, match=match):
        generate_request(document, CONFIG, "")


def test_an_answer_holds_its_outputs_and_parameters_but_not_the_streams_mark():
    response = pb.ModelInferResponse(model_name="llm", model_version="2", id="42")
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
    response.raw_output_contents.append(b"\x02\x00\x00\x00hi")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(numpy.array([1.5, 2.5], "<f4").tobytes())
    response.parameters["tokens"].int64_param = 1
    response.parameters["triton_final_response"].bool_param = True
    assert outputs_of(response)["logits"].tolist() == [[1.5, 2.5]]
    assert generate_answer(response) == {"id": "42", "model_name": "llm", "model_version": "2",
                                         "tokens": 1, "text_output": "hi",
                                         "logits": [1.5, 2.5]}
    assert "id" not in generate_answer(pb.ModelInferResponse(model_name="llm"))
