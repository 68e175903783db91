"""Table-driven tests of joining requests into a batch and splitting its answer (pure)."""

import json
import struct

import numpy
import pytest

from meshserve.batcher.batch import (
    batch_key,
    merge,
    requested_outputs,
    sole_key,
    split,
    split_answered,
)
from meshserve.common import batch_requests
from meshserve.common.errors import Internal, InvalidArgument
from meshserve.common.validation import Schema
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse


def one_input_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="m", max_batch_size=8)
    config.dynamic_batching.SetInParent()  # requests share batches
    config.input.add(name="A", data_type=mc.TYPE_FP32, dims=[4])
    config.output.add(name="OUT", data_type=mc.TYPE_FP32, dims=[2])
    return config


def two_input_config() -> mc.ModelConfig:
    config = one_input_config()
    config.input.add(name="B", data_type=mc.TYPE_FP32, dims=[2])
    return config


def frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def floats(start: float, count: int) -> bytes:
    return numpy.arange(start, start + count, dtype="<f4").tobytes()


def request(rid: str, rows: int, *, tensors=(("A", 4),), outputs=(), base: float = 0.0,
            datatype: str = "FP32") -> ModelInferRequest:
    """A request whose tensor bytes are distinct per (request, tensor) thanks to `base`."""
    built = ModelInferRequest(model_name="m", model_version="", id=rid)
    for offset, (name, width) in enumerate(tensors):
        built.inputs.add(name=name, datatype=datatype, shape=[rows, width])
        built.raw_input_contents.append(floats(base + 1000 * offset, rows * width))
    for name in outputs:
        built.outputs.add(name=name)
    return built


def merged(parts: list[ModelInferRequest], rows: list[int], version: str,
           per_request: bool = False) -> ModelInferRequest:
    """`merge`'s batch, its pieces joined and parsed."""
    return ModelInferRequest.FromString(b"".join(merge(parts, rows, wanted_outputs(parts),
                                                       version, per_request)))


def wanted_outputs(parts: list[ModelInferRequest]) -> list[list[str] | None]:
    """The outputs each request names (None: all), as validation reads them."""
    return [[output.name for output in part.outputs] or None for part in parts]


# --- batch_key ------------------------------------------------------------------------

def test_batch_key_ignores_batch_size_and_input_order():
    ab = request("1", 1, tensors=(("A", 4), ("B", 2)))
    ba = request("2", 3, tensors=(("B", 2), ("A", 4)))
    assert batch_key(ab, True) == batch_key(ba, True) == (("A", "FP32", (4,)),
                                                          ("B", "FP32", (2,)))


@pytest.mark.parametrize("first, second, batched, same", [
    pytest.param(request("1", 1), request("2", 5), True, True, id="batch-size-only"),
    pytest.param(request("1", 1), request("2", 5), False, False, id="unbatched-full-shape"),
    pytest.param(request("1", 2), request("2", 2, tensors=(("A", 5),)), True, False,
                 id="tail-differs"),
    pytest.param(request("1", 2), request("2", 2, datatype="FP64"), True, False,
                 id="datatype-differs"),
    pytest.param(request("1", 2), request("2", 2, tensors=(("Z", 4),)), True, False,
                 id="name-differs"),
])
def test_batch_key(first, second, batched, same):
    assert (batch_key(first, batched) == batch_key(second, batched)) is same


def test_batch_key_unbatched_keeps_whole_shape():
    assert batch_key(request("1", 3), False) == (("A", "FP32", (3, 4)),)


def test_sole_key_is_every_valid_requests_key():
    config = one_input_config()
    valid = [request("1", 1), request("2", 8)]
    for part in valid:
        Schema(config).validate(part)
    assert sole_key(Schema(config)) == batch_key(valid[0], True) == batch_key(valid[1], True)
    config.max_batch_size = 0
    whole = ModelInferRequest(model_name="m", id="3")
    whole.inputs.add(name="A", datatype="FP32", shape=[4])
    whole.raw_input_contents.append(floats(0, 4))
    Schema(config).validate(whole)
    assert sole_key(Schema(config)) == batch_key(whole, False)


def test_sole_key_none_for_several_inputs_or_free_dims():
    assert sole_key(Schema(two_input_config())) is None
    free = one_input_config()
    free.input[0].dims[0] = -1
    assert sole_key(Schema(free)) is None


# --- merge --------------------------------------------------------------------------------

