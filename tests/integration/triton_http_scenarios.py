"""Drives a running meshserve's HTTP/REST port with the stock tritonclient.http and reports
what it saw, as JSON. Runs in a process of its own (tritonclient.http brings gevent).

Usage: triton_http_scenarios.py HOST:PORT DATA_DIR [TOKEN]
With TOKEN it authenticates with `Authorization: Bearer TOKEN` and no client certificate;
without, with the development client certificate.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy
import torch
import tritonclient.http as th

warnings.filterwarnings("ignore")
SHAPES = {"mlp": (256,), "cnn": (3, 64, 64)}


def local_forward(models: Path, name: str, version: str, x: numpy.ndarray) -> numpy.ndarray:
    module = torch.jit.load(str(models / name / version / "model.pt")).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def main() -> None:
    endpoint, data_dir = sys.argv[1], Path(sys.argv[2])
    token = sys.argv[3] if len(sys.argv) > 3 else None
    tls = data_dir / "tls"
    options = {"ca_certs": str(tls / "ca.crt")}
    if token is None:
        options |= {"keyfile": str(tls / "client.key"), "certfile": str(tls / "client.crt")}
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = th.InferenceServerClient(endpoint, ssl=True, ssl_options=options)
    models = ["mlp"] if token else list(SHAPES)

    def statistics() -> dict:
        stats = client.get_inference_statistics("mlp", "1", headers=headers)["model_stats"][0]
        return {"inference_count": stats["inference_count"],
                "success": stats["inference_stats"]["success"]["count"]}

    before = statistics()
    report = {"live": client.is_server_live(headers=headers),
              "ready": client.is_server_ready(headers=headers),
              "extensions": client.get_server_metadata(headers=headers)["extensions"],
              "model_ready": client.is_model_ready("mlp", "1", headers=headers),
              "metadata": {}, "config": {}, "diffs": {}, "served_version": {}}
    for name in models:
        report["metadata"][name] = client.get_model_metadata(name, headers=headers)
        config = client.get_model_config(name, headers=headers)
        report["config"][name] = {"max_batch_size": config["max_batch_size"],
                                  "dims": [t["dims"] for t in config["input"]],
                                  "has_dynamic_batching": "dynamic_batching" in config}
        for version in ("1", "2"):
            x = numpy.random.default_rng(7).standard_normal((2, *SHAPES[name]), numpy.float32)
            expected = local_forward(data_dir / "models", name, version, x)
            for binary in (True, False):
                tensor = th.InferInput("INPUT__0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                wanted = th.InferRequestedOutput("OUTPUT__0", binary_data=binary)
                # A copy: tritonclient adds Inference-Header-Content-Length to the dict.
                result = client.infer(name, [tensor], model_version=version,
                                       outputs=[wanted], headers=headers and dict(headers))
                key = f"{name}@{version}/{'binary' if binary else 'json'}"
                got = result.as_numpy("OUTPUT__0")
                report["diffs"][key] = float(numpy.abs(got - expected).max())
                report["served_version"][key] = result.get_response()["model_version"]
    after = statistics()
    report["stats"] = {key: after[key] - before[key] for key in after}
    if token is None:
        report["index"] = sorted([m["name"], m["version"], m["state"]]
                                 for m in client.get_model_repository_index())
    try:
        client.get_model_metadata("cnn", headers=headers)
        report["cnn_metadata"] = "allowed"
    except th.InferenceServerException as error:
        report["cnn_metadata"] = [error.status(), error.message()]
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
