"""A Python model's request to another model as the ModelInferRequest the mesh gets, and
the answer as the InferenceResponse the model gets back. Pure."""

import json

import grpc
import numpy
import pytest

from meshserve.common.arrays import deserialize_bytes
from meshserve.common.datatypes import serialize_bytes
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.backends.model_calls import failed, request_of, response_of
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse


def call(*tensors, **kwargs) -> pb_utils.InferenceRequest:
    return pb_utils.InferenceRequest(model_name="m", inputs=list(tensors), **kwargs)


@pytest.mark.parametrize(("array", "datatype"), [
    (numpy.arange(6, dtype=numpy.float32).reshape(2, 3), "FP32"),
    (numpy.arange(4, dtype=">i4"), "INT32"),  # big-endian: sent little-endian
    (numpy.array([True, False]), "BOOL"),
    (numpy.arange(3, dtype=numpy.uint16), "UINT16"),
    (numpy.arange(3, dtype=numpy.float16), "FP16"),
    (numpy.arange(2, dtype=numpy.int64), "INT64"),
])
def test_fixed_size_inputs_travel_little_endian_with_their_shape(array, datatype):
    request = request_of(call(pb_utils.Tensor("X", array)))
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("X", datatype,
                                                                  list(array.shape))
    assert request.raw_input_contents[0] == array.astype(array.dtype.newbyteorder("<")).tobytes()


def test_bytes_inputs_the_version_outputs_parameters_and_timeout():
    words = numpy.array([[b"a", b"bc"]], dtype=numpy.object_)
    request = request_of(call(pb_utils.Tensor("W", words), model_version=3,
                              requested_output_names=["Y"], request_id="r1", timeout=2500,
                              parameters={"flag": True, "n": 7, "x": 0.5, "s": "t"}))
    assert request.model_version == "3" and request.id == "r1"
    assert request.inputs[0].datatype == "BYTES"
    assert deserialize_bytes(request.raw_input_contents[0], [1, 2]).tolist() == [[b"a", b"bc"]]
    assert [o.name for o in request.outputs] == ["Y"]
    assert {k: v.WhichOneof("parameter_choice") for k, v in request.parameters.items()} == {
        "flag": "bool_param", "n": "int64_param", "x": "double_param", "s": "string_param",
        "timeout": "int64_param"}
    assert request.parameters["timeout"].int64_param == 2500
    assert request_of(call(model_version=-1)).model_version == ""


def test_a_request_the_mesh_could_not_carry_raises_as_triton_does():
    with pytest.raises(pb_utils.TritonModelException, match="input 'C' is of dtype complex64"):
        request_of(call(pb_utils.Tensor("C", numpy.zeros(2, numpy.complex64))))
    with pytest.raises(pb_utils.TritonModelException, match="parameter 'p' must be"):
        request_of(call(parameters=json.dumps({"p": [1]})))


def test_the_answer_and_the_errors_as_the_model_reads_them():
    answer = ModelInferResponse()
    answer.outputs.add(name="Y", datatype="FP32", shape=[1, 2])
    answer.raw_output_contents.append(numpy.array([1.5, -2], numpy.float32).tobytes())
    answer.outputs.add(name="S", datatype="BYTES", shape=[1])
    answer.raw_output_contents.append(serialize_bytes([b"ok"]))
    response = response_of(answer)
    assert not response.has_error()
    assert pb_utils.get_output_tensor_by_name(response, "Y").as_numpy().tolist() == [[1.5, -2]]
    assert pb_utils.get_output_tensor_by_name(response, "S").as_numpy().tolist() == [b"ok"]
    error = failed(grpc.StatusCode.NOT_FOUND, "unknown model 'x'").error()
    assert (error.message(), error.code()) == ("unknown model 'x'", pb_utils.TritonError.NOT_FOUND)
    assert failed(grpc.StatusCode.DATA_LOSS, "?").error().code() == pb_utils.TritonError.INTERNAL


def test_exec_without_a_target_names_the_flag():
    pb_utils.set_model_calls(None)
    for decoupled in (False, True):
        with pytest.raises(pb_utils.TritonModelException, match="--bls-target"):
            call().exec(decoupled=decoupled)


def test_the_answers_parameters_are_the_responses_and_error_codes_round_trip():
    answer = ModelInferResponse()
    answer.parameters["by"].string_param = "double"
    answer.parameters["n"].int64_param = 3
    answer.parameters["ok"].bool_param = True
    answer.parameters["scale"].double_param = 0.5  # another backend's answer may hold one
    assert json.loads(response_of(answer).parameters()) == {"by": "double", "n": 3, "ok": True,
                                                            "scale": 0.5}
    assert json.loads(response_of(ModelInferResponse()).parameters()) == {}
    # The code a callee's TritonError had comes back to the caller.
    for status, code in [(grpc.StatusCode.UNIMPLEMENTED, pb_utils.TritonError.UNSUPPORTED),
                         (grpc.StatusCode.ALREADY_EXISTS, pb_utils.TritonError.ALREADY_EXISTS),
                         (grpc.StatusCode.CANCELLED, pb_utils.TritonError.CANCELLED),
                         (grpc.StatusCode.UNKNOWN, pb_utils.TritonError.UNKNOWN)]:
        assert failed(status, "x").error().code() == code, status