def test_merge_three_requests_concatenates_in_order():
    parts = [request("a", 1, base=0), request("b", 2, base=100), request("c", 3, base=200)]
    batch = merged(parts, [1, 2, 3], "7")
    assert batch.model_name == "m"
    assert batch.model_version == "7"
    assert [(t.name, t.datatype, list(t.shape)) for t in batch.inputs] == [
        ("A", "FP32", [6, 4])]
    assert list(batch.raw_input_contents) == [
        floats(0, 4) + floats(100, 8) + floats(200, 12)]
    assert len(batch.raw_input_contents[0]) == 6 * 4 * 4
    assert list(batch.outputs) == []


def test_merge_matches_inputs_by_name_not_position():
    two = (("A", 4), ("B", 2))
    parts = [
        request("a", 1, tensors=two, base=0),
        request("b", 2, tensors=(("B", 2), ("A", 4)), base=100),
        request("c", 3, tensors=two, base=200),
    ]
    # In "b", B holds floats(100, ...) and A holds floats(1100, ...).
    batch = merged(parts, [1, 2, 3], "1")
    assert [(t.name, list(t.shape)) for t in batch.inputs] == [("A", [6, 4]), ("B", [6, 2])]
    assert list(batch.raw_input_contents) == [
        floats(0, 4) + floats(1100, 8) + floats(200, 12),
        floats(1000, 2) + floats(100, 4) + floats(1200, 6),
    ]


@pytest.mark.parametrize("wanted, expected", [
    pytest.param([["OUT"], ["AUX"], ["OUT"]], ["OUT", "AUX"], id="union-in-first-seen-order"),
    pytest.param([["OUT"], [], ["AUX"]], [], id="one-wants-all"),
    pytest.param([[], []], [], id="all-want-all"),
    pytest.param([["AUX", "OUT"]], ["AUX", "OUT"], id="single"),
])
def test_requested_outputs(wanted, expected):
    assert requested_outputs([names or None for names in wanted]) == expected


def test_merge_carries_requested_outputs_union():
    parts = [request("a", 1, outputs=["OUT"]), request("b", 1, outputs=["AUX", "OUT"])]
    batch = merged(parts, [1, 1], "1")
    assert [o.name for o in batch.outputs] == ["OUT", "AUX"]


def test_merge_single_request_is_itself_with_the_version():
    only = request("solo", 3, outputs=["OUT"])
    only.parameters["k"].string_param = "v"
    only.model_version = "9"
    before = only.SerializeToString(deterministic=True)
    batch = merged([only], [3], "4")
    assert batch.model_version == "4"
    assert only.SerializeToString(deterministic=True) == before
    batch.model_version = "9"
    assert batch.SerializeToString(deterministic=True) == before


def test_merge_for_a_model_answering_each_request_describes_them():
    parts = [request("a", 1, base=0), request("b", 2, base=100, outputs=["OUT"]),
             request("c", 1, base=200)]
    parts[0].parameters["tag"].string_param = "first"
    parts[1].parameters["scale"].double_param = 0.5
    parts[1].parameters["timeout"].int64_param = 700
    parts[2].parameters["flag"].bool_param = True
    batch = merged(parts, [1, 2, 1], "1", per_request=True)
    assert list(batch.parameters) == [batch_requests.REQUESTS]
    assert json.loads(batch.parameters[batch_requests.REQUESTS].string_param) == [
        {"rows": 1, "id": "a", "outputs": None, "parameters": {"tag": "first"}},
        {"rows": 2, "id": "b", "outputs": ["OUT"],
         "parameters": {"scale": 0.5, "timeout": 700}},
        {"rows": 1, "id": "c", "outputs": None, "parameters": {"flag": True}}]
    assert list(batch.raw_input_contents) == [floats(0, 4) + floats(100, 8) + floats(200, 4)]
    assert batch_requests.members(batch, 4) == [
        batch_requests.Member(1, "a", None, {"tag": "first"}),
        batch_requests.Member(2, "b", ["OUT"], {"scale": 0.5, "timeout": 700}),
        batch_requests.Member(1, "c", None, {"flag": True})]
    # Other models' batches are as they were: nothing describes their requests.
    assert not merged(parts, [1, 2, 1], "1").parameters


def test_a_sole_request_is_itself_for_a_model_answering_each_request():
    only = request("solo", 2)
    only.parameters["k"].string_param = "v"
    assert merged([only], [2], "1", per_request=True) == merged([only], [2], "1")
    assert batch_requests.members(merged([only], [2], "1", per_request=True), 2) is None


