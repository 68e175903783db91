"""Drives a running `meshserve up` through tritonclient's public API as an application written
for Triton does — tritonclient.grpc and tritonclient.http, each sync and asyncio — and reports
what each call answered, as JSON (compared with Triton's answers by
test_tritonclient_surface.py). Runs in a process of its own: tritonclient's protobuf
definitions of the `inference` package cannot share a process with meshserve's.

Usage: triton_surface_scenarios.py DATA_DIR TOKEN
(ports from DATA_DIR/run; TOKEN: a bearer token for model mlp, scopes infer and models:read)
"""

import asyncio
import gzip
import http.client
import json
import queue
import ssl
import sys
import time
import warnings
from pathlib import Path

import numpy
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
import tritonclient.http as th
import tritonclient.http.aio as tha
from triton_scenarios import classes  # beside this file: run as a script
from tritonclient.utils import InferenceServerException

warnings.filterwarnings("ignore")
WAIT_S = 30


class Mesh:
    def __init__(self, data_dir: Path, token: str) -> None:
        self.data_dir = data_dir
        self.tls = data_dir / "tls"
        run = data_dir / "run"
        self.grpc = (run / "endpoint").read_text().strip()
        self.http = f"127.0.0.1:{(run / 'ingress.http-port').read_text().strip()}"
        self.token_grpc = f"127.0.0.1:{(run / 'ingress.token-port').read_text().strip()}"
        self.token = token

    def grpc_client(self, module=tc):
        return module.InferenceServerClient(
            self.grpc, ssl=True, root_certificates=str(self.tls / "ca.crt"),
            private_key=str(self.tls / "client.key"),
            certificate_chain=str(self.tls / "client.crt"))

    def ssl_context(self, certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.tls / "ca.crt"))
        if certificate:
            context.load_cert_chain(str(self.tls / "client.crt"), str(self.tls / "client.key"))
        return context

    def http_client(self, certificate: bool = True):
        options = {"ca_certs": str(self.tls / "ca.crt")}
        if certificate:
            options |= {"certfile": str(self.tls / "client.crt"),
                        "keyfile": str(self.tls / "client.key")}
        return th.InferenceServerClient(self.http, ssl=True, ssl_options=options)

    def raw_http(self, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None) -> tuple[int, dict, bytes]:
        host, port = self.http.split(":")
        connection = http.client.HTTPSConnection(host, int(port), context=self.ssl_context(),
                                                 timeout=WAIT_S)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            connection.close()

    def forward(self, name: str, version: str, x: numpy.ndarray) -> numpy.ndarray:
        module = torch.jit.load(str(self.data_dir / "models" / name / version / "model.pt"))
        with torch.inference_mode():
            return module.eval()(torch.from_numpy(x)).numpy()


def refusal(call) -> list:
    """[status, message] of the InferenceServerException `call()` raises (["none"] if none)."""
    try:
        call()
    except InferenceServerException as error:
        return [str(error.status()), error.message()]
    return ["none"]


async def async_refusal(call) -> list:
    try:
        await call()
    except InferenceServerException as error:
        return [str(error.status()), error.message()]
    return ["none"]


def diff(got: numpy.ndarray, expected: numpy.ndarray) -> float:
    return float(numpy.abs(got - expected).max())


def rows(seed: int, count: int = 3) -> numpy.ndarray:
    return numpy.random.default_rng(seed).standard_normal((count, 256), numpy.float32)


def tensor(module, x: numpy.ndarray, name: str = "INPUT__0", datatype: str = "FP32",
           **options):
    made = module.InferInput(name, list(x.shape), datatype)
    made.set_data_from_numpy(x, **options)
    return made


def unserved_grpc(client) -> dict:
    return {
        "load_model": refusal(lambda: client.load_model("mlp", config='{"max_batch_size": 8}')),
        "unload_model": refusal(lambda: client.unload_model("mlp")),
        "get_system_shared_memory_status": refusal(client.get_system_shared_memory_status),
        "register_system_shared_memory": refusal(
            lambda: client.register_system_shared_memory("r", "/r", 64)),
        "unregister_system_shared_memory": refusal(client.unregister_system_shared_memory),
        "get_cuda_shared_memory_status": refusal(client.get_cuda_shared_memory_status),
        "unregister_cuda_shared_memory": refusal(client.unregister_cuda_shared_memory),
    }


