"""tritonclient's public API against `meshserve up`, over gRPC and HTTP, sync and asyncio, as an
application written for Triton calls it: each answer as Triton gives it (its protocol
documents and its server), outputs equal to a local forward pass, and the extensions that are
not served refused with a status and a message a Triton user reads as such."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import meshserve

SCENARIOS = Path(__file__).with_name("triton_surface_scenarios.py")
CLIENTS = ["grpc", "grpc_aio", "http", "http_aio"]
TOLERANCE = 1e-5  # a batch computed with other requests' rows may round otherwise


@pytest.fixture(scope="module")
def report(mesh) -> dict:
    token = meshserve("token", "issue", "--subject", "app/surface", "--scope", "infer",
                      "--scope", "models:read", "--models", "mlp", "--ttl", "10m",
                      f"--data-dir={mesh.data_dir}").stdout.strip()
    done = subprocess.run([sys.executable, str(SCENARIOS), str(mesh.data_dir), token],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("client", CLIENTS)
def test_server_metadata_lists_the_extensions_served(report, client):
    """Triton's names: a client that looks for "schedule_policy" before it sends `priority`
    and `timeout`, or for "parameters" before its own, finds them."""
    extensions = report[client]["extensions"]
    for name in ("classification", "model_configuration", "statistics", "streaming",
                 "schedule_policy", "parameters", "logging", "trace"):
        assert name in extensions
    assert ("binary_tensor_data" in extensions) == client.startswith("http")


def test_model_readiness_of_versions_served_and_not(report):
    for client in ("grpc", "http"):
        assert report[client]["model_ready"] == [True, True, False, False]
    for client in ("grpc_aio", "http_aio"):
        assert report[client]["model_ready"] == [True, False]


def test_http_readiness_of_a_model_or_version_not_served_is_404_naming_it(report):
    """As Triton's HTTP server answers, and as tritonclient.http reads (not ready)."""
    raw = report["raw_http"]
    assert raw["/v2/models/mlp/ready"] == [200, None]
    assert raw["/v2/models/mlp/versions/1/ready"] == [200, None]
    assert raw["/v2/models/nope/ready"] == [404, {"error": "unknown model 'nope'"}]
    assert raw["/v2/models/mlp/versions/9/ready"] == \
        [404, {"error": "model 'mlp' has no version '9' (served: 1, 2)"}]


GRPC_METHODS = {
    "load_model": "RepositoryModelLoad", "unload_model": "RepositoryModelUnload",
    "get_system_shared_memory_status": "SystemSharedMemoryStatus",
    "register_system_shared_memory": "SystemSharedMemoryRegister",
    "unregister_system_shared_memory": "SystemSharedMemoryUnregister",
    "get_cuda_shared_memory_status": "CudaSharedMemoryStatus",
    "unregister_cuda_shared_memory": "CudaSharedMemoryUnregister",
}
EXTENSION_OF = {
    "load_model": "model_repository", "unload_model": "model_repository",
    "get_system_shared_memory_status": "system_shared_memory",
    "register_system_shared_memory": "system_shared_memory",
    "unregister_system_shared_memory": "system_shared_memory",
    "get_cuda_shared_memory_status": "cuda_shared_memory",
    "register_cuda_shared_memory": "cuda_shared_memory",
    "unregister_cuda_shared_memory": "cuda_shared_memory",
}


@pytest.mark.parametrize("call", sorted(GRPC_METHODS))
def test_grpc_calls_of_extensions_not_served_are_unimplemented(report, call):
    assert report["grpc"]["unserved"][call] == [
        "StatusCode.UNIMPLEMENTED",
        f"unknown method /inference.GRPCInferenceService/{GRPC_METHODS[call]}"]


@pytest.mark.parametrize("call", sorted(EXTENSION_OF))
def test_http_calls_of_extensions_not_served_are_501_naming_the_extension(report, call):
    """Not 404 ("no route"), which a Triton user reads as an unknown model: 501, the HTTP
    status of gRPC's UNIMPLEMENTED, and the extension named."""
    status, message = report["http"]["unserved"][call]
    assert status == "501"
    assert f"(Triton's {EXTENSION_OF[call]} extension)" in message
    assert "not served" in message


def test_asyncio_clients_are_refused_alike(report):
    assert report["grpc_aio"]["load_model"][0] == "StatusCode.UNIMPLEMENTED"
    assert report["grpc_aio"]["shared_memory"][0] == "StatusCode.UNIMPLEMENTED"
    assert report["http_aio"]["load_model"][0] == "501"


SETTINGS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
            "log_verbose_level": 0, "log_format": "json"}


