"""The demo repository's models beyond TorchScript: one per backend, and an ensemble.

- `mlp_onnx`: the demo `mlp` (version 1's weights) as an ONNX graph, run by ONNX Runtime;
  its config.pbtxt declares no inputs or outputs: they are read from the graph.
- `preprocess`: a Triton-style Python model: a batch of uint8 HWC images to the normalised
  float CHW tensors `cnn` takes.
- `postprocess`: a Triton-style Python model: `cnn`'s logits to the top-3 labels (BYTES) and
  their softmax scores.
- `classify`: an ensemble: preprocess -> cnn (the version its traffic policy picks) ->
  postprocess. A uint8 image in, labels out.
"""

from __future__ import annotations

from pathlib import Path

from meshserve.tools.demo_models import (
    MAX_BATCH_SIZE,
    build_model,
    write_if_missing,
    write_text_if_changed,
)

IMAGE_SIZE = 64
_IMAGE = f"[ {IMAGE_SIZE}, {IMAGE_SIZE}, 3 ]"
_PIXELS = f"[ 3, {IMAGE_SIZE}, {IMAGE_SIZE} ]"
TOP_K = 3
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
          "truck")

_BATCHING = ("dynamic_batching {\n  priority_levels: 2\n  default_priority_level: 2\n"
             "  default_queue_policy { max_queue_size: 256 }\n}\n")

MLP_ONNX_CONFIG = (
    'name: "mlp_onnx"\n'
    'platform: "onnxruntime_onnx"\n'
    f"max_batch_size: {MAX_BATCH_SIZE}\n"
    "# No input or output: read from model.onnx's graph (see ModelConfig).\n"
    + _BATCHING)

PREPROCESS_CONFIG = (
    'name: "preprocess"\n'
    'backend: "python"\n'
    f"max_batch_size: {MAX_BATCH_SIZE}\n"
    f'input [ {{ name: "IMAGE" data_type: TYPE_UINT8 dims: {_IMAGE} }} ]\n'
    f'output [ {{ name: "PIXELS" data_type: TYPE_FP32 dims: {_PIXELS} }} ]\n'
    + _BATCHING)

POSTPROCESS_CONFIG = (
    'name: "postprocess"\n'
    'backend: "python"\n'
    f"max_batch_size: {MAX_BATCH_SIZE}\n"
    'input [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
    "output [\n"
    f'  {{ name: "LABELS" data_type: TYPE_STRING dims: [ {TOP_K} ] }},\n'
    f'  {{ name: "SCORES" data_type: TYPE_FP32 dims: [ {TOP_K} ] }}\n'
    "]\n"
    + _BATCHING)

CLASSIFY_CONFIG = (
    'name: "classify"\n'
    'platform: "ensemble"\n'
    f"max_batch_size: {MAX_BATCH_SIZE}\n"
    f'input [ {{ name: "IMAGE" data_type: TYPE_UINT8 dims: {_IMAGE} }} ]\n'
    "output [\n"
    f'  {{ name: "LABELS" data_type: TYPE_STRING dims: [ {TOP_K} ] }},\n'
    f'  {{ name: "SCORES" data_type: TYPE_FP32 dims: [ {TOP_K} ] }}\n'
    "]\n"
    "ensemble_scheduling {\n"
    "  step [\n"
    '    { model_name: "preprocess" model_version: -1\n'
    '      input_map { key: "IMAGE" value: "IMAGE" }\n'
    '      output_map { key: "PIXELS" value: "pixels" } },\n'
    '    { model_name: "cnn" model_version: -1\n'
    '      input_map { key: "INPUT__0" value: "pixels" }\n'
    '      output_map { key: "OUTPUT__0" value: "logits" } },\n'
    '    { model_name: "postprocess" model_version: -1\n'
    '      input_map { key: "LOGITS" value: "logits" }\n'
    '      output_map { key: "LABELS" value: "LABELS" }\n'
    '      output_map { key: "SCORES" value: "SCORES" } }\n'
    "  ]\n"
    "}\n")

PREPROCESS_PY = '''\
"""uint8 HWC images -> float32 CHW in [-1, 1], the input `cnn` takes."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        output = pb_utils.get_output_config_by_name(config, "PIXELS")
        self.dtype = pb_utils.triton_string_to_numpy(output["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            pixels = images.transpose(0, 3, 1, 2).astype(self.dtype) / 127.5 - 1.0
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("PIXELS", pixels.astype(self.dtype))]))
        return responses
'''

POSTPROCESS_PY = f'''\
"""Logits -> the top-{TOP_K} labels (BYTES) and their softmax scores."""

import numpy as np
import triton_python_backend_utils as pb_utils

LABELS = np.array({list(LABELS)!r}, dtype=object)
TOP_K = {TOP_K}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy()
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores = exp / exp.sum(axis=1, keepdims=True)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
            labels = np.vectorize(lambda i: LABELS[i].encode(), otypes=[object])(top)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("LABELS", labels),
                pb_utils.Tensor("SCORES", np.take_along_axis(scores, top, axis=1))]))
        return responses
'''


def mlp_onnx_bytes() -> bytes:
    """The demo `mlp` version 1 as an ONNX graph (Gemm, Relu), same weights."""
    from onnx import TensorProto, helper, numpy_helper

    module = build_model("mlp", 1)
    linears = [layer for layer in module if hasattr(layer, "weight")]
    nodes, initializers, previous = [], [], "INPUT__0"
    for i, layer in enumerate(linears):
        weight = numpy_helper.from_array(layer.weight.detach().numpy(), f"w{i}")
        bias = numpy_helper.from_array(layer.bias.detach().numpy(), f"b{i}")
        initializers += [weight, bias]
        last = i == len(linears) - 1
        out = "OUTPUT__0" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"],
                                      [out if last else f"g{i}"], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("INPUT__0", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("OUTPUT__0", TensorProto.FLOAT, ["batch", 10])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="meshserve demo")
    model.ir_version = 9
    return model.SerializeToString()


def write_pipeline_models(path: Path) -> None:
    """Write the ONNX, Python and ensemble demo models into the repository at `path`,
    leaving pieces already present and complete unchanged."""
    write_text_if_changed(path / "mlp_onnx" / "config.pbtxt", MLP_ONNX_CONFIG)
    write_if_missing(path / "mlp_onnx" / "1" / "model.onnx", mlp_onnx_bytes)
    for name, config, source in (("preprocess", PREPROCESS_CONFIG, PREPROCESS_PY),
                                 ("postprocess", POSTPROCESS_CONFIG, POSTPROCESS_PY)):
        write_text_if_changed(path / name / "config.pbtxt", config)
        write_text_if_changed(path / name / "1" / "model.py", source)
    write_text_if_changed(path / "classify" / "config.pbtxt", CLASSIFY_CONFIG)
    (path / "classify" / "1").mkdir(parents=True, exist_ok=True)

