"""Triton-style Python models, unmodified, behind meshserve's model contract."""

import json
import sys

import numpy
import pytest
import torch
from prometheus_client import generate_latest

from meshserve.batcher.batch import merge, split_answered
from meshserve.common.batch_requests import RequestFailed, parameter_values
from meshserve.common.datatypes import serialize_bytes
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument
from meshserve.common.forwarding import CODE_NAME
from meshserve.common.metrics import Metrics
from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.backends.python import config_json, import_model
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.python_models import (
    ADD_SUB_CONFIG,
    ADD_SUB_PY,
    ECHO_CONFIG,
    ECHO_PY,
    RAISES_IN_INITIALIZE_PY,
    echo_request,
    write_python_model,
)


def load(tmp_path, name="add_sub", source=ADD_SUB_PY, extra_config=""):
    write_python_model(tmp_path, name, source, ADD_SUB_CONFIG, extra_config)
    entry = ModelRepository.load(tmp_path).get(name)
    version_dir = entry.path / "1"
    return entry, load_model(entry.config, version_dir / "model.py", version_dir, "auto", 1)


def request_of(a, b, names) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub", id="r1")
    request.inputs.add(name="A", datatype="FP32", shape=a.shape)
    request.inputs.add(name="B", datatype="FP32", shape=b.shape)
    request.inputs.add(name="NAME", datatype="BYTES", shape=[len(names), 1])
    request.raw_input_contents.extend([a.tobytes(), b.tobytes(), serialize_bytes(names)])
    return request


def test_outputs_equal_the_model_called_in_process(tmp_path):
    entry, model = load(tmp_path)
    rng = numpy.random.default_rng(3)
    a = rng.random((3, 4)).astype(numpy.float32)
    b = rng.standard_normal((3, 4)).astype(numpy.float32)
    names = [b"ada", "bob", b"\xc3\xa9"]
    response, timings = model.run(request_of(a, b, names), "1")

    # The same model.py, imported and called directly with the documented API.
    module = import_model(ADD_SUB_PY, entry.path / "1" / "model.py")
    direct = module.TritonPythonModel()
    direct.initialize({"model_config": config_json(entry.config), "model_version": "1"})
    [expected] = direct.execute([pb_utils.InferenceRequest(inputs=[
        pb_utils.Tensor("A", a), pb_utils.Tensor("B", b),
        pb_utils.Tensor("NAME", numpy.array([[n if isinstance(n, bytes) else n.encode()]
                                             for n in names], dtype=object))])])
    got = outputs_of(response)
    want = {t.name(): t.as_numpy() for t in expected.output_tensors()}
    assert got["SUM"].tobytes() == want["SUM"].tobytes()
    assert got["GREETING"].tolist() == want["GREETING"].tolist() == [
        [b"hello ada"], [b"hello bob"], ["hello é".encode()]]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("SUM", "FP32", [3, 4]), ("GREETING", "BYTES", [3, 1])]
    assert response.id == "r1" and response.model_version == "1"
    assert timings.infer_ns > 0


def test_triton_error_fails_the_request_with_its_code(tmp_path):
    _, model = load(tmp_path)
    a = -numpy.ones((1, 4), numpy.float32)
    with pytest.raises(RequestFailed) as raised:  # the request's own answer
        model.run(request_of(a, a, [b"x"]), "1")
    assert isinstance(raised.value.error, InvalidArgument)
    assert raised.value.message == "model 'add_sub' version 1: A must not be negative"


def test_an_exception_in_execute_fails_that_batch_only(tmp_path):
    _, model = load(tmp_path)
    big = numpy.full((2, 4), 5000, numpy.float32)
    with pytest.raises(Internal, match=r"^model 'add_sub' version 1: execute raised "
                                       r"ValueError: A is too large$"):
        model.run(request_of(big, big, [b"x", b"y"]), "1")
    ok = numpy.ones((1, 4), numpy.float32)
    response, _ = model.run(request_of(ok, ok, [b"z"]), "1")
    assert outputs_of(response)["SUM"].tolist() == [[2.0] * 4]


