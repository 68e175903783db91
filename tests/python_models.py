"""Triton-style Python models for tests, written against the documented
`triton_python_backend_utils` API exactly as a model for Triton would be."""

from pathlib import Path

import numpy

from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

# Adds A and B (FP32 [4]) into SUM, whose dtype it reads from its config; greets each NAME
# (BYTES [1]) into GREETING. A negative A is answered with a TritonError for that request;
# an A above 1000 makes execute raise. finalize() appends to the file named by the config
# parameter "finalize_marker", when there is one.
ADD_SUB_PY = '''\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        output = pb_utils.get_output_config_by_name(self.model_config, "SUM")
        self.sum_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        self.marker = self.model_config["parameters"].get("finalize_marker", {}).get(
            "string_value")
        self.version = args["model_version"]

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
            if (a > 1000).any():
                raise ValueError("A is too large")
            if (a < 0).any():
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(
                        "A must not be negative", pb_utils.TritonError.INVALID_ARG)))
                continue
            names = pb_utils.get_input_tensor_by_name(request, "NAME").as_numpy()
            greeting = np.array([[b"hello " + name for name in row] for row in names],
                                dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SUM", (a + b).astype(self.sum_dtype)),
                pb_utils.Tensor("GREETING", greeting)]))
        return responses

    def finalize(self):
        if self.marker:
            with open(self.marker, "a") as marker:
                marker.write("finalized\\n")
'''

ADD_SUB_CONFIG = '''\
backend: "python"
max_batch_size: 16
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "NAME" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "GREETING" data_type: TYPE_STRING dims: [ 1 ] }
]
dynamic_batching { }
'''

# An ensemble of one step: add_sub version 1.
GREET = """
platform: "ensemble"
max_batch_size: 16
input [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "B" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "NAME" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "GREETING" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling { step [ { model_name: "add_sub" model_version: 1
  input_map { key: "A" value: "A" } input_map { key: "B" value: "B" }
  input_map { key: "NAME" value: "NAME" }
  output_map { key: "SUM" value: "SUM" } output_map { key: "GREETING" value: "GREETING" } } ] }
"""

# Answers each request on its own, as a model for Triton's dynamic batcher does: Y is X
# doubled, and each row of ECHO (BYTES [1]) a JSON document of what execute saw of the
# request: its id, parameters and requested outputs, its rows, the number of requests in the
# call and the call's number. A request with the parameter "fail" is answered with a
# TritonError naming its id: of the code "fail" names ("UNAVAILABLE"), else INVALID_ARG.
ECHO_PY = '''\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.calls = 0

    def execute(self, requests):
        self.calls += 1
        responses = []
        for request in requests:
            parameters = json.loads(request.parameters())
            fail = parameters.get("fail")
            if fail:
                code = getattr(pb_utils.TritonError, fail, None) if isinstance(fail, str) else None
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request {request.request_id()} asked to fail",
                    pb_utils.TritonError.INVALID_ARG if code is None else code)))
                continue
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            echo = json.dumps({
                "id": request.request_id(), "parameters": parameters,
                "requested": request.requested_output_names(), "rows": len(x),
                "timeout": request.timeout(), "requests": len(requests), "call": self.calls})
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("Y", x * 2),
                pb_utils.Tensor("ECHO", np.array([[echo.encode()]] * len(x), dtype=np.object_))]))
        return responses
'''

# Batches of up to 4 rows, each waiting up to 20 s for more (a loaded machine may hold one
# request back for seconds): requests sent together share one.
ECHO_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "ECHO" data_type: TYPE_STRING dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000000 }
'''

# A decoupled model of ECHO_CONFIG's X and Y (batches of up to 4 rows).
DECOUPLED_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
model_transaction_policy { decoupled: true }
'''

RAISES_IN_INITIALIZE_PY = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        raise pb_utils.TritonModelException("the weights file weights.bin is missing")

    def execute(self, requests):
        return []
'''


def write_python_model(repository: Path, name: str, source: str, config: str,
                       extra_config: str = "") -> Path:
    """`repository/name/config.pbtxt` and `repository/name/1/model.py`."""
    model = repository / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(config + extra_config)
    (model / "1" / "model.py").write_text(source)
    return model


def echo_request(rid: str, x, outputs=(), **parameters) -> ModelInferRequest:
    """A request of the echo model (ECHO_PY): input X is `x`, id `rid`, asking for `outputs`
    (none: all), with `parameters` (bool, int, str or float each)."""
    x = numpy.asarray(x, numpy.float32)
    request = ModelInferRequest(model_name="echo", id=rid)
    request.inputs.add(name="X", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param",
                float: "double_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    return request
