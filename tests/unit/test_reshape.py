"""Triton's `reshape`: a TorchScript model that takes one scalar a row and makes a 2x2
matrix, configured as dims [1] and [4], gets and gives what its configuration says."""

import numpy
import pytest
import torch

from meshserve.common.errors import Internal, InvalidArgument
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.compute.reshape import reshaping, resized
from meshserve.protocol import grpc_service_pb2 as pb

CONFIG = """
name: "pairs"
platform: "pytorch_libtorch"
max_batch_size: 8
input { name: "X" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }
output { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } }
"""


class Pairs(torch.nn.Module):
    def forward(self, x):
        if x.dim() != 1:
            raise ValueError("one scalar a row")
        return torch.stack([x, x * 2, x * 3, x * 4], dim=1).reshape(-1, 2, 2)


def repository(tmp_path, config: str = CONFIG) -> ModelRepository:
    (tmp_path / "pairs" / "1").mkdir(parents=True)
    (tmp_path / "pairs" / "config.pbtxt").write_text(config)
    torch.jit.script(Pairs()).save(str(tmp_path / "pairs" / "1" / "model.pt"))
    return ModelRepository.load(tmp_path)


def test_the_model_takes_and_gives_its_reshapes_while_the_client_sees_dims(tmp_path):
    entry = repository(tmp_path).get("pairs")
    model = load_model(entry.config, entry.path / "1" / "model.pt", entry.path / "1", "cpu", 1)
    for warmup in model.warmup_requests():  # built from dims, as compute runs them
        model.run(warmup, "1")
    x = numpy.array([[1.0], [2.5], [-1.0]], numpy.float32)
    request = pb.ModelInferRequest(model_name="pairs")
    request.inputs.add(name="X", datatype="FP32", shape=[3, 1])
    request.raw_input_contents.append(x.tobytes())
    response, _ = model.run(request, "1")
    [output] = response.outputs
    assert list(output.shape) == [3, 4]
    got = numpy.frombuffer(response.raw_output_contents[0], numpy.float32).reshape(3, 4)
    assert got.tolist() == (x * numpy.array([1, 2, 3, 4], numpy.float32)).tolist()


class Backend:
    """A backend's model as compute sees it, before the reshape."""

    device = "cpu"

    def __init__(self, waits: bool) -> None:
        self.waits = waits


@pytest.mark.parametrize("waits", [False, True])
def test_a_reshaped_model_runs_where_its_backend_s_model_runs(tmp_path, waits):
    """Compute asks every model whether it `waits` before it runs a quick batch on its event
    loop (a Python model's always go to the worker thread): a reshape changes nothing of it.
    Without it, every batch after the first of a reshaped model failed INTERNAL."""
    config = repository(tmp_path).get("pairs").config
    assert reshaping(Backend(waits), config).waits is waits


def test_a_reshape_of_other_than_the_tensors_elements_is_refused_at_load(tmp_path):
    repo = repository(tmp_path, CONFIG.replace("shape: [ 2, 2 ]", "shape: [ 3, 2 ]"))
    assert repo.refused["pairs"] == ("model 'pairs' output 'Y': reshape [3, 2] holds 6 "
                                     "elements; its dims [4] hold 4")


def test_a_variable_dimension_takes_what_is_left():
    assert resized([5, 6], [2, -1], True, "input 'X'", InvalidArgument) == [5, 2, 3]
    assert resized([6], [-1, 3], False, "input 'X'", InvalidArgument) == [2, 3]
    assert resized([4, 1], [], True, "input 'X'", InvalidArgument) == [4]
    with pytest.raises(InvalidArgument) as error:
        resized([5, 7], [2, -1], True, "input 'X'", InvalidArgument)
    assert error.value.message == ("input 'X' of shape [5, 7] cannot be reshaped to [2, -1] "
                                   "after its batch dimension")
    with pytest.raises(Internal, match=r"output 'Y' of shape \[3\] cannot be reshaped to \[2\]"):
        resized([3], [2], False, "output 'Y'", Internal)