def unserved_http(client) -> dict:
    return {
        "load_model": refusal(lambda: client.load_model(
            "mlp", config='{"max_batch_size": 8}', files={"file:1/model.pt": b"x"})),
        "unload_model": refusal(lambda: client.unload_model("mlp", unload_dependents=True)),
        "get_system_shared_memory_status": refusal(client.get_system_shared_memory_status),
        "register_system_shared_memory": refusal(
            lambda: client.register_system_shared_memory("r", "/r", 64)),
        "unregister_system_shared_memory": refusal(client.unregister_system_shared_memory),
        "get_cuda_shared_memory_status": refusal(client.get_cuda_shared_memory_status),
        "register_cuda_shared_memory": refusal(
            lambda: client.register_cuda_shared_memory("r", b"AAAA", 0, 64)),
        "unregister_cuda_shared_memory": refusal(client.unregister_cuda_shared_memory),
    }


def access_lines(mesh: Mesh) -> int:
    """The access-log lines in the ingress's log so far."""
    log = (mesh.data_dir / "run" / "ingress.log").read_text()
    return log.count('"logger":"meshserve.access"')


def log_settings(mesh: Mesh, client, module, bearer: dict, token) -> dict:
    """Triton's logging extension: read, changed to verbose (each of ten requests then gets
    an access-log line), refused for a bad setting and for a token without `admin`, and set
    back (the mesh is shared with other tests)."""
    json_kind = {} if module is th else {"as_json": True}
    x = tensor(module, rows(9))
    report = {"read": client.get_log_settings(**json_kind)}
    try:
        report["verbose"] = client.update_log_settings({"log_verbose_level": 1}, **json_kind)
        before = access_lines(mesh)
        for _ in range(10):
            client.infer("mlp", [x])
        report["verbose_lines"] = wait_for_count(lambda: access_lines(mesh) - before, 10)
        report["unknown"] = refusal(lambda: client.update_log_settings({"log_nope": True}))
        report["file"] = refusal(lambda: client.update_log_settings({"log_file": "/tmp/x"}))
        report["token"] = refusal(lambda: token.get_log_settings(headers=bearer))
    finally:
        report["back"] = client.update_log_settings({"log_verbose_level": 0}, **json_kind)
    return report


def trace_settings(client, module) -> dict:
    """Triton's trace extension on a mesh that exports no traces: read (global and a
    model's), a model's rate changed and cleared, tracing refused to be turned on."""
    json_kind = {} if module is th else {"as_json": True}
    report = {"read": client.get_trace_settings(**json_kind),
              "mlp": client.get_trace_settings("mlp", **json_kind)}
    try:
        report["rate"] = client.update_trace_settings("mlp", {"trace_rate": "10"},
                                                      **json_kind)
        report["on"] = refusal(lambda: client.update_trace_settings(
            settings={"trace_level": ["TIMESTAMPS"]}))
        report["tensors"] = refusal(lambda: client.update_trace_settings(
            settings={"trace_level": ["TENSORS"]}))
        report["unknown"] = refusal(lambda: client.get_trace_settings("nope"))
    finally:
        report["cleared"] = client.update_trace_settings("mlp", {"trace_rate": None},
                                                         **json_kind)
    return report


def wait_for_count(count, wanted: int) -> int:
    """`count()` once it reaches `wanted` (lines are written as answers leave), or after
    WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while count() < wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return count()


def counts(stats: dict) -> list[int]:
    """[inference_count, execution_count, success count] of one version's statistics."""
    return [int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)),
            int(stats["inference_stats"]["success"].get("count", 0))]


