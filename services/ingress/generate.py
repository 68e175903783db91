"""Triton's generate extension: a model called with one flat JSON object and answered with
another, for text models (LLMs) above all (`POST v2/models/M[/versions/V]/generate`, and
`generate_stream`, whose answers are Server-Sent Events). Pure.

The request object: `id` (the request's id), `parameters` (an object: the request's
parameters) and any other field: the model input of that name, else a request parameter.
An input's value is a string, number or boolean (one element) or a list of them; its shape
is the model's (its metadata shape, the batch dimension first for a batching model) with
the elements spread as Triton spreads them: each fixed dimension takes its size, the
innermost variable one what is left, any other variable one 1.

The answer object: `id` (when the request had one), `model_name`, `model_version`, each of
the response's parameters, and each output by name: its element when it has one (a string
for BYTES), else the list of its elements.
"""

from __future__ import annotations

from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import InvalidArgument
from meshserve.common.stream_answers import FINAL_RESPONSE
from meshserve.ingress.http_codec import (
    json_to_raw,
    parameters_json,
    raw_to_json,
    set_parameters,
)
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.model_config_pb2 import ModelConfig

# The fields of a generate request that are neither inputs nor parameters.
ID, PARAMETERS = "id", "parameters"


def generate_request(document: object, config: ModelConfig, version: str) -> pb.ModelInferRequest:
    """The ModelInferRequest a generate request object stands for (InvalidArgument naming
    the field when it cannot)."""
    if not isinstance(document, dict):
        raise InvalidArgument("a generate request is a JSON object")
    request = pb.ModelInferRequest(model_name=config.name, model_version=version)
    request_id = document.get(ID, "")
    if not isinstance(request_id, str):
        raise InvalidArgument("generate request field 'id' must be a string")
    request.id = request_id
    parameters = document.get(PARAMETERS, {})
    if not isinstance(parameters, dict):
        raise InvalidArgument("generate request field 'parameters' must be an object")
    set_parameters(request.parameters, parameters, "parameter")
    inputs = {t.name: t for t in config.input}
    for name, value in document.items():
        if name in (ID, PARAMETERS):
            continue
        tensor = inputs.get(name)
        if tensor is None:
            set_parameters(request.parameters, {name: value}, "parameter")
            continue
        values = value if isinstance(value, list) else [value]
        shape = spread(len(values), [-1, *tensor.dims] if config.max_batch_size else
                       list(tensor.dims), name)
        datatype = WIRE_FROM_CONFIG[tensor.data_type]
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(json_to_raw(values, datatype, shape,
                                                      f"input '{name}'"))
    return request


def spread(count: int, dims: list[int], name: str) -> list[int]:
    """The shape of `count` elements over `dims` (-1: variable), as Triton spreads them."""
    left = count
    for size in dims:
        if size != -1:
            if size == 0 or left % size:
                raise InvalidArgument(f"input '{name}' holds {count} elements, which its shape "
                                      f"{dims} cannot take")
            left //= size
    shape = list(dims)
    for index in reversed(range(len(shape))):
        if shape[index] == -1:
            shape[index], left = left, 1
    if left != 1:
        raise InvalidArgument(f"input '{name}' holds {count} elements, which its shape {dims} "
                              "cannot take")
    return shape


def generate_answer(response: pb.ModelInferResponse) -> dict:
    """The generate answer object of a response."""
    document: dict = {"id": response.id} if response.id else {}
    document["model_name"] = response.model_name
    document["model_version"] = response.model_version
    parameters = parameters_json(response.parameters)
    parameters.pop(FINAL_RESPONSE, None)
    document.update(parameters)
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        values = raw_to_json(raw, output.datatype, f"output '{output.name}'")
        document[output.name] = values[0] if len(values) == 1 else values
    return document
