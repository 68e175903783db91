"""The classification extension: which outputs a request asks for as classes, and their
answer as `value:index[:label]` strings, top classes first."""

from pathlib import Path

import numpy
import pytest

from meshserve.common.arrays import deserialize_bytes
from meshserve.common.errors import InvalidArgument
from meshserve.common.repository import ModelEntry
from meshserve.ingress.classification import classify, requested
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol import model_config_pb2 as mc


def entry(data_type=mc.TYPE_FP32, batched=True, labels=None) -> ModelEntry:
    config = mc.ModelConfig(name="m", max_batch_size=8 if batched else 0)
    config.output.add(name="scores", data_type=data_type, dims=[4])
    config.output.add(name="text", data_type=mc.TYPE_STRING, dims=[1])
    return ModelEntry("m", Path("m"), config, ("1",), labels=labels or {})


def asking(count, output="scores", kind="int64_param") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    wanted = request.outputs.add(name=output)
    setattr(wanted.parameters["classification"], kind, count)
    return request


def answered(values, datatype="FP32", dtype="<f4") -> pb.ModelInferResponse:
    values = numpy.asarray(values, dtype)
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="scores", datatype=datatype, shape=list(values.shape))
    response.raw_output_contents.append(values.tobytes())
    return response


def strings(response, index=0) -> list:
    tensor = response.outputs[index]
    return deserialize_bytes(response.raw_output_contents[index], tensor.shape).tolist()


def test_a_request_without_the_parameter_asks_for_nothing():
    request = pb.ModelInferRequest(model_name="m")
    request.outputs.add(name="scores")
    assert requested(request, entry()) == {}
    assert requested(asking(3), entry()) == {"scores": 3}
    assert requested(asking(2, kind="uint64_param"), entry()) == {"scores": 2}


@pytest.mark.parametrize("count, kind", [(0, "int64_param"), (-1, "int64_param"),
                                         ("3", "string_param"), (True, "bool_param"),
                                         (2.0, "double_param")])
def test_a_count_that_is_not_a_positive_integer_is_refused(count, kind):
    with pytest.raises(InvalidArgument) as error:
        requested(asking(count, kind=kind), entry())
    assert error.value.message == ("output 'scores' parameter 'classification' must be a "
                                   "positive integer, the number of classes to return")


def test_only_a_numeric_output_can_be_classified():
    with pytest.raises(InvalidArgument) as error:
        requested(asking(1, output="text"), entry())
    assert error.value.message == "output 'text' is BYTES; 'classification' needs a numeric output"
    with pytest.raises(InvalidArgument, match="output 'scores' is BOOL"):
        requested(asking(1), entry(mc.TYPE_BOOL))


def test_each_row_answers_its_top_classes_in_order():
    response = answered([[0.1, 0.7, 0.2, 0.7], [3.5, -1.0, 0.0, 2.25]])
    classify(response, {"scores": 3}, entry())
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == ("BYTES", [2, 3])
    assert strings(response) == [[b"0.700000:1", b"0.700000:3", b"0.200000:2"],
                                 [b"3.500000:0", b"2.250000:3", b"0.000000:2"]]


def test_labels_follow_the_index_and_a_count_past_the_row_gives_the_whole_row():
    response = answered([[1, 9, 5, 7]], "INT32", "<i4")
    classify(response, {"scores": 10}, entry(mc.TYPE_INT32, labels={"scores": ("a", "b", "c")}))
    assert list(response.outputs[0].shape) == [1, 4]
    assert strings(response) == [[b"9:1:b", b"7:3", b"5:2:c", b"1:0:a"]]


def test_an_unbatched_output_is_one_row_and_other_outputs_stay():
    response = answered([0.5, 0.25, 1.0, 0.75], "FP64", "<f8")
    response.outputs.add(name="other", datatype="FP32", shape=[1])
    response.raw_output_contents.append(numpy.float32(2).tobytes())
    classify(response, {"scores": 2}, entry(mc.TYPE_FP64, batched=False))
    assert list(response.outputs[0].shape) == [2]
    assert strings(response) == [b"1.000000:2", b"0.750000:3"]
    assert response.outputs[1].datatype == "FP32"
    assert response.raw_output_contents[1] == numpy.float32(2).tobytes()