def grpc_settings(answer: dict) -> dict:
    """A LogSettingsResponse as tritonclient gives it in JSON (each value under the name of
    its kind), as the HTTP binding's object."""
    return {name: value for name, kinds in answer["settings"].items()
            for value in kinds.values()}


def test_log_settings_are_read_as_triton_names_them(report):
    """The ingress's settings as `meshserve up` starts it (INFO, JSON lines)."""
    assert grpc_settings(report["grpc"]["log_settings"]["read"]) == SETTINGS
    assert grpc_settings(report["grpc_aio"]["log_settings"]) == SETTINGS
    assert report["http"]["log_settings"]["read"] == SETTINGS
    assert report["http_aio"]["log_settings"] == SETTINGS


@pytest.mark.parametrize("client", ["grpc", "http"])
def test_a_verbose_level_gives_every_request_an_access_log_line(report, client):
    """Answered with the settings as they are then; ten requests, ten lines (the sample
    is 1 % otherwise), and the level set back to 0."""
    settings = report[client]["log_settings"]
    read = grpc_settings if client == "grpc" else dict
    assert read(settings["verbose"]) == SETTINGS | {"log_verbose_level": 1}
    assert settings["verbose_lines"] == 10
    assert read(settings["back"]) == SETTINGS


def test_log_settings_refused_name_the_setting_and_the_permission(report):
    grpc, http = report["grpc"]["log_settings"], report["http"]["log_settings"]
    unknown = ("unknown log setting 'log_nope' (settings: log_file, log_info, log_warning, "
               "log_error, log_verbose_level, log_format)")
    assert grpc["unknown"] == ["StatusCode.INVALID_ARGUMENT", unknown]
    assert http["unknown"] == ["400", unknown]
    assert http["file"][1] == grpc["file"][1] == (
        "log setting 'log_file' cannot be changed: the service logs to standard error, where "
        "the platform collects them")
    denied = ("'app/surface' may not read or change the log settings (the policy's 'admin' "
              "on model '*')")
    assert grpc["token"] == ["StatusCode.PERMISSION_DENIED", denied]
    assert http["token"] == ["403", denied]


def test_grpc_infer_echoes_the_id_and_equals_a_local_forward_pass(report):
    """With request parameters, priority, timeout, gzip and deflate, a header."""
    grpc = report["grpc"]
    assert (grpc["infer"]["id"], grpc["infer"]["version"]) == ("g-1", "1")
    assert max(grpc["infer"]["diff"], grpc["deflate"]) <= TOLERANCE
    request_id, difference = report["grpc_aio"]["infer"]
    assert (request_id, difference <= TOLERANCE) == ("q-1", True)


def test_http_infer_binary_or_json_compressed_or_not_equals_a_local_forward_pass(report):
    infer = report["http"]["infer"]
    assert len(infer) == 16
    for key, (request_id, version, difference) in infer.items():
        assert (request_id, version) == ("h-1", "1"), key
        assert difference <= TOLERANCE, key
    for key, (request_id, difference) in report["http_aio"]["infer"].items():
        assert (request_id, difference <= TOLERANCE) == ("ha-1", True), key


def test_http_answers_compressed_as_the_client_accepts(report):
    """tritonclient's response_compression_algorithm sends Accept-Encoding; Triton compresses
    its inference answers so."""
    assert report["raw_http"]["gzip"] == {"status": 200, "coding": "gzip",
                                          "outputs": ["OUTPUT__0"]}


def test_unknown_output_names_are_refused_naming_them(report):
    message = "unknown output 'NOPE' requested (model 'mlp' outputs: OUTPUT__0)"
    assert report["grpc"]["unknown_output"] == ["StatusCode.INVALID_ARGUMENT", message]
    assert report["http"]["unknown_output"] == ["400", message]


def test_http_output_in_shared_memory_is_refused_saying_how_it_comes_back_over_http(report):
    assert report["http"]["output_shared_memory"] == [
        "400", "output 'OUTPUT__0' names shared_memory_region 'out': shared memory is not "
               "supported; leave the parameter out and it comes back in the response, as "
               "data or with 'binary_data': true"]


@pytest.mark.parametrize("client", ["grpc", "http"])
def test_class_count_answers_the_top_classes_of_a_local_forward_pass(report, client):
    classes = report[client]["classes"]
    assert classes["shape"] == [3, 3]
    assert classes["indexes"] == classes["expected"]
    assert classes["value_diff"] <= TOLERANCE