def grpc_sync(mesh: Mesh) -> dict:
    client = mesh.grpc_client()
    x = rows(1)
    report = {
        "extensions": client.get_server_metadata(as_json=True)["extensions"],
        "model_ready": [client.is_model_ready("mlp"), client.is_model_ready("mlp", "1"),
                        client.is_model_ready("mlp", "9"), client.is_model_ready("nope")],
        "unserved": unserved_grpc(client),
    }
    result = client.infer("mlp", [tensor(tc, x)], model_version="1", request_id="g-1",
                          outputs=[tc.InferRequestedOutput("OUTPUT__0")],
                          parameters={"custom": "value", "n": 3}, priority=1,
                          timeout=30_000_000, compression_algorithm="gzip",
                          headers={"x-client": "surface"})
    response = result.get_response()
    report["infer"] = {"id": response.id, "version": response.model_version,
                       "diff": diff(result.as_numpy("OUTPUT__0"), mesh.forward("mlp", "1", x))}
    report["deflate"] = diff(client.infer("mlp", [tensor(tc, x)], model_version="2",
                                          compression_algorithm="deflate").as_numpy("OUTPUT__0"),
                             mesh.forward("mlp", "2", x))
    report["unknown_output"] = refusal(lambda: client.infer(
        "mlp", [tensor(tc, x)], outputs=[tc.InferRequestedOutput("NOPE")]))
    report["classes"] = classes(
        client.infer("mlp", [tensor(tc, x)], model_version="1",
                     outputs=[tc.InferRequestedOutput("OUTPUT__0", class_count=3)])
        .as_numpy("OUTPUT__0"), mesh.forward("mlp", "1", x))
    report["uint8"] = uint8_checks(mesh, client, tc)
    before = counts(client.get_inference_statistics("mlp", "2", as_json=True)["model_stats"][0])
    for _ in range(5):
        client.infer("mlp", [tensor(tc, x)], model_version="2")
    after = counts(client.get_inference_statistics("mlp", "2", as_json=True)["model_stats"][0])
    report["stats"] = [a - b for a, b in zip(after, before)]
    report["async"] = async_infer_checks(mesh, client, x)
    report["stream"] = stream_checks(mesh, client, x)
    # A token on the bearer-token port: gRPC metadata keys are lowercase.
    token = tc.InferenceServerClient(mesh.token_grpc, ssl=True,
                                     root_certificates=str(mesh.tls / "ca.crt"))
    bearer = {"authorization": f"Bearer {mesh.token}"}
    result = token.infer("mlp", [tensor(tc, x)], model_version="2", headers=bearer)
    report["token"] = {"diff": diff(result.as_numpy("OUTPUT__0"), mesh.forward("mlp", "2", x)),
                       "cnn": refusal(lambda: token.get_model_metadata("cnn", headers=bearer)),
                       "none": refusal(lambda: token.get_model_metadata("mlp"))}
    report["log_settings"] = log_settings(mesh, client, tc, bearer, token)
    report["trace_settings"] = trace_settings(client, tc)
    token.close()
    client.close()
    return report


def uint8_checks(mesh: Mesh, client, module, **options) -> dict:
    """UINT8 in (preprocess, and the classify ensemble whose SCORES are FP32 and LABELS
    BYTES), against the preprocessing and cnn forward pass done here."""
    image = numpy.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=numpy.uint8)
    pixels = image.transpose(0, 3, 1, 2).astype(numpy.float32) / 127.5 - 1.0
    wanted = [module.InferRequestedOutput(name, **options) for name in ("LABELS", "SCORES")]
    result = client.infer("classify", [tensor(module, image, "IMAGE", "UINT8", **options)],
                          request_id="c-1", outputs=wanted)
    preprocessed = client.infer(
        "preprocess", [tensor(module, image, "IMAGE", "UINT8", **options)],
        outputs=[module.InferRequestedOutput("PIXELS", **options)]).as_numpy("PIXELS")
    scores = result.as_numpy("SCORES")
    labels = result.as_numpy("LABELS")
    expected = {}
    for version in ("1", "2"):  # the version of cnn the traffic policy picks
        logits = torch.from_numpy(mesh.forward("cnn", version, pixels))
        expected[version] = torch.softmax(logits, 1).topk(3).values.numpy()
    return {"pixels_diff": diff(preprocessed, pixels),
            "scores_diff": min(diff(scores, top) for top in expected.values()),
            "labels": [list(labels.shape), str(labels.dtype)],
            "label_type": type(labels.flat[0]).__name__}


def async_infer_checks(mesh: Mesh, client, x: numpy.ndarray) -> dict:
    answers: queue.Queue = queue.Queue()
    for i in range(3):  # tritonclient calls back with keywords: result=, error=
        client.async_infer("mlp", [tensor(tc, x)], model_version="1", request_id=f"a{i}",
                           callback=lambda result, error: answers.put((result, error)))
    client.async_infer("mlp", [tensor(tc, x, "NOPE")], request_id="a-bad",
                       callback=lambda result, error: answers.put((result, error)))
    expected = mesh.forward("mlp", "1", x)
    ids, errors, diffs = [], [], []
    for _ in range(4):
        result, error = answers.get(timeout=WAIT_S)
        if error is not None:
            errors.append([str(error.status()), error.message()])
        else:
            ids.append(result.get_response().id)
            diffs.append(diff(result.as_numpy("OUTPUT__0"), expected))
    return {"ids": sorted(ids), "errors": errors, "max_diff": max(diffs)}


