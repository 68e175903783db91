"""Drives `meshserve up --model-repository` with the stock tritonclient: what it sees of the
TorchScript, ONNX, Python and ensemble models (index, metadata, config, an answer), as JSON.

Runs in a process of its own: tritonclient's protobuf definitions of the `inference` package
cannot share a process with meshserve's. Usage: backend_scenarios.py ENDPOINT DATA_DIR
"""

import json
import sys
import warnings
from pathlib import Path

import numpy
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

warnings.filterwarnings("ignore")
MODELS = ("mlp_onnx", "add_sub", "classify", "preprocess", "postprocess", "square_onnx")


def main(endpoint: str, data_dir: Path) -> dict:
    tls = data_dir / "tls"
    client = tc.InferenceServerClient(
        endpoint, ssl=True, root_certificates=str(tls / "ca.crt"),
        private_key=str(tls / "client.key"), certificate_chain=str(tls / "client.crt"))
    report = {"index": sorted([m.name, m.version, m.state, m.reason]
                              for m in client.get_model_repository_index().models),
              "metadata": {}, "config": {}}
    for name in MODELS:
        meta = client.get_model_metadata(name)
        report["metadata"][name] = {
            "platform": meta.platform, "versions": list(meta.versions),
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs]}
        config = client.get_model_config(name, as_json=True)["config"]
        report["config"][name] = config
    image = numpy.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=numpy.uint8)
    tensor = tc.InferInput("IMAGE", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    result = client.infer("classify", [tensor])
    report["classify"] = {"labels": result.as_numpy("LABELS").astype(str).tolist(),
                          "scores_shape": list(result.as_numpy("SCORES").shape),
                          "version": result.get_response().model_version}
    report["square_onnx"] = [square(client, rows) for rows in ([[1.5], [-2.0]], [[3.0]],
                                                               [[0.5], [4.0], [-1.0]])]
    report["words"] = words(client)
    return report


def words(client) -> dict:
    """The TorchScript `words` model's answer to words and a scale, each output's values
    (strings as latin-1, which JSON carries byte for byte)."""
    text = tc.InferInput("words", [3], "BYTES")
    text.set_data_from_numpy(numpy.array([b"tensor", "ünï".encode(), b""], dtype=object))
    scale = tc.InferInput("scale", [1], "FP32")
    scale.set_data_from_numpy(numpy.array([0.5], numpy.float32))
    result = client.infer("words", [scale, text])
    return {name: [v.decode("latin-1") if isinstance(v, bytes) else v
                   for v in result.as_numpy(name).tolist()]
            for name in ("OUTPUT__0", "OUTPUT__1", "OUTPUT__2")}


def square(client, rows: list[list[float]]) -> list | str:
    """One request, as a Triton client sends it to the completed config (dims [ 1 ]):
    the answer's shape and values, or the error's message."""
    tensor = tc.InferInput("X", [len(rows), 1], "FP32")
    tensor.set_data_from_numpy(numpy.array(rows, numpy.float32))
    try:
        y = client.infer("square_onnx", [tensor]).as_numpy("Y")
    except InferenceServerException as error:
        return str(error)
    return [list(y.shape), y.tolist()]


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