def test_uint8_inputs_and_bytes_outputs(report):
    """preprocess (UINT8 in) and the classify ensemble (BYTES and FP32 out), against the same
    steps done here; JSON BYTES come back as strings, binary ones as bytes (tritonclient)."""
    checks = [report["grpc"]["uint8"], *report["http"]["uint8"].values()]
    for check in checks:
        assert check["pixels_diff"] <= TOLERANCE
        assert check["scores_diff"] <= TOLERANCE
        assert check["labels"] == [[2, 3], "object"]
    assert [check["label_type"] for check in checks] == ["bytes", "bytes", "str"]


def test_statistics_count_each_request_and_each_row(report):
    """5 requests of 3 rows over gRPC, 4 over HTTP (asynchronous): Triton counts requests in
    `success`, rows in `inference_count`, batches in `execution_count` (each request alone
    here, sent one after another or fewer batches)."""
    inferences, executions, successes = report["grpc"]["stats"]
    assert (inferences, successes) == (15, 5)
    assert 1 <= executions <= 5
    inferences, executions, successes = report["http"]["stats"]
    assert (inferences, successes) == (12, 4)
    assert 1 <= executions <= 4


def test_async_infer_calls_back_each_request(report):
    answers = report["grpc"]["async"]
    assert answers["ids"] == ["a0", "a1", "a2"]
    assert answers["errors"] == [["StatusCode.INVALID_ARGUMENT",
                                  "unknown input 'NOPE' for model 'mlp' (inputs: INPUT__0)"]]
    assert answers["max_diff"] <= TOLERANCE
    assert report["http"]["async_ids"] == ["h0", "h1", "h2", "h3"]


def test_a_stream_answers_every_request_around_errors(report):
    stream = report["grpc"]["stream"]
    answered = {request_id: (answer["version"], answer["shape"])
                for request_id, answer in stream["answered"].items()}
    assert answered == {"s0": ("2", [3, 10]),  # pinned by the header
                        "s3": ("1", [3, 2]),  # classification
                        "s4": ("2", [3, 10])}
    assert max(stream["answered"][key]["diff"] for key in ("s0", "s4")) <= TOLERANCE
    assert stream["errors"] == [
        "INVALID_ARGUMENT: unknown input 'NOPE' for model 'mlp' (inputs: INPUT__0)",
        "NOT_FOUND: unknown model 'nope'"]
    assert stream["more"] == 0
    aio = report["grpc_aio"]["stream"]
    assert sorted(aio["answered"]) == ["x0", "x2"]
    assert max(aio["answered"].values()) <= TOLERANCE
    assert len(aio["errors"]) == 1


@pytest.mark.parametrize(("client", "denied", "unauthenticated"), [
    ("grpc", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"),
    ("http", "403", "401")])
def test_a_bearer_token_in_the_headers(report, client, denied, unauthenticated):
    token = report[client]["token"]
    assert token["diff"] <= TOLERANCE
    assert token["cnn"] == [denied, "'app/surface' may not models:read model 'cnn'"]
    assert token["none"][0] == unauthenticated


TRACE_OFF = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
             "log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"}


def grpc_trace(answer: dict) -> dict:
    """A TraceSettingResponse as tritonclient gives it in JSON, as the HTTP binding's object
    (`trace_level` a list, the others strings)."""
    return {name: kinds["value"] if name == "trace_level" else kinds["value"][0]
            for name, kinds in answer["settings"].items()}


@pytest.mark.parametrize("client", ["grpc", "http"])
def test_trace_settings_of_a_mesh_that_exports_no_traces(report, client):
    """Read as Triton writes them, global and a model's; a model's rate set and cleared
    (null: the global one again); tracing, TENSORS and an unknown model refused naming
    why."""
    settings = report[client]["trace_settings"]
    read = grpc_trace if client == "grpc" else dict
    assert read(settings["read"]) == read(settings["mlp"]) == TRACE_OFF
    assert read(settings["rate"]) == TRACE_OFF | {"trace_rate": "10"}
    assert read(settings["cleared"]) == TRACE_OFF
    status = {"grpc": ["StatusCode.FAILED_PRECONDITION", "StatusCode.INVALID_ARGUMENT",
                       "StatusCode.NOT_FOUND"], "http": ["400", "400", "404"]}[client]
    assert settings["on"] == [status[0], "tracing is off in this ingress: it exports no traces "
                                         "(OTEL_EXPORTER_OTLP_ENDPOINT is not set)"]
    assert settings["tensors"] == [status[1], "trace setting 'trace_level' TENSORS is not "
                                              "served: a trace never holds a request's data"]
    assert settings["unknown"] == [status[2], "unknown model 'nope'"]
