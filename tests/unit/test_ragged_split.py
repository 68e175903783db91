"""A Python model's batch whose answers differ in shape from request to request: compute
joins each output as the requests' elements with each request's shape (`join`), and the
batcher splits it by those shapes (`split_answered`). Pure: no model, no I/O."""

import json

import numpy
import pytest

from meshserve.batcher.batch import split, split_answered
from meshserve.common import batch_requests
from meshserve.common.batch_requests import Member
from meshserve.common.datatypes import serialize_bytes
from meshserve.common.errors import Internal
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.backends.python import declared_dims, join
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.tools.client import outputs_of


def request(rid: str, rows: int, outputs=()) -> ModelInferRequest:
    built = ModelInferRequest(model_name="boxes", id=rid)
    built.inputs.add(name="COUNT", datatype="INT32", shape=[rows, 1])
    for name in outputs:
        built.outputs.add(name=name)
    return built


def boxes(rows: int, found: int, base: int) -> numpy.ndarray:
    return numpy.arange(rows * found * 4, dtype=numpy.float32).reshape(rows, found, 4) + base


def labels(rows: int, found: int) -> numpy.ndarray:
    return numpy.array([[f"{row}.{i}".encode() for i in range(found)] for row in range(rows)],
                       dtype=object).reshape(rows, found)


def answer_of(pieces: dict[str, list[numpy.ndarray]], ragged: set[str]) -> ModelInferResponse:
    """Compute's answer for the pieces (per output, each answered request's array, in order):
    the outputs in `ragged` as their elements with each request's shape, the others by rows."""
    response = ModelInferResponse(model_name="boxes", model_version="1")
    shapes = {}
    for name, arrays in pieces.items():
        text = arrays[0].dtype == object
        if name in ragged:
            joined = numpy.concatenate([a.reshape(-1) for a in arrays])
            shapes[name] = [list(a.shape) for a in arrays]
        else:
            joined = numpy.concatenate(arrays)
        response.outputs.add(name=name, datatype="BYTES" if text else "FP32",
                             shape=joined.shape)
        response.raw_output_contents.append(serialize_bytes(joined.reshape(-1).tolist())
                                            if text else joined.tobytes())
    batch_requests.write_shapes(response, shapes)
    return response


def shapes_and_values(result: ItemResult) -> dict[str, tuple[list[int], list]]:
    return {name: (list(array.shape), array.tolist())
            for name, array in outputs_of(result.response).items()}


# --- the batcher's split ---------------------------------------------------------------

def test_each_request_gets_its_own_shape_and_elements():
    parts = [request("a", 1), request("b", 2, outputs=["BOXES"]), request("c", 1)]
    arrays = {"BOXES": [boxes(1, 3, 0), boxes(2, 1, 100), boxes(1, 0, 200)],
              "LABELS": [labels(1, 3), labels(2, 1), labels(1, 0)],
              "SCORE": [numpy.full((1, 1), 0.5, numpy.float32),
                        numpy.full((2, 1), 1.5, numpy.float32),
                        numpy.full((1, 1), 2.5, numpy.float32)]}
    response = answer_of(arrays, ragged={"BOXES", "LABELS"})
    results = split_answered(response, parts, [1, 2, 1], [None, ["BOXES"], None])
    assert [(r.code, r.response.id, r.response.model_version) for r in results] == [
        (0, "a", "1"), (0, "b", "1"), (0, "c", "1")]
    for index, result in enumerate(results):
        wanted = ["BOXES"] if index == 1 else ["BOXES", "LABELS", "SCORE"]
        assert shapes_and_values(result) == {
            name: (list(arrays[name][index].shape), arrays[name][index].tolist())
            for name in wanted}
    assert [list(o.shape) for o in results[2].response.outputs] == [[1, 0, 4], [1, 0], [1, 1]]


def test_requests_that_failed_alone_leave_no_shapes():
    parts = [request("a", 1), request("b", 1), request("c", 2)]
    response = answer_of({"BOXES": [boxes(1, 2, 0), boxes(2, 5, 50)]}, ragged={"BOXES"})
    batch_requests.write_failed(response, [(1, ItemResult(code=3, message="b: bad"))])
    results = split_answered(response, parts, [1, 1, 2], [None] * 3)
    assert [(r.code, r.message) for r in results] == [(0, ""), (3, "b: bad"), (0, "")]
    assert shapes_and_values(results[0]) == {"BOXES": ([1, 2, 4], boxes(1, 2, 0).tolist())}
    assert shapes_and_values(results[2]) == {"BOXES": ([2, 5, 4], boxes(2, 5, 50).tolist())}


def test_one_request_left_keeps_its_own_shape():
    parts = [request("a", 1), request("b", 1)]
    response = answer_of({"BOXES": [boxes(1, 3, 7)]}, ragged={"BOXES"})
    batch_requests.write_failed(response, [(0, ItemResult(code=13, message="a: no"))])
    results = split_answered(response, parts, [1, 1], [None] * 2)
    assert shapes_and_values(results[1]) == {"BOXES": ([1, 3, 4], boxes(1, 3, 7).tolist())}


def test_an_answer_without_shapes_splits_by_rows_as_before():
    parts = [request("a", 1), request("b", 2)]
    response = answer_of({"BOXES": [boxes(1, 2, 0), boxes(2, 2, 9)]}, ragged=set())
    assert batch_requests.SHAPES not in response.parameters
    assert split_answered(response, parts, [1, 2], [None] * 2) == split(
        response, parts, [1, 2], [None] * 2)


