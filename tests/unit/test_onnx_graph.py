"""An ONNX model's config completed from its graph, and checked against it."""

import re

import pytest

from meshserve.common import onnx_graph
from meshserve.common.errors import FailedPrecondition
from meshserve.common.repository import ModelRepository, parse_config
from meshserve.protocol import model_config_pb2 as mc
from tests.onnx_models import (
    every_type_model,
    fixed_shape_model,
    initializer_input_model,
    reshape_model,
    row_scalar_model,
    scalar_model,
)

EXPECTED = [("X", mc.TYPE_FP32, [4]), ("H", mc.TYPE_FP16, [2]), ("I", mc.TYPE_INT64, [3]),
            ("B", mc.TYPE_BOOL, [2]), ("S", mc.TYPE_STRING, [1]), ("U", mc.TYPE_UINT8, [5])]


def write(tmp_path, name: str, config: str, data: bytes, version: int = 1):
    model = tmp_path / name
    (model / str(version)).mkdir(parents=True)
    (model / "config.pbtxt").write_text(config)
    (model / str(version) / "model.onnx").write_bytes(data)
    return model


def tensors(items):
    return [(t.name, t.data_type, list(t.dims)) for t in items]


def test_inputs_and_outputs_left_out_are_read_from_the_graph(tmp_path):
    write(tmp_path, "types", 'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n',
          every_type_model())
    config = ModelRepository.load(tmp_path).get("types").config
    assert tensors(config.input) == EXPECTED
    assert [t.name for t in config.output] == ["Y", "H2", "I7", "NB", "S_OUT", "U_OUT"]
    assert tensors(config.output)[0] == ("Y", mc.TYPE_FP32, [3])
    assert config.max_batch_size == 8
    assert config.default_model_filename == "model.onnx"


def test_a_graph_that_batches_gets_tritons_default_max_batch_size(tmp_path):
    """As Triton completes it: max_batch_size 4 and the dynamic batcher on, with its
    defaults (requests share batches)."""
    write(tmp_path, "types", 'backend: "onnxruntime"', every_type_model())
    config = ModelRepository.load(tmp_path).get("types").config
    assert config.max_batch_size == onnx_graph.DEFAULT_MAX_BATCH_SIZE == 4
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching == mc.ModelDynamicBatching()
    assert config.platform == "onnxruntime_onnx"
    assert tensors(config.input) == EXPECTED


def test_a_graph_without_a_batch_dimension_keeps_its_whole_shape(tmp_path):
    write(tmp_path, "neg", 'platform: "onnxruntime_onnx"', fixed_shape_model())
    config = ModelRepository.load(tmp_path).get("neg").config
    assert config.max_batch_size == 0
    assert tensors(config.input) == [("X", mc.TYPE_FP32, [2, 3])]


def test_the_latest_served_version_completes_the_config(tmp_path):
    model = write(tmp_path, "neg", 'platform: "onnxruntime_onnx"', b"old and broken", 1)
    (model / "2").mkdir()
    (model / "2" / "model.onnx").write_bytes(fixed_shape_model())
    assert ModelRepository.load(tmp_path).get("neg").versions == ("2",)


@pytest.mark.parametrize(("data", "match"), [
    (b"\x08\x07garbage that is not protobuf \xff\xff", "not an ONNX model"),
    (b"", "not an ONNX model"),
    (every_type_model()[:100], "not an ONNX model"),
])
def test_a_malformed_file_is_refused_naming_model_version_and_file(tmp_path, data, match):
    write(tmp_path, "broken", 'platform: "onnxruntime_onnx"', data)
    write(tmp_path, "fine", 'platform: "onnxruntime_onnx"', fixed_shape_model())
    repo = ModelRepository.load(tmp_path)
    assert set(repo.models) == {"fine"}
    reason = repo.refused["broken"]
    assert reason.startswith(
        f"model 'broken' version 1: {tmp_path / 'broken' / '1' / 'model.onnx'}: ")
    assert match in reason


def test_a_missing_file_is_refused(tmp_path):
    model = tmp_path / "gone"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('platform: "onnxruntime_onnx"')
    reason = ModelRepository.load(tmp_path).refused["gone"]
    assert "model.onnx is missing; its inputs and outputs are read from it" in reason


def graph():
    return onnx_graph.read_graph(every_type_model(), "types/1/model.onnx")


def declared(text: str):
    return parse_config('platform: "onnxruntime_onnx"\n' + text, "types/config.pbtxt", "types")


