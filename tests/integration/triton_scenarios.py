"""Drives a running meshserve with the stock tritonclient and reports what it saw, as JSON.

Runs in a process of its own: tritonclient's protobuf definitions of the `inference` package
cannot share a process with meshserve's. Usage: triton_scenarios.py ENDPOINT DATA_DIR
"""

import asyncio
import json
import queue
import sys
import warnings
from pathlib import Path

import numpy
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca

warnings.filterwarnings("ignore")
SHAPES = {"mlp": (256,), "cnn": (3, 64, 64)}


def tls_args(tls: Path) -> dict:
    return {"ssl": True, "root_certificates": str(tls / "ca.crt"),
            "private_key": str(tls / "client.key"), "certificate_chain": str(tls / "client.crt")}


def local_forward(models: Path, name: str, version: str, x: numpy.ndarray) -> numpy.ndarray:
    module = torch.jit.load(str(models / name / version / "model.pt")).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def sync_checks(endpoint: str, data_dir: Path) -> dict:
    client = tc.InferenceServerClient(endpoint, **tls_args(data_dir / "tls"))
    report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
              "unknown_ready": [client.is_model_ready("nope"), client.is_model_ready("mlp", "9")],
              "metadata": {}, "config": {}, "diffs": {}, "served_version": {}}
    for name in SHAPES:
        meta = client.get_model_metadata(name)
        report["metadata"][name] = {
            "versions": list(meta.versions), "platform": meta.platform,
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs]}
        config = client.get_model_config(name).config
        report["config"][name] = {"name": config.name, "max_batch_size": config.max_batch_size,
                                  "inputs": [t.name for t in config.input],
                                  "dims": [list(t.dims) for t in config.input],
                                  "has_dynamic_batching": config.HasField("dynamic_batching")}
        for version in ("1", "2"):
            x = numpy.random.default_rng(7).standard_normal((2, *SHAPES[name]), numpy.float32)
            tensor = tc.InferInput("INPUT__0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(name, [tensor], model_version=version)
            got = result.as_numpy("OUTPUT__0")
            expected = local_forward(data_dir / "models", name, version, x)
            report["diffs"][f"{name}@{version}"] = float(numpy.abs(got - expected).max())
            report["served_version"][f"{name}@{version}"] = \
                result.get_response().model_version
    x = numpy.random.default_rng(5).standard_normal((3, 256), numpy.float32)
    tensor = tc.InferInput("INPUT__0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    wanted = tc.InferRequestedOutput("OUTPUT__0", class_count=3)
    got = client.infer("mlp", [tensor], model_version="1", outputs=[wanted])
    report["classes"] = classes(got.as_numpy("OUTPUT__0"),
                                local_forward(data_dir / "models", "mlp", "1", x))
    index = client.get_model_repository_index()
    report["index"] = sorted([m.name, m.version, m.state] for m in index.models)
    return report


def classes(got: numpy.ndarray, expected: numpy.ndarray) -> dict:
    """A classification answer (`value:index` strings) against the rows of a local forward
    pass: its shape, its indexes and the top indexes of each row, and how far the values it
    printed are from the row's."""
    pairs = [[element.decode().split(":") for element in row] for row in got]
    return {"shape": list(got.shape),
            "indexes": [[int(index) for _, index in row] for row in pairs],
            "expected": [numpy.argsort(-row, kind="stable")[:got.shape[1]].tolist()
                         for row in expected],
            "value_diff": max(abs(float(value) - float(row[int(index)]))
                              for pair, row in zip(pairs, expected) for value, index in pair)}


def statistics(client: tc.InferenceServerClient, name: str, version: str) -> dict:
    stats = client.get_inference_statistics(name, version).model_stats[0]
    return {"inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "success": stats.inference_stats.success.count}


def stream_checks(endpoint: str, data_dir: Path) -> dict:
    """Three requests on one stream, read as a client of decoupled models reads: answers
    until one says it is final (`enable_empty_final_response`)."""
    client = tc.InferenceServerClient(endpoint, **tls_args(data_dir / "tls"))
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = numpy.random.default_rng(13).standard_normal((1, 256), numpy.float32)
    tensor = tc.InferInput("INPUT__0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for i in range(3):
        client.async_stream_infer("mlp", [tensor], model_version="1", request_id=f"s{i}",
                                  enable_empty_final_response=True)
    final, diffs = {}, []
    expected = local_forward(data_dir / "models", "mlp", "1", x)
    while len(final) < 3:
        result, error = answers.get(timeout=30)
        assert error is None, error
        flag = result.get_response().parameters.get("triton_final_response")
        final[result.get_response().id] = flag is not None and flag.bool_param
        diffs.append(float(numpy.abs(result.as_numpy("OUTPUT__0") - expected).max()))
    client.stop_stream()
    return {"final": final, "max_diff": max(diffs), "more": answers.qsize()}


async def concurrent_checks(endpoint: str, data_dir: Path, count: int) -> dict:
    client = tca.InferenceServerClient(endpoint, **tls_args(data_dir / "tls"))
    inputs = numpy.random.default_rng(11).standard_normal((count, 1, 256), numpy.float32)

    async def one(x):
        tensor = tca.InferInput("INPUT__0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], model_version="1")
        return result.as_numpy("OUTPUT__0")

    outputs = await asyncio.gather(*(one(x) for x in inputs))
    await client.close()
    expected = local_forward(data_dir / "models", "mlp", "1", inputs.reshape(count, 256))
    diffs = [float(numpy.abs(o[0] - e).max()) for o, e in zip(outputs, expected)]
    return {"answered": len(outputs), "max_diff": max(diffs),
            "correct": sum(d <= 1e-5 for d in diffs)}


def main() -> None:
    endpoint, data_dir = sys.argv[1], Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    report = sync_checks(endpoint, data_dir)
    report["stream"] = stream_checks(endpoint, data_dir)
    client = tc.InferenceServerClient(endpoint, **tls_args(data_dir / "tls"))
    report["stats_before"] = statistics(client, "mlp", "1")
    report["concurrent"] = asyncio.run(concurrent_checks(endpoint, data_dir, count))
    report["stats_after"] = statistics(client, "mlp", "1")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
