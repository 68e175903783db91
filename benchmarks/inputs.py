"""Realistic inputs for the micro-benchmarks: the demo models' configs, requests, answers.

The demo client's traffic: FP32 [1, 256] for `mlp`, FP32 [1, 3, 64, 64] for `cnn`,
seeded random data, one requested output.
"""

from __future__ import annotations

import numpy

from meshserve.common.repository import parse_config
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig
from meshserve.tools.demo_models import demo_config

OUTPUT = "OUTPUT__0"
INPUT_DIMS = {"mlp": [256], "cnn": [3, 64, 64]}
OUTPUT_DIMS = {"mlp": [10], "cnn": [10]}


def demo_model_config(name: str) -> ModelConfig:
    """The demo model's config as the repository loader parses it."""
    return parse_config(demo_config(name), f"{name}/config.pbtxt", name)


def floats(shape: list[int], seed: int) -> numpy.ndarray:
    return numpy.random.default_rng(seed).standard_normal(shape, dtype=numpy.float32)


def infer_request(name: str, rows: int = 1, seed: int = 0, *,
                  typed: bool = False) -> ModelInferRequest:
    """A client's request for demo model `name`: FP32 [rows, *dims], asking for OUTPUT__0.

    Payload in `raw_input_contents`, or with `typed` in `contents.fp32_contents` (what a
    client that sends no raw bytes does; validation turns it into raw bytes).
    """
    shape = [rows, *INPUT_DIMS[name]]
    data = floats(shape, seed)
    request = ModelInferRequest(model_name=name, id=f"{name}-{seed}")
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32", shape=shape)
    if typed:
        tensor.contents.fp32_contents.extend(data.ravel().tolist())
    else:
        request.raw_input_contents.append(data.tobytes())
    request.outputs.add(name=OUTPUT)
    return request


def batch_response(name: str, rows: int, version: str = "1") -> ModelInferResponse:
    """What compute answers for a merged batch of `rows` rows of demo model `name`."""
    shape = [rows, *OUTPUT_DIMS[name]]
    response = ModelInferResponse(model_name=name, model_version=version)
    response.outputs.add(name=OUTPUT, datatype="FP32", shape=shape)
    response.raw_output_contents.append(floats(shape, 99).tobytes())
    return response