def test_a_config_that_matches_the_graph_passes():
    config = declared("max_batch_size: 2\n" + "".join(
        f'input {{ name: "{n}" data_type: {mc.DataType.Name(t)} dims: {d} }}\n'
        for n, t, d in EXPECTED) + 'output { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }')
    onnx_graph.check_config(config, graph(), "here")


@pytest.mark.parametrize(("change", "match"), [
    (("X", "TYPE_FP32", "TYPE_FP64"), "input 'X' is FP64 in config.pbtxt but FP32 in the graph"),
    (("dims: [4]", "dims: [4]", "dims: [5]"), r"input 'X' has dims \[5\] in config.pbtxt but "
                                              r"\[4\] in the graph"),
    (('name: "U"', 'name: "U"', 'name: "V"'), "declares input 'V', which the graph lacks"),
])
def test_a_config_that_disagrees_with_the_graph_is_refused(change, match):
    name, old, new = change
    lines = [f'input {{ name: "{n}" data_type: {mc.DataType.Name(t)} dims: {d} }}'
             for n, t, d in EXPECTED]
    lines = [line.replace(old, new) if f'"{name}"' in line or name in line else line
             for line in lines]
    assert any(new in line for line in lines)
    config = declared("max_batch_size: 2\n" + "\n".join(lines))
    with pytest.raises(FailedPrecondition, match=match):
        onnx_graph.check_config(config, graph(), "here")


def test_every_graph_input_must_be_declared_and_the_batch_dimension_dynamic():
    config = declared('input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }\n'
                      'max_batch_size: 2')
    with pytest.raises(FailedPrecondition, match="the graph's input 'H' is not declared"):
        onnx_graph.check_config(config, graph(), "here")
    fixed = onnx_graph.read_graph(fixed_shape_model(), "neg")
    config = declared('max_batch_size: 2\ninput { name: "X" data_type: TYPE_FP32 dims: [3] }')
    with pytest.raises(FailedPrecondition, match="its first dimension must be dynamic"):
        onnx_graph.check_config(config, fixed, "here")


def test_read_graph_refuses_what_is_not_onnx():
    with pytest.raises(FailedPrecondition, match=r"^x\.onnx: not an ONNX model"):
        onnx_graph.read_graph(b"\x00\x01\x02", "x.onnx")


def reshapes(tensors) -> list:
    return [list(t.reshape.shape) if t.HasField("reshape") else None for t in tensors]


@pytest.mark.parametrize(("text", "model"), [
    ('max_batch_size: 4\n'
     'input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } }\n'
     'output { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } }',
     reshape_model),
    ('max_batch_size: 4\n'  # the README's one scalar a row
     'input { name: "X" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }\n'
     'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }',
     row_scalar_model),
])
def test_a_reshaped_tensor_is_checked_as_the_model_sees_it(text, model):
    """Triton checks `reshape.shape` against the graph: clients send `dims`."""
    onnx_graph.check_config(declared(text), onnx_graph.read_graph(model(), "m"), "here")


def test_a_tensor_the_graph_has_in_another_shape_needs_a_reshape():
    graph = onnx_graph.read_graph(row_scalar_model(), "m")
    config = declared('max_batch_size: 4\n'
                      'input { name: "X" data_type: TYPE_FP32 dims: [ 1 ] }\n'
                      'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }')
    with pytest.raises(FailedPrecondition, match=re.escape(
            "input 'X' has dims [1] in config.pbtxt but [] in the graph (without the batch "
            "dimension); one scalar a row is dims: [ 1 ] reshape: { shape: [ ] }")):
        onnx_graph.check_config(config, graph, "here")
    config = declared(
        'max_batch_size: 4\n'
        'input { name: "X" data_type: TYPE_FP32 dims: [ 2 ] reshape: { shape: [ 2 ] } }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }')
    with pytest.raises(FailedPrecondition, match=re.escape(
            "input 'X' has reshape shape [2] in config.pbtxt but [] in the graph")):
        onnx_graph.check_config(config, graph, "here")


def test_graph_scalars_are_completed_as_triton_completes_them(tmp_path):
    """dims [ 1 ], and for a model that batches reshape { shape: [ ] }: a Triton client
    sends [ 1 ] (or [ batch, 1 ])."""
    write(tmp_path, "twice", 'platform: "onnxruntime_onnx"', scalar_model())
    write(tmp_path, "square", 'platform: "onnxruntime_onnx"', row_scalar_model())
    repo = ModelRepository.load(tmp_path)
    twice, square = repo.get("twice").config, repo.get("square").config
    assert twice.max_batch_size == 0
    assert tensors(twice.input) == [("X", mc.TYPE_FP32, [1])]
    assert tensors(twice.output) == [("Y", mc.TYPE_FP32, [1])]
    assert reshapes(twice.input) == reshapes(twice.output) == [None]
    assert square.max_batch_size == 4 and square.HasField("dynamic_batching")
    assert tensors(square.input) == [("X", mc.TYPE_FP32, [1])]
    assert reshapes(square.input) == reshapes(square.output) == [[]]