def test_initialize_raising_refuses_the_version_naming_file_and_reason(tmp_path):
    with pytest.raises(FailedPrecondition) as info:
        load(tmp_path, "broken", RAISES_IN_INITIALIZE_PY)
    path = tmp_path / "broken" / "1" / "model.py"
    assert info.value.message == (f"{path}: initialize raised TritonModelException: the "
                                  "weights file weights.bin is missing")


@pytest.mark.parametrize(("source", "match"), [
    ("def oops(:\n", "cannot import it: SyntaxError"),
    ("import a_module_that_does_not_exist\n", "cannot import it: ModuleNotFoundError"),
    ("class Model:\n    pass\n", "defines no class TritonPythonModel"),
])
def test_a_model_py_that_cannot_load_is_refused(tmp_path, source, match):
    with pytest.raises(FailedPrecondition, match=match):
        load(tmp_path, "bad", source)


def test_finalize_runs_once_when_the_model_closes(tmp_path):
    marker = tmp_path / "finalized.txt"
    _, model = load(tmp_path, extra_config=(
        f'parameters {{ key: "finalize_marker" value {{ string_value: "{marker}" }} }}\n'))
    model.close()
    model.close()
    assert marker.read_text() == "finalized\n"


def test_initialize_gets_the_config_as_triton_writes_it(tmp_path):
    entry, _ = load(tmp_path)
    config = json.loads(config_json(entry.config))
    assert config["name"] == "add_sub" and config["backend"] == "python"
    assert config["max_batch_size"] == 16
    assert config["input"][0] == {**config["input"][0], "name": "A", "data_type": "TYPE_FP32",
                                  "dims": [4]}
    assert pb_utils.get_input_config_by_name(config, "NAME")["data_type"] == "TYPE_STRING"
    assert pb_utils.get_output_config_by_name(config, "MISSING") is None
    assert sys.modules["triton_python_backend_utils"] is pb_utils


def test_utilities_follow_the_documented_api():
    assert pb_utils.triton_string_to_numpy("TYPE_FP16") is numpy.float16
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is numpy.object_
    error = pb_utils.TritonError("gone", pb_utils.TritonError.NOT_FOUND)
    assert (error.message(), error.code()) == ("gone", pb_utils.TritonError.NOT_FOUND)
    assert pb_utils.TritonError("x").code() == pb_utils.TritonError.INTERNAL
    tensor = pb_utils.Tensor("T", numpy.arange(6, dtype=numpy.int32).reshape(2, 3))
    back = pb_utils.Tensor.from_dlpack("U", tensor.to_dlpack())
    assert back.name() == "U" and back.as_numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert tensor.is_cpu()
    request = pb_utils.InferenceRequest(inputs=[tensor], requested_output_names=["O"],
                                        request_id="7", parameters={"k": 1})
    assert pb_utils.get_input_tensor_by_name(request, "T") is tensor
    assert pb_utils.get_input_tensor_by_name(request, "nope") is None
    assert json.loads(request.parameters()) == {"k": 1}
    assert request.requested_output_names() == ["O"] and request.request_id() == "7"
    response = pb_utils.InferenceResponse(output_tensors=[tensor])
    assert not response.has_error() and pb_utils.get_output_tensor_by_name(response, "T")
    pb_utils.set_model_calls(None)
    with pytest.raises(pb_utils.TritonModelException, match="--bls-target"):
        request.exec()
    with pytest.raises(pb_utils.TritonModelException, match="decoupled"):
        request.get_response_sender()


TRICKY_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            if (x.as_numpy() == -1).any():
                raise SystemExit("a helper called sys.exit")
            if (x.as_numpy() == -2).any():
                raise KeyboardInterrupt
            doubled = from_dlpack(x.to_dlpack()) * 2  # Triton's add_sub example
            scaled = x.as_numpy()
            scaled /= 2.0  # in place, as a model normalising its input does
            texts = np.array([[int(v), 1.5, "é", b"raw"] for v in scaled[:, 0]], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack("DOUBLED", to_dlpack(doubled)),
                pb_utils.Tensor("SCALED", scaled), pb_utils.Tensor("TEXTS", texts)]))
        return responses
'''

TRICKY_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "DOUBLED" data_type: TYPE_FP32 dims: [ 1 ] },
         { name: "SCALED" data_type: TYPE_FP32 dims: [ 1 ] },
         { name: "TEXTS" data_type: TYPE_STRING dims: [ 4 ] } ]
'''