@pytest.mark.parametrize("text, rows", [
    ("not json", 4), ('[{"rows": 1}]', 4), ('[{"rows": 4, "id": "", "outputs": null, '
                                             '"parameters": {}}]', 4),
    ('[{"rows": 1, "id": "", "outputs": null, "parameters": {}}, '
     '{"rows": 2, "id": "", "outputs": null, "parameters": {}}]', 4),
], ids=["not-json", "fields-missing", "one-request", "rows-disagree"])
def test_a_description_that_does_not_fit_the_batch_is_refused(text, rows):
    batch = ModelInferRequest()
    batch.parameters[batch_requests.REQUESTS].string_param = text
    with pytest.raises(InvalidArgument, match=f"^parameter '{batch_requests.REQUESTS}' "):
        batch_requests.members(batch, rows)


# --- split --------------------------------------------------------------------------------

def batch_response(total: int = 6) -> ModelInferResponse:
    response = ModelInferResponse(model_name="m", model_version="3", id="batch")
    response.outputs.add(name="OUT", datatype="FP32", shape=[total, 2])
    response.raw_output_contents.append(floats(0, total * 2))
    response.outputs.add(name="AUX", datatype="FP32", shape=[total, 1])
    response.raw_output_contents.append(floats(500, total))
    return response


def test_split_gives_each_request_its_rows():
    parts = [request("a", 1), request("b", 2), request("c", 3)]
    answers = [r.response for r in split(batch_response(), parts, [1, 2, 3], wanted_outputs(parts))]
    assert [(a.id, a.model_name, a.model_version) for a in answers] == [
        ("a", "m", "3"), ("b", "m", "3"), ("c", "m", "3")]
    assert [[(o.name, o.datatype, list(o.shape)) for o in a.outputs] for a in answers] == [
        [("OUT", "FP32", [1, 2]), ("AUX", "FP32", [1, 1])],
        [("OUT", "FP32", [2, 2]), ("AUX", "FP32", [2, 1])],
        [("OUT", "FP32", [3, 2]), ("AUX", "FP32", [3, 1])],
    ]
    assert [list(a.raw_output_contents) for a in answers] == [
        [floats(0, 2), floats(500, 1)],
        [floats(2, 4), floats(501, 2)],
        [floats(6, 6), floats(503, 3)],
    ]


def test_split_honours_requested_outputs():
    parts = [request("a", 1, outputs=["AUX"]), request("b", 2), request("c", 3, outputs=["OUT"])]
    answers = [r.response for r in split(batch_response(), parts, [1, 2, 3], wanted_outputs(parts))]
    assert [[o.name for o in a.outputs] for a in answers] == [["AUX"], ["OUT", "AUX"], ["OUT"]]
    assert list(answers[0].raw_output_contents) == [floats(500, 1)]
    assert list(answers[1].raw_output_contents) == [floats(2, 4), floats(501, 2)]
    assert list(answers[2].raw_output_contents) == [floats(6, 6)]


def test_split_bytes_output():
    response = ModelInferResponse(model_name="m", model_version="2")
    response.outputs.add(name="TEXT", datatype="BYTES", shape=[6, 1])
    response.raw_output_contents.append(frame(b"a", b"", b"ccc", b"d", b"ee", b"f"))
    parts = [request("a", 1), request("b", 2), request("c", 3)]
    answers = [r.response for r in split(response, parts, [1, 2, 3], wanted_outputs(parts))]
    assert [[list(o.shape) for o in a.outputs] for a in answers] == [[[1, 1]], [[2, 1]], [[3, 1]]]
    assert [list(a.raw_output_contents) for a in answers] == [
        [frame(b"a")], [frame(b"", b"ccc")], [frame(b"d", b"ee", b"f")]]


@pytest.mark.parametrize("cut, found", [(-4, 44), (4, 52)], ids=["short", "long"])
def test_split_wrong_byte_length_is_internal(cut, found):
    response = batch_response()
    raw = response.raw_output_contents[0]
    response.raw_output_contents[0] = raw[:cut] if cut < 0 else raw + b"\x00" * cut
    with pytest.raises(Internal) as caught:
        split(response, [request("a", 1), request("b", 2), request("c", 3)], [1, 2, 3],
              [None] * 3)
    assert caught.value.message == f"compute answered {found} bytes for 6 rows of FP32"


def test_split_missing_raw_output_is_internal():
    response = batch_response()
    del response.raw_output_contents[1]
    with pytest.raises(Internal) as caught:
        split(response, [request("a", 1), request("b", 5)], [1, 5], [None] * 2)
    assert "raw_output_contents" in caught.value.message


@pytest.mark.parametrize("raw", [frame(b"a", b"b"), frame(b"a", b"b") + b"\x09\x00"],
                         ids=["too-few-elements", "broken-framing"])
