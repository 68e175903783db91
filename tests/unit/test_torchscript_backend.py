"""The TorchScript backend answers what the module called in-process answers, or refuses as
Triton's libtorch backend does: never a silent cast, never an opaque error."""

from pathlib import Path

import numpy
import pytest
import torch

from meshserve.common.datatypes import serialize_bytes
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


class Same(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x


class Transposed(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.t()  # a view, not contiguous


class Weights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 3.5]]))

    def forward(self, x: torch.Tensor):
        return self.w  # a parameter: it requires grad even with grad off


# Two rows of two elements of each fixed-size datatype, as little-endian bytes; BF16 (which
# numpy lacks) as its 16-bit patterns: 1.0, -2.0, 0.5 and 3.0.
ROWS = {datatype: numpy.array([[1, 0], [7, 100]], dtype).tobytes() for datatype, dtype in [
    ("BOOL", numpy.bool_), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"),
    ("UINT64", "<u8"), ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
    ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8")]}
ROWS["BF16"] = numpy.array([[0x3F80, 0xC000], [0x3F00, 0x4040]], "<u2").tobytes()


def raw_request(name: str, datatype: str, raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="INPUT__0", datatype=datatype, shape=[2, 2])
    request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize("datatype", sorted(ROWS))
def test_every_datatype_reaches_the_module_and_leaves_it_byte_for_byte(tmp_path, datatype):
    write_model(tmp_path, "same", Same(), dims="[ 2 ]", in_type=f"TYPE_{datatype}",
                out_type=f"TYPE_{datatype}")
    response, _ = load(tmp_path, "same").run(raw_request("same", datatype, ROWS[datatype]), "1")
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == (datatype, [2, 2])
    assert response.raw_output_contents[0] == ROWS[datatype]


@pytest.mark.parametrize("datatype", ["FP32", "BF16"])
def test_an_output_that_is_a_view_is_sent_in_row_major_order(tmp_path, datatype):
    write_model(tmp_path, "t", Transposed(), dims="[ 2 ]", in_type=f"TYPE_{datatype}",
                out_type=f"TYPE_{datatype}")
    response, _ = load(tmp_path, "t").run(raw_request("t", datatype, ROWS[datatype]), "1")
    rows = numpy.frombuffer(ROWS[datatype], "<u4" if datatype == "FP32" else "<u2")
    assert response.raw_output_contents[0] == rows.reshape(2, 2).T.tobytes()


def test_an_output_that_requires_grad_is_sent_as_its_values(tmp_path):
    write_model(tmp_path, "w", Weights(), dims="[ 2 ]")
    x = numpy.zeros((2, 2), numpy.float32)
    response, _ = load(tmp_path, "w").run(request_of("w", x), "1")
    assert outputs_of(response)["OUTPUT__0"].tolist() == [[0.5, -1.0], [2.0, 3.5]]


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


def test_a_string_tensor_of_more_than_one_dimension_is_refused_at_load_naming_the_file(
        tmp_path):
    """TYPE_STRING is a List[str] to TorchScript: with the batch, dims [ -1 ] make two."""
    version_dir = write_model(tmp_path, "s", Half(), in_type="TYPE_STRING")
    with pytest.raises(FailedPrecondition) as info:
        load(tmp_path, "s")
    assert info.value.message == (
        f"{version_dir / 'model.pt'}: TYPE_STRING input 'INPUT__0' is a List[str] to a "
        "TorchScript model, of one dimension; its dims [-1] give it 2 with the batch "
        "dimension")


# ------------------------------------------------------------------ Triton's conventions


class AMinus2B(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a - 2 * b


class Three(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1, x * 10, x - 1


class FromDict(torch.nn.Module):
    def forward(self, d: dict[str, torch.Tensor]):
        return d["A"] - 2 * d["B"]


class Shout(torch.nn.Module):
    def forward(self, words: list[str]) -> list[str]:
        return [w.upper() + "!" for w in words]


class Lengths(torch.nn.Module):
    def forward(self, words: list[str]):
        return torch.tensor([len(w) for w in words])


class Mode(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return torch.tensor([x.clone().is_inference(), torch.is_grad_enabled()])


def write_configured(repo: Path, name: str, module: torch.nn.Module, config: str) -> Path:
    (repo / name / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(repo / name / "1" / "model.pt"))
    (repo / name / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n' + config)
    return repo / name / "1"


def tensors(*declared: tuple[str, str, str]) -> str:
    return ", ".join(f'{{ name: "{name}" data_type: {data_type} dims: {dims} }}'
                     for name, data_type, dims in declared)


def run(model, name: str, **arrays: numpy.ndarray) -> dict[str, numpy.ndarray]:
    request = pb.ModelInferRequest(model_name=name)
    for key, array in arrays.items():
        strings = array.dtype == object
        request.inputs.add(name=key, datatype="BYTES" if strings else "FP32", shape=array.shape)
        request.raw_input_contents.append(serialize_bytes(array.reshape(-1).tolist()) if strings
                                          else array.tobytes())
    response, _ = model.run(request, "1")
    return outputs_of(response)


A = numpy.array([[1, 2], [3, 4]], numpy.float32)
B = numpy.array([[10, 20], [30, 40]], numpy.float32)
FP32_2 = ("TYPE_FP32", "[ 2 ]")


@pytest.mark.parametrize("names", [("INPUT__1", "INPUT__0"), ("b", "a")])
def test_inputs_reach_the_arguments_their_names_say_in_whichever_config_order(tmp_path,
                                                                              names):
    """`<name>__<index>`, or forward's own argument names (Triton's conventions): config
    order is not argument order."""
    second, first = names
    write_configured(tmp_path, "m", AMinus2B(), "max_batch_size: 4\n"
                     f"input [ {tensors((second, *FP32_2), (first, *FP32_2))} ]\n"
                     f"output [ {tensors(('OUTPUT__0', *FP32_2))} ]\n")
    got = run(load(tmp_path, "m"), "m", **{first: A, second: B})
    assert got["OUTPUT__0"].tolist() == (A - 2 * B).tolist()


def test_inputs_named_otherwise_are_arguments_in_config_order(tmp_path):
    write_configured(tmp_path, "m", AMinus2B(), "max_batch_size: 4\n"
                     f"input [ {tensors(('second', *FP32_2), ('first', *FP32_2))} ]\n"
                     f"output [ {tensors(('result', *FP32_2))} ]\n")
    got = run(load(tmp_path, "m"), "m", first=A, second=B)
    assert got["result"].tolist() == (B - 2 * A).tolist()


@pytest.mark.parametrize(("declared", "results"), [
    (("OUTPUT__1", "OUTPUT__0", "OUTPUT__2"), (1, 0, 2)),
    (("OUTPUT__2",), (2,)),
    (("first", "second"), (0, 1)),  # config order; the third result is not sent
])
def test_outputs_are_the_results_their_names_say_and_the_rest_are_not_sent(tmp_path,
                                                                           declared, results):
    write_configured(tmp_path, "m", Three(), "max_batch_size: 4\n"
                     f"input [ {tensors(('INPUT__0', *FP32_2))} ]\n"
                     f"output [ {tensors(*((n, *FP32_2) for n in declared))} ]\n")
    got = run(load(tmp_path, "m"), "m", INPUT__0=A)
    expected = [A + 1, A * 10, A - 1]
    assert list(got) == list(declared)
    assert [got[name].tolist() for name in declared] == [expected[r].tolist() for r in results]


def test_an_output_naming_a_result_the_model_does_not_return_fails_saying_so(tmp_path):
    write_configured(tmp_path, "m", Three(), "max_batch_size: 4\n"
                     f"input [ {tensors(('INPUT__0', *FP32_2))} ]\n"
                     f"output [ {tensors(('OUTPUT__5', *FP32_2))} ]\n")
    with pytest.raises(Internal) as info:
        run(load(tmp_path, "m"), "m", INPUT__0=A)
    assert info.value.message == ("model 'm' version 1: output 'OUTPUT__5' is result 5; the "
                                  "model returned 3")


def test_a_dictionary_input_gets_the_inputs_by_name(tmp_path):
    write_configured(tmp_path, "m", FromDict(), "max_batch_size: 4\n"
                     f"input [ {tensors(('B', *FP32_2), ('A', *FP32_2))} ]\n"
                     f"output [ {tensors(('OUTPUT__0', *FP32_2))} ]\n")
    got = run(load(tmp_path, "m"), "m", A=A, B=B)
    assert got["OUTPUT__0"].tolist() == (A - 2 * B).tolist()


@pytest.mark.parametrize(("config", "message"), [
    (f"input [ {tensors(('INPUT__0', *FP32_2))} ]", "forward(a, b) takes 2 inputs; "
     "config.pbtxt declares 1 (INPUT__0)"),
    (f"input [ {tensors(('INPUT__0', *FP32_2), ('X__0', *FP32_2))} ]", "forward(a, b): "
     "argument 0 ('a') is given by 'INPUT__0' and 'X__0' of config.pbtxt (INPUT__0, X__0)"),
])
def test_inputs_that_are_not_forwards_arguments_are_refused_at_load(tmp_path, config, message):
    version_dir = write_configured(tmp_path, "m", AMinus2B(), "max_batch_size: 4\n" + config
                                   + f"\noutput [ {tensors(('OUTPUT__0', *FP32_2))} ]\n")
    with pytest.raises(FailedPrecondition) as info:
        load(tmp_path, "m")
    assert info.value.message == f"{version_dir / 'model.pt'}: {message}"


def test_string_tensors_are_lists_of_str_in_and_out(tmp_path):
    write_configured(tmp_path, "shout", Shout(), "max_batch_size: 0\n"
                     f"input [ {tensors(('INPUT__0', 'TYPE_STRING', '[ -1 ]'))} ]\n"
                     f"output [ {tensors(('OUTPUT__0', 'TYPE_STRING', '[ -1 ]'))} ]\n")
    write_configured(tmp_path, "lengths", Lengths(), "max_batch_size: 0\n"
                     f"input [ {tensors(('INPUT__0', 'TYPE_STRING', '[ -1 ]'))} ]\n"
                     f"output [ {tensors(('OUTPUT__0', 'TYPE_INT64', '[ -1 ]'))} ]\n")
    words = ["ab", "çé", ""]
    for name in ("shout", "lengths"):
        got = run(load(tmp_path, name), name, INPUT__0=numpy.array(words, dtype=object))
        expected = torch.jit.load(str(tmp_path / name / "1" / "model.pt"))(words)
        assert got["OUTPUT__0"].tolist() == (
            [w.encode() for w in expected] if name == "shout" else expected.tolist())


def test_a_batching_string_model_takes_one_string_a_row(tmp_path):
    write_configured(tmp_path, "shout", Shout(), "max_batch_size: 4\n"
                     'input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ 1 ] '
                     "reshape: { shape: [ ] } } ]\n"
                     'output [ { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ 1 ] '
                     "reshape: { shape: [ ] } } ]\n")
    model = load(tmp_path, "shout")
    for request in model.warmup_requests():
        model.run(request, "1")
    got = run(model, "shout", INPUT__0=numpy.array([["a"], ["bc"]], dtype=object))
    assert got["OUTPUT__0"].tolist() == [[b"A!"], [b"BC!"]]


def test_a_string_that_is_not_utf8_is_refused_naming_the_input(tmp_path):
    write_configured(tmp_path, "shout", Shout(), "max_batch_size: 0\n"
                     f"input [ {tensors(('INPUT__0', 'TYPE_STRING', '[ -1 ]'))} ]\n"
                     f"output [ {tensors(('OUTPUT__0', 'TYPE_STRING', '[ -1 ]'))} ]\n")
    with pytest.raises(InvalidArgument) as info:
        run(load(tmp_path, "shout"), "shout", INPUT__0=numpy.array([b"ok", b"\xff"], object))
    assert info.value.message == ("input 'INPUT__0': element 1 is not UTF-8, which a "
                                  "TorchScript List[str] needs")


def parameters(**values: str) -> str:
    return "".join(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
                   for key, value in values.items())


MODE = (f"max_batch_size: 0\ninput [ {tensors(('INPUT__0', *FP32_2))} ]\n"
        f"output [ {tensors(('OUTPUT__0', 'TYPE_BOOL', '[ 2 ]'))} ]\n")


@pytest.mark.parametrize(("given", "inference_tensor"), [
    ({}, True), ({"INFERENCE_MODE": "true"}, True), ({"INFERENCE_MODE": "false"}, False),
    ({"INFERENCE_MODE": "OFF"}, False)])
def test_inference_mode_is_the_configs_and_grad_is_off_either_way(tmp_path, given,
                                                                  inference_tensor):
    write_configured(tmp_path, "m", Mode(), MODE + parameters(**given))
    got = run(load(tmp_path, "m"), "m", INPUT__0=A[0])
    assert got["OUTPUT__0"].tolist() == [inference_tensor, False]


def test_disable_optimized_execution_runs_each_batch_unoptimized_on_its_own_thread(tmp_path):
    """The graph executor's optimization is a per-thread switch: each batch sets it."""
    write_configured(tmp_path, "m", Mode(), MODE + parameters(DISABLE_OPTIMIZED_EXECUTION="1"))
    model = load(tmp_path, "m")
    seen = []

    def module(x):
        seen.append(torch._C._get_graph_executor_optimize())
        return torch.tensor([False, False])

    model.module = module
    run(model, "m", INPUT__0=A[0])
    assert seen == [False] and torch._C._get_graph_executor_optimize()


@pytest.mark.parametrize(("key", "value", "takes"), [
    ("INFERENCE_MODE", "maybe", "true or false (on/off, 1/0)"),
    ("DISABLE_OPTIMIZED_EXECUTION", "yes", "true or false (on/off, 1/0)"),
    ("INTRA_OP_THREAD_COUNT", "two", "an integer"),
])
def test_a_parameter_value_the_backend_cannot_take_refuses_the_model(tmp_path, key, value,
                                                                     takes):
    version_dir = write_configured(tmp_path, "m", Mode(), MODE + parameters(**{key: value}))
    with pytest.raises(FailedPrecondition) as info:
        load(tmp_path, "m")
    assert info.value.message == (f"{version_dir / 'model.pt'}: parameter {key} is "
                                  f"{value!r}; it takes {takes}")


@pytest.fixture
def process_settings():
    """Restores what a model's parameters set for the whole process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_mode(True)


def test_thread_counts_and_jit_switches_are_set_for_the_process(tmp_path, process_settings):
    write_configured(tmp_path, "m", Mode(), MODE + parameters(
        INTRA_OP_THREAD_COUNT="3", ENABLE_JIT_EXECUTOR="false", ENABLE_JIT_PROFILING="false"))
    load(tmp_path, "m")  # as compute loads it, with --threads 1
    assert torch.get_num_threads() == 3
    assert torch._C._jit_set_profiling_executor(True) is False
    assert torch._C._jit_set_profiling_mode(True) is False