def tricky(tmp_path):
    write_python_model(tmp_path, "tricky", TRICKY_PY, TRICKY_CONFIG)
    entry = ModelRepository.load(tmp_path).get("tricky")
    version_dir = entry.path / "1"
    return load_model(entry.config, version_dir / "model.py", version_dir, "auto", 1)


def x_request(*values: float) -> pb.ModelInferRequest:
    x = numpy.array([[v] for v in values], numpy.float32)
    request = pb.ModelInferRequest(model_name="tricky")
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_inputs_are_writable_and_export_through_dlpack_as_in_triton(tmp_path):
    request = x_request(14.0, 6.0)
    raw = request.raw_input_contents[0]
    response, _ = tricky(tmp_path).run(request, "1")
    got = outputs_of(response)
    assert got["DOUBLED"].tolist() == [[28.0], [12.0]]
    assert got["SCALED"].tolist() == [[7.0], [3.0]]
    assert request.raw_input_contents[0] == raw  # the request's bytes are left as they were


def test_bytes_outputs_of_other_objects_are_their_str_as_in_triton(tmp_path):
    response, _ = tricky(tmp_path).run(x_request(14.0, 6.0), "1")
    assert outputs_of(response)["TEXTS"].tolist() == [
        [b"7", b"1.5", "é".encode(), b"raw"], [b"3", b"1.5", "é".encode(), b"raw"]]


@pytest.mark.parametrize(("value", "raised"), [(-1.0, "SystemExit: a helper called sys.exit"),
                                               (-2.0, "KeyboardInterrupt: ")])
def test_system_exit_in_execute_fails_that_batch_not_the_process(tmp_path, value, raised):
    model = tricky(tmp_path)
    with pytest.raises(Internal) as info:
        model.run(x_request(value), "1")
    assert info.value.message == f"model 'tricky' version 1: execute raised {raised}"
    response, _ = model.run(x_request(2.0), "1")
    assert outputs_of(response)["SCALED"].tolist() == [[1.0]]


# ------------------------------------------------- a batch of several requests, as Triton


def echo_model(tmp_path, source=ECHO_PY):
    write_python_model(tmp_path, "echo", source, ECHO_CONFIG)
    entry = ModelRepository.load(tmp_path).get("echo")
    version_dir = entry.path / "1"
    return load_model(entry.config, version_dir / "model.py", version_dir, "auto", 1)


def through_batch(model, requests: list[pb.ModelInferRequest]):
    """The requests as the batcher joins them for a Python model, run, and split back."""
    rows = [r.inputs[0].shape[0] for r in requests]
    wanted = [[o.name for o in r.outputs] or None for r in requests]
    batch = pb.ModelInferRequest.FromString(b"".join(merge(requests, rows, wanted, "1",
                                                           per_request=True)))
    response, _ = model.run(batch, "1")
    return split_answered(response, requests, rows, wanted)


def echoes(result) -> list[dict]:
    return [json.loads(row[0]) for row in outputs_of(result.response)["ECHO"].tolist()]


def test_execute_gets_one_request_per_request_of_the_batch(tmp_path):
    model = echo_model(tmp_path)
    requests = [echo_request("a", [[1, 2]], tag="first", timeout=1500),
                echo_request("b", [[3, 4], [5, 6]], outputs=["ECHO"], scale=0.5),
                echo_request("c", [[7, 8]], flag=True)]
    results = through_batch(model, requests)
    assert [r.code for r in results] == [0, 0, 0]
    assert [r.response.id for r in results] == ["a", "b", "c"]
    assert echoes(results[0]) == [{"id": "a", "parameters": {"tag": "first", "timeout": 1500},
                                   "requested": ["Y", "ECHO"], "rows": 1, "timeout": 1500,
                                   "requests": 3, "call": 1}]
    assert echoes(results[1]) == [{"id": "b", "parameters": {"scale": 0.5},
                                   "requested": ["ECHO"], "rows": 2, "timeout": 0,
                                   "requests": 3, "call": 1}] * 2
    assert echoes(results[2])[0]["parameters"] == {"flag": True}
    assert outputs_of(results[0].response)["Y"].tolist() == [[2, 4]]
    assert "Y" not in outputs_of(results[1].response)
    assert outputs_of(results[2].response)["Y"].tolist() == [[14, 16]]


