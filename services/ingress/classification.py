"""The classification extension of Triton's protocol: an output requested with the parameter
`classification` (a count of classes, as tritonclient's `InferRequestedOutput(name,
class_count=N)` and `{"parameters": {"classification": N}}` over HTTP send it) comes back as
its N highest-valued elements instead of its values.

The answer is a BYTES tensor of shape [batch, N] for a batched model ([N] otherwise; N at
most the elements of a row), each element `<value>:<index>` or, when the output has a
`label_filename`, `<value>:<index>:<label>`: the value printed as C's `%f` (integers as
themselves), the index of the element in the row, the label that line of the file. Equal
values keep their order. Only numeric outputs can be classified.
"""

from __future__ import annotations

import heapq

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import WIRE_FROM_CONFIG, serialize_bytes
from meshserve.common.errors import InvalidArgument
from meshserve.common.repository import ModelEntry
from meshserve.common.validation import integer_parameter
from meshserve.protocol import grpc_service_pb2 as pb

PARAMETER = "classification"
# The numeric datatypes (Triton's, and FP16); a BOOL, BYTES or BF16 output is refused.
CLASSIFIABLE = frozenset(NUMPY_DTYPE) - {"BOOL"}


def requested(request: pb.ModelInferRequest, entry: ModelEntry) -> dict[str, int]:
    """The outputs the request asks for as classes, with their counts (empty: none); raise
    InvalidArgument naming the output when the count or the output's datatype is wrong."""
    counts: dict[str, int] = {}
    for output in request.outputs:
        if PARAMETER not in output.parameters:
            continue
        count = integer_parameter(output.parameters[PARAMETER])
        if count is None or count < 1:
            raise InvalidArgument(f"output '{output.name}' parameter '{PARAMETER}' must be a "
                                  f"positive integer, the number of classes to return")
        datatype = next((WIRE_FROM_CONFIG[known.data_type] for known in entry.config.output
                         if known.name == output.name), None)
        if datatype is None:  # validation names the unknown output
            continue
        if datatype not in CLASSIFIABLE:
            raise InvalidArgument(f"output '{output.name}' is {datatype}; '{PARAMETER}' "
                                  f"needs a numeric output")
        counts[output.name] = count
    return counts


def classify(response: pb.ModelInferResponse, counts: dict[str, int], entry: ModelEntry) -> None:
    """Replace each output named in `counts` by its top classes, in place."""
    batched = entry.config.max_batch_size > 0
    for index, tensor in enumerate(response.outputs):
        count = counts.get(tensor.name)
        if count is None:
            continue
        if tensor.datatype not in CLASSIFIABLE:
            raise InvalidArgument(f"output '{tensor.name}' came back as {tensor.datatype}; "
                                  f"'{PARAMETER}' needs a numeric output")
        shape = list(tensor.shape)
        values = numpy.frombuffer(response.raw_output_contents[index],
                                  NUMPY_DTYPE[tensor.datatype])
        rows = shape[0] if batched and shape else 1
        table = values.reshape(rows, -1).tolist() if rows else []
        labels = entry.labels.get(tensor.name, ())
        floating = tensor.datatype.startswith("FP")
        elements = []
        for row in table:
            for position in heapq.nlargest(count, range(len(row)), key=row.__getitem__):
                elements.append(_element(row[position], position, labels, floating))
        width = min(count, len(table[0])) if table else 0
        tensor.datatype = "BYTES"
        tensor.shape[:] = [rows, width] if batched else [width]
        response.raw_output_contents[index] = serialize_bytes(elements)


def _element(value: float | int, position: int, labels: tuple[str, ...],
             floating: bool) -> str:
    text = f"{value:f}:{position}" if floating else f"{value}:{position}"
    label = labels[position] if position < len(labels) else ""
    return f"{text}:{label}" if label else text
