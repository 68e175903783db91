"""The ONNX Runtime backend answers what onnxruntime's own InferenceSession answers."""

import ml_dtypes
import numpy
import onnxruntime
import pytest

from meshserve.common.arrays import deserialize_bytes
from meshserve.common.datatypes import serialize_bytes
from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.compute.backends.onnx import providers_for, session_settings
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.onnx_models import (
    bf16_and_string_model,
    bf16_model,
    every_type_model,
    initializer_input_model,
    reshape_model,
    row_scalar_model,
    scalar_model,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The every-type model in a repository (config completed from the graph), loaded by
    the backend as compute loads it (from the file, unsigned)."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "types" / "1").mkdir(parents=True)
    (repo / "types" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    (repo / "types" / "1" / "model.onnx").write_bytes(every_type_model())
    entry = ModelRepository.load(repo).get("types")
    model = load_model(entry.config, entry.path / "1" / "model.onnx", entry.path / "1", "auto", 1)
    for request in model.warmup_requests():
        model.run(request, "1")
    return model


def feeds(batch: int, seed: int) -> dict[str, numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    return {
        "X": rng.standard_normal((batch, 4)).astype(numpy.float32),
        "H": rng.standard_normal((batch, 2)).astype(numpy.float16),
        "I": rng.integers(-2**40, 2**40, (batch, 3), dtype=numpy.int64),
        "B": rng.integers(0, 2, (batch, 2)).astype(bool),
        "S": numpy.array([[f"row {i} é"] for i in range(batch)], dtype=object),
        "U": rng.integers(0, 256, (batch, 5), dtype=numpy.uint8),
    }


def request_of(arrays: dict[str, numpy.ndarray], outputs=()) -> pb.ModelInferRequest:
    datatypes = {"X": "FP32", "H": "FP16", "I": "INT64", "B": "BOOL", "S": "BYTES", "U": "UINT8"}
    request = pb.ModelInferRequest(model_name="types")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        raw = (serialize_bytes(array.reshape(-1).tolist()) if name == "S" else array.tobytes())
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_equal_onnxruntime_run_directly(served, batch):
    arrays = feeds(batch, seed=batch)
    response, timings = served.run(request_of(arrays), "1")
    session = onnxruntime.InferenceSession(every_type_model(),
                                           providers=["CPUExecutionProvider"])
    names = ["Y", "H2", "I7", "NB", "S_OUT", "U_OUT"]
    expected = dict(zip(names, session.run(names, arrays)))
    got = outputs_of(response)
    assert [t.name for t in response.outputs] == names
    assert [t.datatype for t in response.outputs] == ["FP32", "FP16", "INT64", "BOOL", "BYTES",
                                                      "UINT8"]
    for name in ("Y", "H2", "I7", "NB", "U_OUT"):
        assert got[name].dtype == expected[name].dtype
        assert got[name].tobytes() == expected[name].tobytes(), name
    assert got["S_OUT"].tolist() == [[s.encode()] for s in expected["S_OUT"].reshape(-1)]
    assert response.model_version == "1"
    assert timings.infer_ns > 0


def test_only_the_requested_outputs_are_computed_and_sent(served):
    response, _ = served.run(request_of(feeds(2, 0), outputs=["NB", "Y"]), "1")
    assert [t.name for t in response.outputs] == ["Y", "NB"]


def test_a_bytes_element_that_is_not_utf8_is_refused(served):
    arrays = feeds(1, 0)
    request = request_of(arrays)
    request.raw_input_contents[4] = serialize_bytes([b"\xff\xfe"])
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        served.run(request, "1")


def test_a_malformed_file_is_refused_naming_it(tmp_path):
    entry_dir = tmp_path / "m" / "1"
    entry_dir.mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\ninput { name: "X" data_type: TYPE_FP32 dims: [2] }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: [2] }\n')
    (entry_dir / "model.onnx").write_bytes(b"certainly not a protobuf \xff")
    entry = ModelRepository.load(tmp_path).get("m")  # declared: not read at repository load
    with pytest.raises(FailedPrecondition) as info:
        load_model(entry.config, entry_dir / "model.onnx", entry_dir, "cpu", 1)
    assert info.value.message.startswith(f"{entry_dir / 'model.onnx'}: not an ONNX model")


def test_providers_follow_the_device():
    assert providers_for("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert providers_for("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    with pytest.raises(FailedPrecondition, match="install onnxruntime-gpu"):
        providers_for("cuda:0", ["CPUExecutionProvider"])


def test_bytes_round_trip():
    raw = serialize_bytes([b"a", "é", b""])
    assert deserialize_bytes(raw, [1, 3]).tolist() == [[b"a", "é".encode(), b""]]
    with pytest.raises(InvalidArgument, match="needs 2 elements; it holds 3"):
        deserialize_bytes(raw, [2])


def test_bf16_travels_both_ways(tmp_path):
    (tmp_path / "bf" / "1").mkdir(parents=True)
    (tmp_path / "bf" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (tmp_path / "bf" / "1" / "model.onnx").write_bytes(bf16_model())
    entry = ModelRepository.load(tmp_path).get("bf")
    model = load_model(entry.config, entry.path / "1" / "model.onnx", entry.path / "1", "cpu", 1)
    x = numpy.array([[1.5, -2.25], [3.0, 0.125]], dtype=ml_dtypes.bfloat16)
    request = pb.ModelInferRequest(model_name="bf")
    request.inputs.add(name="X", datatype="BF16", shape=[2, 2])
    request.raw_input_contents.append(x.tobytes())
    response, _ = model.run(request, "1")
    assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == ("BF16", [2, 2])
    assert response.raw_output_contents[0] == x.tobytes()
    assert outputs_of(response)["Y"].tolist() == x.tolist()  # what `meshserve infer` prints


def test_bf16_and_string_tensors_travel_together(tmp_path):
    (tmp_path / "mixed" / "1").mkdir(parents=True)
    (tmp_path / "mixed" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    (tmp_path / "mixed" / "1" / "model.onnx").write_bytes(bf16_and_string_model())
    entry = ModelRepository.load(tmp_path).get("mixed")
    model = load_model(entry.config, entry.path / "1" / "model.onnx", entry.path / "1", "cpu", 1)
    for request in model.warmup_requests():
        model.run(request, "1")
    c = numpy.array([[1.5, -2.25], [3.0, 1e-20]], dtype=ml_dtypes.bfloat16)
    request = pb.ModelInferRequest(model_name="mixed")
    request.inputs.add(name="C", datatype="BF16", shape=[2, 2])
    request.inputs.add(name="D", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.extend([c.tobytes(), serialize_bytes(["é", b"b"])])
    response, _ = model.run(request, "1")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("C1", "BF16", [2, 2]), ("D1", "BYTES", [2, 1])]
    assert response.raw_output_contents[0] == c.tobytes()
    assert outputs_of(response)["D1"].tolist() == [["é".encode()], [b"b"]]


def loaded(tmp_path, name: str, config: str, data: bytes):
    """A model of a one-model repository, loaded as compute loads it, and warmed up."""
    (tmp_path / name / "1").mkdir(parents=True)
    (tmp_path / name / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n' + config)
    (tmp_path / name / "1" / "model.onnx").write_bytes(data)
    entry = ModelRepository.load(tmp_path).get(name)
    model = load_model(entry.config, entry.path / "1" / "model.onnx", entry.path / "1", "cpu", 1)
    for request in model.warmup_requests():
        model.run(request, "1")
    return model


def fp32_request(name: str, **arrays: numpy.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    for key, array in arrays.items():
        request.inputs.add(name=key, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.astype(numpy.float32).tobytes())
    return request


def direct(data: bytes, **feeds: numpy.ndarray) -> list[numpy.ndarray]:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


RESHAPED = """max_batch_size: 4
input { name: "X" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } }
output { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } }
"""


def test_a_reshaped_model_answers_what_onnxruntime_answers_in_the_client_s_dims(tmp_path):
    model = loaded(tmp_path, "transpose", RESHAPED, reshape_model())
    x = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    response, _ = model.run(fp32_request("transpose", X=x), "1")
    [expected] = direct(reshape_model(), X=x.reshape(3, 2, 2))
    assert list(response.outputs[0].shape) == [3, 4]
    assert outputs_of(response)["Y"].tolist() == expected.reshape(3, 4).tolist()
    assert model.waits is False  # quick batches may run on compute's event loop


@pytest.mark.parametrize(("config", "rows"), [
    ("", 3),  # completed as Triton completes it: dims [ 1 ] reshape { shape: [ ] }
    ('max_batch_size: 4\n'
     'input { name: "X" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }\n'
     'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }', 2),
])
def test_one_scalar_a_row_travels_as_dims_1(tmp_path, config, rows):
    model = loaded(tmp_path, "square", config, row_scalar_model())
    x = numpy.array([[1.5], [-2.0], [3.0]], numpy.float32)[:rows]
    response, _ = model.run(fp32_request("square", X=x), "1")
    [expected] = direct(row_scalar_model(), X=x.reshape(-1))
    assert list(response.outputs[0].shape) == [rows, 1]
    assert outputs_of(response)["Y"].reshape(-1).tolist() == expected.tolist()


@pytest.mark.parametrize("config", [
    "",  # completed: dims [ 1 ]
    'input { name: "X" data_type: TYPE_FP32 dims: [ 1 ] }\n'
    'output { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }',
])
def test_a_graph_scalar_is_sent_and_answered_as_dims_1(tmp_path, config):
    """As Triton's onnxruntime backend: the graph gets a scalar, the client [ 1 ]."""
    model = loaded(tmp_path, "twice", config, scalar_model())
    assert [list(t.dims) for t in (*model.config.input, *model.config.output)] == [[1], [1]]
    response, _ = model.run(fp32_request("twice", X=numpy.array([2.5], numpy.float32)), "1")
    [expected] = direct(scalar_model(), X=numpy.array(2.5, numpy.float32))
    assert expected.shape == ()
    assert list(response.outputs[0].shape) == [1]
    assert outputs_of(response)["Y"].tolist() == [float(expected)]


def test_an_initializer_input_may_be_sent_or_left_to_the_graph(tmp_path):
    """Triton's own test (onnxruntime_backend initializer_as_input): left out, the graph's
    ones are added; sent, the request's value is."""
    from tests.unit.test_onnx_graph import TRITON_INITIALIZER_CONFIG

    model = loaded(tmp_path, "add_with_initializer", TRITON_INITIALIZER_CONFIG,
                   initializer_input_model())
    x = numpy.arange(25, dtype=numpy.float32).reshape(5, 5)
    response, _ = model.run(fp32_request("add_with_initializer", INPUT=x), "1")
    assert outputs_of(response)["OUTPUT"].tolist() == (x + 1).tolist()
    twos = numpy.full((5, 5), 2, numpy.float32)
    response, _ = model.run(fp32_request("add_with_initializer", INPUT=x, INITIALIZER=twos), "1")
    [expected] = direct(initializer_input_model(), INPUT=x, INITIALIZER=twos)
    assert outputs_of(response)["OUTPUT"].tolist() == expected.tolist() == (x + 2).tolist()


TRITON_PARAMETERS = """max_batch_size: 8
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters { key: "inter_op_thread_count" value: { string_value: "3" } }
parameters { key: "execution_mode" value: { string_value: "1" } }
parameters { key: "enable_mem_arena" value: { string_value: "0" } }
parameters { key: "enable_mem_pattern" value: { string_value: "false" } }
"""


def test_the_onnxruntime_backend_s_parameters_set_the_session(tmp_path):
    model = loaded(tmp_path, "transpose", TRITON_PARAMETERS, reshape_model())
    options = model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_PARALLEL
    assert (options.enable_cpu_mem_arena, options.enable_mem_pattern) == (False, False)


def test_without_parameters_compute_s_threads_hold():
    assert session_settings({}, 1) == {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
    assert session_settings({"intra_op_thread_count": "0", "other": "x"}, 4) == {
        "intra_op_num_threads": 4, "inter_op_num_threads": 1}  # 0: not set, as in Triton


@pytest.mark.parametrize(("key", "value", "message"), [
    ("execution_mode", "2", "parameter execution_mode is 2; it takes 0 (sequential) or 1 "
                            "(parallel)"),
    ("intra_op_thread_count", "two", "parameter intra_op_thread_count is 'two'; it takes an "
                                     "integer"),
    ("enable_mem_arena", "maybe", "parameter enable_mem_arena is 'maybe'; it takes 1 or 0 "
                                  "(true/false, on/off)"),
])
def test_a_parameter_value_the_backend_cannot_read_refuses_the_model(tmp_path, key, value,
                                                                     message):
    config = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    with pytest.raises(FailedPrecondition) as info:
        loaded(tmp_path, "square", config, row_scalar_model())
    assert info.value.message == f"{tmp_path / 'square' / '1' / 'model.onnx'}: {message}"