def test_a_graph_scalar_is_declared_as_ones_without_batching():
    graph = onnx_graph.read_graph(scalar_model(), "m")
    for dims in ("[ 1 ]", "[ ]", "[ 1, 1 ]"):
        onnx_graph.check_config(declared(
            f'input {{ name: "X" data_type: TYPE_FP32 dims: {dims} }}\n'
            f'output {{ name: "Y" data_type: TYPE_FP32 dims: {dims} }}'), graph, "here")
    with pytest.raises(FailedPrecondition, match=re.escape(
            "input 'X' has dims [2] in config.pbtxt but [] in the graph")):
        onnx_graph.check_config(declared(
            'input { name: "X" data_type: TYPE_FP32 dims: [ 2 ] }\n'
            'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }'), graph, "here")


TRITON_INITIALIZER_CONFIG = """max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [5, 5] },
        { name: "INITIALIZER" data_type: TYPE_FP32 dims: [5, 5] optional: true } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 5, 5] } ]
"""


def test_an_initializer_the_graph_takes_as_input_is_an_optional_input(tmp_path):
    """Triton's own test config (onnxruntime_backend initializer_as_input) passes; declared
    without `optional` it is refused, as Triton refuses it; completion leaves it out."""
    graph = onnx_graph.read_graph(initializer_input_model(), "m")
    assert [t.name for t in graph.inputs] == ["INPUT"]
    assert [t.name for t in graph.initializers] == ["INITIALIZER"]
    onnx_graph.check_config(declared(TRITON_INITIALIZER_CONFIG), graph, "here")
    with pytest.raises(FailedPrecondition, match=re.escape(
            "input 'INITIALIZER' is an initializer of the graph (it holds a value a request "
            "may replace): declare it with optional: true")):
        onnx_graph.check_config(declared(TRITON_INITIALIZER_CONFIG.replace(
            " optional: true", "")), graph, "here")
    write(tmp_path, "init", 'platform: "onnxruntime_onnx"', initializer_input_model())
    config = ModelRepository.load(tmp_path).get("init").config
    assert tensors(config.input) == [("INPUT", mc.TYPE_FP32, [5, 5])]


@pytest.mark.parametrize(("text", "max_batch_size", "dynamic_batching"), [
    # inputs declared, outputs left out, no max_batch_size: Triton's default and batcher
    ('input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }\n'
     'input { name: "H" data_type: TYPE_FP16 dims: [ 2 ] }\n'
     'input { name: "I" data_type: TYPE_INT64 dims: [ 3 ] }\n'
     'input { name: "B" data_type: TYPE_BOOL dims: [ 2 ] }\n'
     'input { name: "S" data_type: TYPE_STRING dims: [ 1 ] }\n'
     'input { name: "U" data_type: TYPE_UINT8 dims: [ 5 ] }', 4, mc.ModelDynamicBatching()),
    ("max_batch_size: 8", 8, mc.ModelDynamicBatching()),  # above 1: the batcher is on
    ("max_batch_size: 1", 1, None),
    ("max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] }", 8,
     mc.ModelDynamicBatching(preferred_batch_size=[4])),
])
def test_completing_a_batching_graph_s_config_sets_batching_as_triton_does(
        tmp_path, text, max_batch_size, dynamic_batching):
    write(tmp_path, "types", 'platform: "onnxruntime_onnx"\n' + text, every_type_model())
    config = ModelRepository.load(tmp_path).get("types").config
    assert config.max_batch_size == max_batch_size
    assert (config.dynamic_batching if config.HasField("dynamic_batching")
            else None) == dynamic_batching
    assert [t.name for t in config.output] == ["Y", "H2", "I7", "NB", "S_OUT", "U_OUT"]


def test_a_config_that_declares_every_tensor_is_not_completed(tmp_path):
    """Triton completes nothing when inputs and outputs are both given: the dynamic batcher
    stays off unless asked for."""
    write(tmp_path, "transpose", 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
          'input { name: "X" data_type: TYPE_FP32 dims: [ 2, 2 ] }\n'
          'output { name: "Y" data_type: TYPE_FP32 dims: [ 2, 2 ] }\n', reshape_model())
    config = ModelRepository.load(tmp_path).get("transpose").config
    assert not config.HasField("dynamic_batching")