def test_a_triton_error_in_one_response_fails_that_request_only(tmp_path):
    model = echo_model(tmp_path)
    results = through_batch(model, [echo_request("a", [[1, 1]]),
                                    echo_request("b", [[2, 2], [3, 3]], fail=True),
                                    echo_request("c", [[4, 4]])])
    assert [(r.code, r.message) for r in results] == [
        (0, ""), (3, "model 'echo' version 1: request b asked to fail"), (0, "")]
    assert outputs_of(results[0].response)["Y"].tolist() == [[2, 2]]
    assert outputs_of(results[2].response)["Y"].tolist() == [[8, 8]]
    assert [e["requests"] for e in echoes(results[0]) + echoes(results[2])] == [3, 3]
    every = through_batch(model, [echo_request("a", [[1, 1]], fail=True),
                                  echo_request("b", [[2, 2]], fail=True)])
    assert [(r.code, r.message) for r in every] == [
        (3, "model 'echo' version 1: request a asked to fail"),
        (3, "model 'echo' version 1: request b asked to fail")]


def test_inputs_of_each_request_are_views_of_the_batchs_rows(tmp_path):
    seen = []

    class Spy:
        def execute(self, requests):
            seen.extend(pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests)
            return [pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("Y", numpy.zeros((len(x), 2), numpy.float32)),
                pb_utils.Tensor("ECHO", numpy.full((len(x), 1), b"", object))]) for x in seen]

    model = echo_model(tmp_path)
    model.instance = Spy()
    through_batch(model, [echo_request("a", [[1, 2]]), echo_request("b", [[3, 4], [5, 6]])])
    assert [x.tolist() for x in seen] == [[[1, 2]], [[3, 4], [5, 6]]]
    assert seen[0].base is seen[1].base is not None and seen[0].flags.writeable


def test_a_sole_request_is_the_batch_as_before(tmp_path):
    model = echo_model(tmp_path)
    [result] = through_batch(model, [echo_request("solo", [[1, 2], [3, 4]], tag="x")])
    assert echoes(result)[0] == {"id": "solo", "parameters": {"tag": "x"},
                                 "requested": ["Y", "ECHO"], "rows": 2, "timeout": 0,
                                 "requests": 1, "call": 1}
    with pytest.raises(RequestFailed) as raised:
        through_batch(model, [echo_request("solo", [[1, 2]], fail=True)])
    assert (raised.value.code, raised.value.message) == (
        "INVALID_ARGUMENT", "model 'echo' version 1: request solo asked to fail")


SHORT_PY = ECHO_PY.replace('pb_utils.Tensor("Y", x * 2)', 'pb_utils.Tensor("Y", x[:1] * 2)')
ONLY_ASKED_PY = ECHO_PY.replace(
    'pb_utils.Tensor("Y", x * 2),',
    '*([pb_utils.Tensor("Y", x * 2)] if "Y" in request.requested_output_names() else []),')


def test_responses_that_cannot_be_joined_fail_the_batch_naming_the_output(tmp_path):
    model = echo_model(tmp_path, SHORT_PY)
    with pytest.raises(Internal, match=r"^model 'echo' version 1: output 'Y' of request 1 has "
                                       r"shape \[1, 2\]; its request has 2 rows$"):
        through_batch(model, [echo_request("a", [[1, 1]]), echo_request("b", [[2, 2], [3, 3]])])


def test_an_output_a_request_did_not_ask_for_may_be_left_out(tmp_path):
    model = echo_model(tmp_path, ONLY_ASKED_PY)
    results = through_batch(model, [echo_request("a", [[1, 1]], outputs=["ECHO"]),
                                    echo_request("b", [[2, 2]], outputs=["Y"])])
    assert [sorted(outputs_of(r.response)) for r in results] == [["ECHO"], ["Y"]]
    assert outputs_of(results[1].response)["Y"].tolist() == [[4, 4]]


# ------------------------------------------- the rest of the API models written for Triton use

