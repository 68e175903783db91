"""The TorchScript backend answers what the module called in-process answers, or refuses as
Triton's libtorch backend does: never a silent cast, never an opaque error."""

from pathlib import Path

import numpy
import pytest
import torch

from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of


class Half(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x * 0.5


class ShortRowsOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        if x.size(1) > 3:
            raise ValueError("rows longer than 3 are not supported")
        return x * 2


class Scalar(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.sum()


def write_model(repo: Path, name: str, module: torch.nn.Module, out_type: str = "TYPE_FP32",
                dims: str = "[ -1 ]", outputs: int = 1, in_type: str = "TYPE_FP32") -> Path:
    (repo / name / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(repo / name / "1" / "model.pt"))
    declared = ", ".join(f'{{ name: "OUTPUT__{i}" data_type: {out_type} dims: {dims} }}'
                         for i in range(outputs))
    (repo / name / "config.pbtxt").write_text(
        f'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
        f'input [ {{ name: "INPUT__0" data_type: {in_type} dims: {dims} }} ]\n'
        f"output [ {declared} ]\n")
    return repo / name / "1"


def load(repo: Path, name: str):
    entry = ModelRepository.load(repo).get(name)
    version_dir = entry.path / "1"
    return load_model(entry.config, version_dir / "model.pt", version_dir, "cpu", 1)


def request_of(name: str, x: numpy.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_an_output_of_another_datatype_than_the_config_is_refused_not_cast(tmp_path):
    write_model(tmp_path, "half", Half(), out_type="TYPE_INT32", dims="[ 2 ]")
    model = load(tmp_path, "half")
    x = numpy.array([[1, 3], [-5, 7.5]], numpy.float32)
    with pytest.raises(InvalidArgument) as info:
        model.run(request_of("half", x), "1")
    assert info.value.message == (
        "model 'half' version 1: configuration expects datatype TYPE_INT32 for output "
        "'OUTPUT__0', model provides TYPE_FP32")


def test_outputs_of_the_configured_datatype_are_the_modules_own(tmp_path):
    write_model(tmp_path, "half", Half(), dims="[ 2 ]")
    x = numpy.array([[1, 3], [-5, 7.5]], numpy.float32)
    response, _ = load(tmp_path, "half").run(request_of("half", x), "1")
    assert outputs_of(response)["OUTPUT__0"].tolist() == (x * 0.5).tolist()


def test_a_zero_sized_dimension_is_served_as_the_module_answers_it(tmp_path):
    write_model(tmp_path, "var", ShortRowsOnly())
    response, _ = load(tmp_path, "var").run(request_of("var", numpy.zeros((1, 0), "f4")), "1")
    assert list(response.outputs[0].shape) == [1, 0]
    assert response.raw_output_contents[0] == b""


def test_an_error_the_module_raises_is_answered_with_its_text_naming_the_model(tmp_path):
    write_model(tmp_path, "var", ShortRowsOnly())
    with pytest.raises(Internal) as info:
        load(tmp_path, "var").run(request_of("var", numpy.zeros((1, 5), "f4")), "1")
    assert info.value.message.startswith("model 'var' version 1: the TorchScript model failed:")
    assert "rows longer than 3 are not supported" in info.value.message


@pytest.mark.parametrize(("module", "outputs", "message"), [
    (Half(), 2, "the model returned 1 outputs; config.pbtxt declares 2"),
    (Scalar(), 1, "output 'OUTPUT__0' is a scalar which is not supported"),
])
def test_outputs_that_do_not_match_the_config_are_refused_saying_why(tmp_path, module,
                                                                      outputs, message):
    write_model(tmp_path, "m", module, dims="[ 2 ]", outputs=outputs)
    with pytest.raises(Internal) as info:
        load(tmp_path, "m").run(request_of("m", numpy.zeros((1, 2), "f4")), "1")
    assert info.value.message == f"model 'm' version 1: {message}"


def test_a_string_tensor_is_refused_at_load_naming_the_file(tmp_path):
    version_dir = write_model(tmp_path, "s", Half(), in_type="TYPE_STRING")
    with pytest.raises(FailedPrecondition) as info:
        load(tmp_path, "s")
    assert info.value.message.startswith(f"{version_dir / 'model.pt'}: TYPE_STRING tensors "
                                         "are not supported by TorchScript models (INPUT__0)")
