"""HTTP/REST against `meshserve up`: the stock tritonclient.http with the client certificate,
answers equal to the gRPC path's and to torch, pins, deadlines, the asynchronous API and the
protocol label of the ingress's metrics."""

import http.client
import json
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy
import pytest
import torch

from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec

SCENARIOS = Path(__file__).with_name("triton_http_scenarios.py")
SHAPES = {"mlp": (256,), "cnn": (3, 64, 64)}


def http_port(mesh) -> int:
    return int((mesh.data_dir / "run" / "ingress.http-port").read_text())


def run_scenarios(mesh, token: str | None = None) -> dict:
    args = [sys.executable, str(SCENARIOS), f"127.0.0.1:{http_port(mesh)}", str(mesh.data_dir)]
    done = subprocess.run(args + ([token] if token else []), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(mesh) -> dict:
    return run_scenarios(mesh)


def test_health_and_server_metadata(report):
    assert (report["live"], report["ready"], report["model_ready"]) == (True, True, True)
    assert "binary_tensor_data" in report["extensions"]


@pytest.mark.parametrize(("name", "dims"), [("mlp", [-1, 256]), ("cnn", [-1, 3, 64, 64])])
def test_metadata_and_config(report, name, dims):
    meta = report["metadata"][name]
    assert (meta["name"], meta["versions"], meta["platform"]) == \
        (name, ["1", "2"], "pytorch_libtorch")
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": dims}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 10]}]
    assert report["config"][name] == {"max_batch_size": 32, "dims": [dims[1:]],
                                      "has_dynamic_batching": True}


@pytest.mark.parametrize("target", [f"{m}@{v}/{e}" for m in SHAPES for v in ("1", "2")
                                    for e in ("binary", "json")])
def test_tritonclient_http_outputs_equal_a_local_forward_pass(report, target):
    assert report["diffs"][target] <= 1e-5
    assert report["served_version"][target] == target.split("@")[1].split("/")[0]


def test_statistics_and_index(report):
    # mlp@1 served two requests of two rows each (binary, then JSON) in between.
    assert report["stats"] == {"inference_count": 4, "success": 2}
    demo = [entry for entry in report["index"] if entry[0] in SHAPES]
    assert demo == [[m, v, "READY"] for m in ("cnn", "mlp") for v in ("1", "2")]
    assert report["cnn_metadata"] == "allowed"


# --- raw HTTP beside gRPC -------------------------------------------------------------------


@pytest.fixture(scope="module")
def https(mesh):
    context = ssl.create_default_context(cafile=str(mesh.tls / "ca.crt"))
    context.load_cert_chain(mesh.tls / "client.crt", mesh.tls / "client.key")
    connection = http.client.HTTPSConnection("127.0.0.1", http_port(mesh), context=context,
                                             timeout=60)
    yield connection
    connection.close()


def post(connection, path: str, body: bytes, headers: dict | None = None):
    connection.request("POST", path, body, headers or {})
    answer = connection.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


def http_outputs(connection, name: str, version: str, x: numpy.ndarray,
                 binary: bool) -> tuple[int, bytes]:
    tensor = {"name": "INPUT__0", "datatype": "FP32", "shape": list(x.shape)}
    payload = x.tobytes()
    if binary:
        tensor["parameters"] = {"binary_data_size": len(payload)}
    else:
        tensor["data"] = x.tolist()
    header = json.dumps({"inputs": [tensor],
                         "parameters": {"binary_data_output": binary}}).encode()
    status, headers, body = post(connection, f"/v2/models/{name}/versions/{version}/infer",
                                 header + (payload if binary else b""),
                                 {"Inference-Header-Content-Length": str(len(header))}
                                 if binary else {})
    assert status == 200, body
    if binary:
        length = int(headers["inference-header-content-length"])
        document, raw = json.loads(body[:length]), body[length:]
        assert document["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}
        return document, raw
    document = json.loads(body)
    return document, numpy.asarray(document["outputs"][0]["data"], numpy.float32).tobytes()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("binary", [True, False])
def test_outputs_equal_the_grpc_paths(mesh, https, name, binary):
    x = numpy.random.default_rng(3).standard_normal((3, *SHAPES[name]), numpy.float32)
    document, raw = http_outputs(https, name, "2", x, binary)
    assert document["outputs"][0]["shape"] == [3, 10]
    request = pb.ModelInferRequest(model_name=name, model_version="2")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    files = TlsFiles.for_identity(mesh.tls, "client")
    with grpc.secure_channel(mesh.endpoint, channel_credentials(files)) as channel:
        answer = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert raw == answer.raw_output_contents[0]


def test_non_finite_outputs_come_back_as_json(mesh, https):
    """Inputs that overflow the model give NaN and infinite outputs: answered 200 with
    `NaN` and `Infinity` as Triton writes them, equal to a local forward pass."""
    x = numpy.full((1, 256), 3e38, numpy.float32)
    x[0, ::2] = -3e38
    document, raw = http_outputs(https, "mlp", "2", x, binary=False)
    module = torch.jit.load(str(mesh.data_dir / "models" / "mlp" / "2" / "model.pt")).eval()
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert not numpy.isfinite(expected).all()
    numpy.testing.assert_array_equal(numpy.frombuffer(raw, numpy.float32), expected.ravel())


def test_the_classification_parameter_answers_the_top_classes(mesh, https):
    x = numpy.random.default_rng(4).standard_normal((2, 256), numpy.float32)
    tensor = {"name": "INPUT__0", "datatype": "FP32", "shape": [2, 256], "data": x.tolist()}

    def classify(count) -> tuple[int, dict]:
        body = {"inputs": [tensor],
                "outputs": [{"name": "OUTPUT__0", "parameters": {"classification": count}}]}
        status, _, answer = post(https, "/v2/models/mlp/versions/1/infer",
                                 json.dumps(body).encode())
        return status, json.loads(answer)

    status, document = classify(2)
    assert status == 200, document
    [output] = document["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 2])
    module = torch.jit.load(str(mesh.data_dir / "models" / "mlp" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        rows = module(torch.from_numpy(x)).numpy()
    top = [numpy.argsort(-row, kind="stable")[:2] for row in rows]
    assert [element.split(":")[1] for element in output["data"]] == \
        [str(index) for indexes in top for index in indexes]
    for bad in (0, "three"):
        status, document = classify(bad)
        assert status == 400
        assert document["error"] == ("output 'OUTPUT__0' parameter 'classification' must be "
                                     "a positive integer, the number of classes to return")


def test_the_version_header_pins_and_the_timeout_parameter_bounds(https):
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [1, 256],
                                   "data": [0.0] * 256}]}).encode()
    for version in ("1", "2", "2"):
        status, _, answer = post(https, "/v2/models/mlp/infer", body,
                                 {"x-model-version": version})
        assert (status, json.loads(answer)["model_version"]) == (200, version)
    late = json.loads(body) | {"parameters": {"timeout": 1}}  # 1 µs
    status, _, answer = post(https, "/v2/models/mlp/infer", json.dumps(late).encode())
    assert status == 504, answer
    assert "deadline" in json.loads(answer)["error"].lower()


def test_asynchronous_submit_then_fetch(mesh, https):
    x = numpy.random.default_rng(5).standard_normal((2, 256), numpy.float32)
    body = json.dumps({"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [2, 256],
                                   "data": x.tolist()}]}).encode()
    status, headers, answer = post(https, "/v2/models/mlp/versions/1/infer/async", body)
    assert status == 202, answer
    https.request("GET", f"{headers['location']}?wait_ms=30000")
    reply = https.getresponse()
    result = json.loads(reply.read())
    assert (reply.status, result["state"]) == (200, "DONE"), result
    module = torch.jit.load(str(mesh.data_dir / "models" / "mlp" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    got = numpy.asarray(result["response"]["outputs"][0]["data"], numpy.float32)
    assert numpy.abs(got.reshape(2, 10) - expected).max() <= 1e-5


def test_ingress_metrics_count_http_requests_apart(mesh, https):
    port = int((mesh.data_dir / "run" / "ingress.metrics-port").read_text())

    def http_successes() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("nv_inference_request_success{")
                   and 'protocol="http"' in line and 'model="cnn"' in line)

    before = http_successes()
    x = numpy.zeros((1, 3, 64, 64), numpy.float32)
    for _ in range(3):
        http_outputs(https, "cnn", "1", x, binary=True)
    assert http_successes() - before == 3


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_the_load_generator_over_http(mesh, encoding):
    spec = LoadSpec(target=f"127.0.0.1:{http_port(mesh)}", model="mlp", version="2",
                    protocol="http", encoding=encoding, concurrency=4, duration_s=60,
                    warmup_s=0, max_requests=40, ca=mesh.tls / "ca.crt",
                    cert=mesh.tls / "client.crt", key=mesh.tls / "client.key")
    result = run_load(spec)
    assert (result["requests"], result["errors"]) == (40, {})
    assert result["versions"] == {"2": 40}
    assert result["transport"] == f"http-{encoding}"
