"""A decoupled Python model in-process: the response sender of each request of a batch, the
answers it passes on (position, `more`, id, outputs, parameters, errors), and its misuse."""

import numpy
import pytest

from meshserve.batcher.batch import merge
from meshserve.common.errors import Internal
from meshserve.common.forwarding import CODE_NAME
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.python_models import DECOUPLED_CONFIG, echo_request, write_python_model

# One answer per row of each request, Y = 2 X and the row's index as a parameter, then the
# final flag alone; a request whose first X is negative gets an error answer, final.
ROWS_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if x[0, 0] < 0:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "X must not be negative", pb_utils.TritonError.INVALID_ARG)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for i, row in enumerate(x):
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("Y", 2 * row[None])],
                    parameters={"row": i}))
            sender.close()
        return RETURNED
'''


def load(tmp_path, returned="None"):
    write_python_model(tmp_path, "rows", ROWS_PY.replace("RETURNED", returned), DECOUPLED_CONFIG)
    entry = ModelRepository.load(tmp_path).get("rows")
    return load_model(entry.config, entry.path / "1" / "model.py", entry.path / "1", "auto", 1)


def batch_of(*requests: pb.ModelInferRequest) -> pb.ModelInferRequest:
    for request in requests:
        request.model_name = "rows"
    rows = [r.inputs[0].shape[0] for r in requests]
    return pb.ModelInferRequest.FromString(
        b"".join(merge(list(requests), rows, [None] * len(requests), "1", per_request=True)))


def test_each_request_of_a_batch_gets_its_answers_then_its_final_flag(tmp_path):
    model = load(tmp_path)
    batch = batch_of(echo_request("a", [[1, 2], [3, 4]]), echo_request("b", [[-1, 0]]),
                     echo_request("c", [[5, 6]]))
    assert model.requests_in(batch) == 3
    sent = []
    model.run_decoupled(batch, "1", lambda position, result: sent.append((position, result)))
    said = [(p, r.more, r.response.id, CODE_NAME[r.code],
             outputs_of(r.response).get("Y", numpy.zeros(0)).tolist(),
             {k: v.int64_param for k, v in r.response.parameters.items()}) for p, r in sent]
    assert said == [
        (0, True, "a", "OK", [[2.0, 4.0]], {"row": 0}),
        (0, True, "a", "OK", [[6.0, 8.0]], {"row": 1}),
        (0, False, "a", "OK", [], {}),  # the final flag alone: no outputs
        (1, False, "", "INVALID_ARGUMENT", [], {}),
        (2, True, "c", "OK", [[10.0, 12.0]], {"row": 0}),
        (2, False, "c", "OK", [], {})]
    assert sent[3][1].message == "model 'rows' version 1: X must not be negative"


def test_a_batch_of_one_request_is_the_request(tmp_path):
    sent = []
    load(tmp_path).run_decoupled(batch_of(echo_request("only", [[1, 1]])), "1",
                                 lambda position, result: sent.append((position, result.more)))
    assert sent == [(0, True), (0, False)]


def test_execute_of_a_decoupled_model_returns_none(tmp_path):
    model = load(tmp_path, returned="[]")
    with pytest.raises(Internal, match="model 'rows' version 1: execute of a decoupled model "
                                       "returned a list; it answers through each request's "
                                       "response sender and returns None"):
        model.run_decoupled(batch_of(echo_request("a", [[1, 2]])), "1", lambda *_: None)


def test_a_response_sender_refuses_what_triton_refuses():
    delivered = []
    sender = pb_utils.InferenceResponseSender(lambda r, final: delivered.append(final))
    with pytest.raises(pb_utils.TritonModelException, match="needs a response or the flag"):
        sender.send()
    with pytest.raises(pb_utils.TritonModelException, match="takes an InferenceResponse, "
                                                            "not a dict"):
        sender.send({"Y": 1})
    sender.send(pb_utils.InferenceResponse(), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb_utils.TritonModelException, match="its final flag was sent already"):
        sender.send(pb_utils.InferenceResponse())
    assert delivered == [True]
    with pytest.raises(pb_utils.TritonModelException, match="model_transaction_policy"):
        pb_utils.InferenceRequest().get_response_sender()