# The echo model, its answers carrying parameters of their own (Triton's
# `InferenceResponse(parameters=...)`).
ANSWERS_WITH_PARAMETERS_PY = ECHO_PY.replace(
    "responses.append(pb_utils.InferenceResponse(output_tensors=[",
    "responses.append(pb_utils.InferenceResponse(parameters={\n"
    "                \"id\": request.request_id(), \"rows\": len(x), \"odd\": len(x) % 2 == 1},\n"
    "                output_tensors=[")


def test_each_requests_response_parameters_reach_its_answer(tmp_path):
    model = echo_model(tmp_path, ANSWERS_WITH_PARAMETERS_PY)
    results = through_batch(model, [echo_request("a", [[1, 1]]),
                                    echo_request("b", [[2, 2]], fail=True),
                                    echo_request("c", [[3, 3], [4, 4]])])
    assert [r.code for r in results] == [0, 3, 0]
    assert parameter_values(results[0].response.parameters) == {"id": "a", "rows": 1,
                                                                "odd": True}
    assert parameter_values(results[2].response.parameters) == {"id": "c", "rows": 2,
                                                                "odd": False}
    assert outputs_of(results[2].response)["Y"].tolist() == [[6, 6], [8, 8]]
    [alone] = through_batch(model, [echo_request("solo", [[5, 5]])])
    assert parameter_values(alone.response.parameters) == {"id": "solo", "rows": 1,
                                                           "odd": True}


@pytest.mark.parametrize(("parameters", "refused"), [
    ([("k", 1)], "parameters must be a dict, got <class 'list'>"),
    ({1: "int key"}, "parameter names must be of type str; 1 is of type <class 'int'>"),
    ({"x": 0.5}, "parameter 'x' must be of type bool, int or str; it is of type <class 'float'>"),
    ({"x": None}, "parameter 'x' must be of type bool, int or str; it is of type "
                  "<class 'NoneType'>"),
])
def test_response_parameters_are_booleans_integers_or_strings_as_in_triton(parameters, refused):
    with pytest.raises(pb_utils.TritonModelException) as raised:
        pb_utils.InferenceResponse(parameters=parameters)
    assert str(raised.value) == refused
    response = pb_utils.InferenceResponse(parameters={"b": False, "i": 7, "s": "t"})
    assert json.loads(response.parameters()) == {"b": False, "i": 7, "s": "t"}
    assert json.loads(pb_utils.InferenceResponse().parameters()) == {}


@pytest.mark.parametrize(("code", "status"), [
    ("UNKNOWN", "UNKNOWN"), ("INTERNAL", "INTERNAL"), ("NOT_FOUND", "NOT_FOUND"),
    ("INVALID_ARG", "INVALID_ARGUMENT"), ("UNAVAILABLE", "UNAVAILABLE"),
    ("UNSUPPORTED", "UNIMPLEMENTED"), ("ALREADY_EXISTS", "ALREADY_EXISTS"),
    ("CANCELLED", "CANCELLED"),
])
def test_each_triton_error_code_answers_its_status_as_triton_does(tmp_path, code, status):
    model = echo_model(tmp_path)
    results = through_batch(model, [echo_request("a", [[1, 1]], fail=code),
                                    echo_request("b", [[2, 2]])])
    assert [(CODE_NAME[r.code], r.message) for r in results] == [
        (status, "model 'echo' version 1: request a asked to fail"), ("OK", "")]
    with pytest.raises(RequestFailed) as raised:
        through_batch(model, [echo_request("solo", [[1, 1]], fail=code)])
    assert raised.value.code == status


METRICS_PY = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        kinds = pb_utils.MetricFamily
        self.rows = kinds(name="probe_rows", description="Rows seen", kind=kinds.COUNTER
                          ).Metric(labels={"model": args["model_name"]})
        self.last = kinds("probe_last_rows", "Rows of the last request", kinds.GAUGE).Metric()
        self.sizes = kinds("probe_request_rows", "Rows per request", kinds.HISTOGRAM).Metric(
            labels={"model": args["model_name"]}, buckets=[1, 2])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            self.rows.increment(len(x))
            self.last.set(len(x))
            self.sizes.observe(len(x))
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("Y", x * 2),
                pb_utils.Tensor("ECHO", np.full((len(x), 1), str(self.rows.value()), object))]))
        return responses