def stream_checks(mesh: Mesh, client, x: numpy.ndarray) -> dict:
    """One stream (gzip, the version pinned by header), with refusals between good requests:
    every request is answered and the stream goes on."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)),
                        headers={"x-model-version": "2"}, compression_algorithm="gzip")
    client.async_stream_infer("mlp", [tensor(tc, x)], request_id="s0")
    client.async_stream_infer("mlp", [tensor(tc, x, "NOPE")], request_id="s1")
    client.async_stream_infer("nope", [tensor(tc, x)], request_id="s2")
    client.async_stream_infer("mlp", [tensor(tc, x)], request_id="s3", model_version="1",
                              outputs=[tc.InferRequestedOutput("OUTPUT__0", class_count=2)])
    client.async_stream_infer("mlp", [tensor(tc, x)], request_id="s4",
                              parameters={"custom": 1})
    answered, errors = {}, []
    for _ in range(5):
        result, error = answers.get(timeout=WAIT_S)
        if error is not None:
            errors.append(error.message())
            continue
        response = result.get_response()
        output = result.as_numpy("OUTPUT__0")
        answered[response.id] = {
            "version": response.model_version,
            "diff": (None if output.dtype == object
                     else diff(output, mesh.forward("mlp", response.model_version, x))),
            "shape": list(output.shape)}
    client.stop_stream()
    return {"answered": answered, "errors": sorted(errors), "more": answers.qsize()}


async def grpc_aio(mesh: Mesh) -> dict:
    client = mesh.grpc_client(tca)
    x = rows(3)
    report = {"extensions": (await client.get_server_metadata(as_json=True))["extensions"],
              "model_ready": [await client.is_model_ready("mlp", "2"),
                              await client.is_model_ready("nope")],
              "load_model": await async_refusal(lambda: client.load_model("mlp")),
              "shared_memory": await async_refusal(client.get_system_shared_memory_status),
              "log_settings": await client.get_log_settings(as_json=True)}
    result = await client.infer("mlp", [tensor(tca, x)], model_version="2", request_id="q-1",
                                compression_algorithm="gzip", priority=1, timeout=30_000_000)
    report["infer"] = [result.get_response().id,
                       diff(result.as_numpy("OUTPUT__0"), mesh.forward("mlp", "2", x))]

    async def requests():
        yield {"model_name": "mlp", "inputs": [tensor(tca, x)], "request_id": "x0",
               "model_version": "1"}
        yield {"model_name": "mlp", "inputs": [tensor(tca, x, "NOPE")], "request_id": "x1"}
        yield {"model_name": "mlp", "inputs": [tensor(tca, x)], "request_id": "x2",
               "model_version": "2"}

    answered, errors = {}, []
    async for result, error in client.stream_infer(requests(), stream_timeout=WAIT_S,
                                                   compression_algorithm="deflate"):
        if error is not None:
            errors.append(error.message())
        else:
            response = result.get_response()
            answered[response.id] = diff(result.as_numpy("OUTPUT__0"),
                                         mesh.forward("mlp", response.model_version, x))
        if len(answered) + len(errors) == 3:
            break
    report["stream"] = {"answered": answered, "errors": errors}
    await client.close()
    return report


def http_sync(mesh: Mesh) -> dict:
    client = mesh.http_client()
    x = rows(4)
    report = {"extensions": client.get_server_metadata()["extensions"],
              "model_ready": [client.is_model_ready("mlp"), client.is_model_ready("mlp", "1"),
                              client.is_model_ready("mlp", "9"), client.is_model_ready("nope")],
              "unserved": unserved_http(client)}
    report["infer"] = {}
    for binary_in in (True, False):
        for binary_out in (True, False):
            for request_coding, response_coding in (
                    (None, None), ("gzip", "gzip"), ("deflate", "deflate"), (None, "gzip")):
                key = f"in={binary_in} out={binary_out} {request_coding}/{response_coding}"
                result = client.infer(
                    "mlp", [tensor(th, x, binary_data=binary_in)], model_version="1",
                    request_id="h-1", parameters={"custom": "value"}, priority=1,
                    timeout=30_000_000,
                    outputs=[th.InferRequestedOutput("OUTPUT__0", binary_data=binary_out)],
                    request_compression_algorithm=request_coding,
                    response_compression_algorithm=response_coding)
                response = result.get_response()
                report["infer"][key] = [response.get("id"), response["model_version"],
                                        diff(result.as_numpy("OUTPUT__0"),
                                             mesh.forward("mlp", "1", x))]
    report["unknown_output"] = refusal(lambda: client.infer(
        "mlp", [tensor(th, x)], outputs=[th.InferRequestedOutput("NOPE")]))
    report["output_shared_memory"] = refusal(lambda: client.infer(
        "mlp", [tensor(th, x)], outputs=[shared_memory_output()]))
    report["classes"] = classes(
        client.infer("mlp", [tensor(th, x)], model_version="1",
                     outputs=[th.InferRequestedOutput("OUTPUT__0", class_count=3)])
        .as_numpy("OUTPUT__0"), mesh.forward("mlp", "1", x))
    report["uint8"] = {binary: uint8_checks(mesh, client, th, binary_data=binary)
                       for binary in (True, False)}
    before = counts(client.get_inference_statistics("mlp", "2")["model_stats"][0])
    pending = [client.async_infer("mlp", [tensor(th, x)], model_version="2",
                                  request_id=f"h{i}") for i in range(4)]
    report["async_ids"] = sorted(p.get_result(timeout=WAIT_S).get_response()["id"]
                                 for p in pending)
    after = counts(client.get_inference_statistics("mlp", "2")["model_stats"][0])
    report["stats"] = [a - b for a, b in zip(after, before)]
    token = mesh.http_client(certificate=False)
    bearer = {"Authorization": f"Bearer {mesh.token}"}
    result = token.infer("mlp", [tensor(th, x)], model_version="2", headers=dict(bearer))
    report["token"] = {"diff": diff(result.as_numpy("OUTPUT__0"), mesh.forward("mlp", "2", x)),
                       "cnn": refusal(lambda: token.get_model_metadata("cnn", headers=bearer)),
                       "none": refusal(lambda: token.get_model_metadata("mlp"))}
    report["log_settings"] = log_settings(mesh, client, th, bearer, token)
    report["trace_settings"] = trace_settings(client, th)
    token.close()
    client.close()
    return report


def shared_memory_output():
    output = th.InferRequestedOutput("OUTPUT__0")
    output.set_shared_memory("out", 120)
    return output


def raw_http(mesh: Mesh) -> dict:
    """What tritonclient.http does not show: readiness statuses and their bodies, and the
    coding of a compressed answer."""
    report = {}
    for path in ("/v2/models/mlp/ready", "/v2/models/mlp/versions/1/ready",
                 "/v2/models/nope/ready", "/v2/models/mlp/versions/9/ready"):
        status, _, body = mesh.raw_http("GET", path)
        report[path] = [status, json.loads(body) if body else None]
    document = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 256],
                                       "datatype": "FP32", "data": [0.5] * 256}]}).encode()
    status, headers, body = mesh.raw_http("POST", "/v2/models/mlp/versions/1/infer", document,
                                          {"Accept-Encoding": "gzip"})
    coding = headers.get("content-encoding")
    document = json.loads(gzip.decompress(body) if coding == "gzip" else body)
    report["gzip"] = {"status": status, "coding": coding,
                      "outputs": [output["name"] for output in document["outputs"]]}
    return report


async def http_aio(mesh: Mesh) -> dict:
    client = tha.InferenceServerClient(mesh.http, ssl=True, ssl_context=mesh.ssl_context())
    x = rows(5)
    report = {"extensions": (await client.get_server_metadata())["extensions"],
              "model_ready": [await client.is_model_ready("mlp", "2"),
                              await client.is_model_ready("nope")],
              "load_model": await async_refusal(lambda: client.load_model("mlp")),
              "log_settings": await client.get_log_settings()}
    report["infer"] = {}
    for binary in (True, False):
        for coding in (None, "gzip", "deflate"):
            result = await client.infer(
                "mlp", [tensor(tha, x, binary_data=binary)], model_version="2",
                request_id="ha-1",
                outputs=[tha.InferRequestedOutput("OUTPUT__0", binary_data=binary)],
                request_compression_algorithm=coding, response_compression_algorithm=coding)
            report["infer"][f"{binary} {coding}"] = [
                result.get_response().get("id"),
                diff(result.as_numpy("OUTPUT__0"), mesh.forward("mlp", "2", x))]
    await client.close()
    return report


def main() -> None:
    mesh = Mesh(Path(sys.argv[1]), sys.argv[2])
    report = {"grpc": grpc_sync(mesh), "grpc_aio": asyncio.run(grpc_aio(mesh)),
              "http": http_sync(mesh), "raw_http": raw_http(mesh),
              "http_aio": asyncio.run(http_aio(mesh))}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