def test_split_malformed_bytes_output_is_internal(raw):
    response = ModelInferResponse(model_name="m", model_version="2")
    response.outputs.add(name="TEXT", datatype="BYTES", shape=[3, 1])
    response.raw_output_contents.append(raw)
    with pytest.raises(Internal) as caught:
        split(response, [request("a", 1), request("b", 2)], [1, 2], [None] * 2)
    assert type(caught.value) is Internal
    assert caught.value.message.startswith("compute answered a malformed BYTES output: ")


def test_split_single_request_passes_through():
    response = batch_response(total=4)
    only = request("solo", 4, outputs=["OUT"])
    [result] = split(response, [only], [4], wanted_outputs([only]))
    answer = result.response
    assert (answer.id, answer.model_name, answer.model_version) == ("solo", "m", "3")
    assert [(o.name, list(o.shape)) for o in answer.outputs] == [("OUT", [4, 2])]
    assert list(answer.raw_output_contents) == [floats(0, 8)]


def test_split_answered_fails_only_the_requests_compute_says_failed():
    parts = [request("a", 1), request("b", 2), request("c", 3), request("d", 1)]
    response = batch_response(total=4)  # the rows of a and c only
    batch_requests.write_failed(response, [
        (1, ItemResult(code=3, message="b: bad")), (3, ItemResult(code=13, message="d: no"))])
    results = split_answered(response, parts, [1, 2, 3, 1], wanted_outputs(parts))
    assert [(r.code, r.message) for r in results] == [
        (0, ""), (3, "b: bad"), (0, ""), (13, "d: no")]
    assert [r.response.id for r in results] == ["a", "", "c", ""]
    assert [list(o.shape) for o in results[2].response.outputs] == [[3, 2], [3, 1]]
    assert list(results[0].response.raw_output_contents) == [floats(0, 2), floats(500, 1)]
    assert list(results[2].response.raw_output_contents) == [floats(2, 6), floats(501, 3)]


def test_split_answered_with_one_request_left_or_none():
    parts = [request("a", 2), request("b", 1)]
    one_left = batch_response(total=1)
    batch_requests.write_failed(one_left, [(0, ItemResult(code=3, message="a: bad"))])
    results = split_answered(one_left, parts, [2, 1], wanted_outputs(parts))
    assert [r.code for r in results] == [3, 0]
    assert [list(o.shape) for o in results[1].response.outputs] == [[1, 2], [1, 1]]
    none_left = ModelInferResponse(model_name="m", model_version="3")
    batch_requests.write_failed(none_left, [(0, ItemResult(code=3, message="a")),
                                            (1, ItemResult(code=5, message="b"))])
    assert [(r.code, r.message) for r in split_answered(none_left, parts, [2, 1],
                                                        [None, None])] == [(3, "a"), (5, "b")]


def test_split_answered_without_failures_is_split():
    parts = [request("a", 1), request("b", 2), request("c", 3)]
    assert split_answered(batch_response(), parts, [1, 2, 3], [None] * 3) == split(
        batch_response(), parts, [1, 2, 3], [None] * 3)


@pytest.mark.parametrize("text", ['[[7, 3, "x"]]', '[[0, 0, "ok?"]]', "{", '[["a"]]'],
                         ids=["no-such-request", "code-ok", "not-json", "short-entry"])
def test_split_answered_refuses_a_malformed_failure_list(text):
    response = batch_response(total=3)
    response.parameters[batch_requests.FAILED].string_param = text
    with pytest.raises(Internal):
        split_answered(response, [request("a", 1), request("b", 2)], [1, 2], [None] * 2)


def test_split_answered_gives_each_request_its_own_response_parameters():
    parts = [request("a", 1), request("b", 2), request("c", 1)]
    response = batch_response(total=2)  # the rows of a and c
    batch_requests.write_failed(response, [(1, ItemResult(code=3, message="b: bad"))])
    batch_requests.write_parameters(response, {0: {"tag": "a", "n": 1, "ok": True},
                                               2: {}, 1: {}})
    results = split_answered(response, parts, [1, 2, 1], wanted_outputs(parts))
    assert batch_requests.parameter_values(results[0].response.parameters) == {
        "tag": "a", "n": 1, "ok": True}
    assert not results[2].response.parameters and results[1].code == 3


@pytest.mark.parametrize("text", ['{"1": {"x": 1}}', '{"0": {"x": 0.5}}', "[", '{"a": {}}'],
                         ids=["a-failed-request", "a-float", "not-json", "no-position"])
def test_split_answered_refuses_malformed_response_parameters(text):
    response = batch_response(total=1)
    batch_requests.write_failed(response, [(1, ItemResult(code=3, message="b: bad"))])
    response.parameters[batch_requests.PARAMETERS].string_param = text
    with pytest.raises(Internal):
        split_answered(response, [request("a", 1), request("b", 2)], [1, 2], [None] * 2)