'''.replace("import triton_python_backend_utils", "import numpy as np\nimport "
            "triton_python_backend_utils")


def test_the_models_metric_families_are_served_with_the_computes(tmp_path):
    model = echo_model(tmp_path, METRICS_PY)
    results = through_batch(model, [echo_request("a", [[1, 1]]),
                                    echo_request("b", [[2, 2], [3, 3], [4, 4]])])
    assert [outputs_of(r.response)["ECHO"].tolist()[0] for r in results] == [[b"1.0"],
                                                                             [b"4.0"]]
    metrics = Metrics()
    metrics.registry.register(pb_utils.model_metrics())
    text = generate_latest(metrics.registry).decode()
    assert "# HELP probe_rows Rows seen\n" in text
    assert 'probe_rows{model="echo"} 4.0\n' in text  # its own name, as Triton serves it
    assert "probe_last_rows 3.0\n" in text and "# TYPE probe_last_rows gauge\n" in text
    for line in ['probe_request_rows_bucket{le="1.0",model="echo"} 1.0',
                 'probe_request_rows_bucket{le="2.0",model="echo"} 1.0',
                 'probe_request_rows_bucket{le="+Inf",model="echo"} 2.0',
                 'probe_request_rows_count{model="echo"} 2.0',
                 'probe_request_rows_sum{model="echo"} 4.0']:
        assert line + "\n" in text, line


def test_metric_families_are_used_as_triton_allows():
    kinds = pb_utils.MetricFamily
    counter = kinds("probe_checked_total", "A counter", kinds.COUNTER)
    assert kinds("probe_checked_total", "Again", kinds.COUNTER).Metric() is counter.Metric()
    refusals = [
        (lambda: counter.Metric().increment(-1), "a counter cannot be decremented"),
        (lambda: counter.Metric().set(3),
         "^metric 'probe_checked_total': a counter cannot be set$"),
        (lambda: kinds("probe_histogram", "h", kinds.HISTOGRAM).Metric(buckets=[1]).value(),
         "a histogram cannot be read as one value"),
        (lambda: counter.Metric(buckets=[1]), "a histogram needs buckets"),
        (lambda: kinds("probe_histogram", "h", kinds.HISTOGRAM).Metric(), "needs buckets"),
        (lambda: kinds("probe_checked_total", "d", kinds.GAUGE), "is a counter already"),
        (lambda: kinds("probe checked", "d", kinds.GAUGE), "not a Prometheus metric name"),
        (lambda: kinds("probe_kind", "d", "SUMMARY"), "kind must be"),
        (lambda: counter.Metric(labels={"bad-label": "x"}), "not a Prometheus label name"),
    ]
    for refused, message in refusals:
        with pytest.raises(pb_utils.TritonModelException, match=message):
            refused()


def test_the_helpers_a_triton_model_imports(tmp_path):
    entry, _ = load(tmp_path)
    assert pb_utils.get_model_dir() == str(entry.path / "1")
    assert pb_utils.triton_to_numpy_type(11) is numpy.float32
    assert pb_utils.triton_to_numpy_type(13) is numpy.object_
    assert pb_utils.numpy_to_triton_type(numpy.int64) == 9
    assert pb_utils.numpy_to_triton_type(numpy.object_) == 13
    words = numpy.array([[b"ab", "é"]], dtype=object)
    raw = pb_utils.serialize_byte_tensor(words)
    assert raw == b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa9"
    assert pb_utils.deserialize_bytes_tensor(raw).tolist() == [b"ab", "é".encode()]
    assert pb_utils.using_decoupled_model_transaction_policy(
        {"model_transaction_policy": {"decoupled": True}})
    assert not pb_utils.using_decoupled_model_transaction_policy({})
    assert (pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
            pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END) == (1, 2)
    tensor = pb_utils.Tensor("X", numpy.arange(4, dtype=numpy.float32))
    assert tensor.triton_dtype() == 11
    assert torch.from_dlpack(tensor).tolist() == [0.0, 1.0, 2.0, 3.0]  # the DLPack protocol
    with pytest.raises(pb_utils.TritonModelException, match="model loading API"):
        pb_utils.is_model_ready("other")