def malformed(change) -> ModelInferResponse:
    response = answer_of({"BOXES": [boxes(1, 2, 0), boxes(1, 3, 0)],
                          "LABELS": [labels(1, 2), labels(1, 3)]}, ragged={"BOXES", "LABELS"})
    change(response)
    return response


def shapes_text(text: str):
    def change(response):
        response.parameters[batch_requests.SHAPES].string_param = text
    return change


def drop_label(response):
    response.raw_output_contents[1] = serialize_bytes([b"0.0", b"0.1", b"0.0", b"0.1"])


@pytest.mark.parametrize(("change", "said"), [
    (shapes_text("[1, 2]"), "compute answered a malformed parameter 'meshserve_shapes'"),
    (shapes_text('{"BOXES": [[1, 2, 4], 3]}'),
     "compute answered a malformed parameter 'meshserve_shapes'"),
    (shapes_text('{"BOXES": [[1, 2, 4], []]}'), "compute answered a parameter "
     "'meshserve_shapes' with a shape of output 'BOXES' that has no batch dimension"),
    (shapes_text('{"BOXES": [[1, 2, 4]]}'), "compute answered shapes [[1, 2, 4]] of output "
     "'BOXES' for requests of [1, 1] rows"),
    (shapes_text('{"BOXES": [[1, 2, 4], [2, 3, 4]]}'), "compute answered shapes "
     "[[1, 2, 4], [2, 3, 4]] of output 'BOXES' for requests of [1, 1] rows"),
    (shapes_text('{"BOXES": [[1, 2, 4], [1, 4, 4]]}'),
     "compute answered 80 bytes for 24 elements of FP32"),
    (drop_label, "compute answered a malformed BYTES output: cannot split a BYTES tensor of "
     "4 elements into chunks of [2, 3] (5 elements)"),
], ids=["not-an-object", "not-a-shape", "no-batch-dimension", "too-few", "rows-disagree",
        "bytes-disagree", "bytes-elements"])
def test_a_malformed_answer_is_internal(change, said):
    with pytest.raises(Internal) as caught:
        split_answered(malformed(change), [request("a", 1), request("b", 1)], [1, 1],
                       [None] * 2)
    assert caught.value.message.startswith(said)


# --- compute's join ----------------------------------------------------------------------

def config(boxes_dims=(-1, 4)) -> mc.ModelConfig:
    built = mc.ModelConfig(name="boxes", max_batch_size=8, backend="python")
    built.input.add(name="COUNT", data_type=mc.TYPE_INT32, dims=[1])
    built.output.add(name="BOXES", data_type=mc.TYPE_FP32, dims=list(boxes_dims))
    built.output.add(name="LABELS", data_type=mc.TYPE_STRING, dims=[-1])
    return built


def members(*rows: int, outputs=None) -> list[Member]:
    return [Member(count, f"r{i}", outputs[i] if outputs else None, {})
            for i, count in enumerate(rows)]


def responses(*found: tuple[int, int]) -> list[pb_utils.InferenceResponse]:
    return [pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("BOXES", boxes(rows, count, 10 * i)),
        pb_utils.Tensor("LABELS", labels(rows, count))]) for i, (rows, count) in enumerate(found)]


def joined_by(answers, joined_members):
    """`join` of a batch of `answers` (every output wanted) as compute runs it."""
    built = config()
    return join(answers, joined_members, ["BOXES", "LABELS"], built, "model 'boxes' version 1",
                declared_dims(built))


def test_join_lists_each_requests_shape_where_dims_differ():
    joined, failed, shapes = joined_by(responses((1, 3), (2, 1), (1, 0)), members(1, 2, 1))
    assert failed == []
    assert shapes == {"BOXES": [[1, 3, 4], [2, 1, 4], [1, 0, 4]],
                      "LABELS": [[1, 3], [2, 1], [1, 0]]}
    assert joined["BOXES"].tolist() == numpy.concatenate(
        [boxes(1, 3, 0).ravel(), boxes(2, 1, 10).ravel()]).tolist()
    assert joined["LABELS"].tolist() == [b"0.0", b"0.1", b"0.2", b"0.0", b"1.0"]


def test_join_of_equal_dims_is_by_rows_as_before():
    joined, _, shapes = joined_by(responses((1, 2), (3, 2)), members(1, 3))
    assert shapes == {}
    assert joined["BOXES"].shape == (4, 2, 4)
    assert joined["LABELS"].tolist() == [[b"0.0", b"0.1"], *[[b"0.0", b"0.1"],
                                                              [b"1.0", b"1.1"],
                                                              [b"2.0", b"2.1"]]]


def test_join_leaves_an_unasked_output_empty_where_dims_differ():
    answers = responses((1, 2), (1, 3), (1, 5))
    answers[1] = pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("LABELS", labels(1, 3))])
    joined, _, shapes = joined_by(answers, members(1, 1, 1, outputs=[None, ["LABELS"], None]))
    assert shapes["BOXES"] == [[1, 2, 4], [1, 0, 4], [1, 5, 4]]
    assert joined["BOXES"].size == (2 + 5) * 4


def test_shapes_round_trip_through_the_answers_parameter():
    response = ModelInferResponse()
    batch_requests.write_shapes(response, {})
    assert batch_requests.SHAPES not in response.parameters
    batch_requests.write_shapes(response, {"BOXES": [(1, 3, 4), [2, 0, 4]]})
    assert json.loads(response.parameters[batch_requests.SHAPES].string_param) == {
        "BOXES": [[1, 3, 4], [2, 0, 4]]}
    assert batch_requests.read_shapes(response) == {"BOXES": [[1, 3, 4], [2, 0, 4]]}
