"""A Triton-style Python model whose answers differ in shape from request to request, as an
object detector's boxes or a tokenizer's sequences do, written against the documented
`triton_python_backend_utils` API exactly as a model for Triton would be."""

import numpy

from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

# Each request's rows say how many boxes to find (COUNT, INT32 [1]; the request's largest):
# BOXES (FP32 [-1, 4]) and LABELS (BYTES [-1]) hold that many per row, and each row of CALL
# (BYTES [1]) is the JSON list of the request ids execute was called with.
BOXES_PY = '''\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        ids = json.dumps([request.request_id() for request in requests]).encode()
        responses = []
        for request in requests:
            count = pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()
            rows, found = len(count), int(count.max())
            boxes = (np.arange(rows * found * 4, dtype=np.float32).reshape(rows, found, 4)
                     + 100 * count.reshape(rows, 1, 1))
            labels = np.array([[f"box {row}.{i} of {found}".encode() for i in range(found)]
                               for row in range(rows)], dtype=np.object_).reshape(rows, found)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("BOXES", boxes), pb_utils.Tensor("LABELS", labels),
                pb_utils.Tensor("CALL", np.array([[ids]] * rows, dtype=np.object_))]))
        return responses
'''

BOXES_CONFIG = '''\
backend: "python"
max_batch_size: 8
input [ {{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "BOXES" data_type: TYPE_FP32 {boxes} }},
         {{ name: "LABELS" data_type: TYPE_STRING dims: [ -1 ] }},
         {{ name: "CALL" data_type: TYPE_STRING dims: [ 1 ] }} ]
{rest}
'''


def boxes_config(boxes: str = "dims: [ -1, 4 ]", rest: str = "") -> str:
    """The config of BOXES_PY: BOXES as `boxes` says (its dims, a reshape), then `rest`."""
    return BOXES_CONFIG.format(boxes=boxes, rest=rest)


def count_request(rid: str, *counts: int, outputs=(), model: str = "boxes"
                  ) -> ModelInferRequest:
    """A request of BOXES_PY, one row per count, asking for `outputs` (none: all)."""
    count = numpy.array([[c] for c in counts], numpy.int32)
    request = ModelInferRequest(model_name=model, id=rid)
    request.inputs.add(name="COUNT", datatype="INT32", shape=count.shape)
    request.raw_input_contents.append(count.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request
