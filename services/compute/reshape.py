"""Triton's `reshape` of a model input or output: the client sends and receives the tensor
as the configuration's `dims`, the model takes or makes it as `reshape.shape`, the same
elements in the same order (a batching model's batch dimension stays in front). The common
use: `dims: [ 1 ]` with `reshape: { shape: [ ] }` hands a batching model one scalar a row.

Only the shapes change, in the request before the model runs and in its response after, so
every backend gets it alike; an output whose dims differ from request to request (a Python
model's, `batch_requests.SHAPES`) has each request's shape changed.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

from meshserve.common import batch_requests
from meshserve.common.errors import Internal, InvalidArgument, ServingError
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from meshserve.protocol.model_config_pb2 import ModelConfig


def reshaping(model, config: ModelConfig):
    """`model` (any backend), behind the configuration's reshapes when it has any."""
    if any(t.HasField("reshape") for t in (*config.input, *config.output)):
        return Reshaped(model, config)
    return model


class Reshaped:
    """A loaded model whose configuration reshapes some of its tensors."""

    def __init__(self, model, config: ModelConfig) -> None:
        self._model = model
        self.device = model.device
        self.waits = model.waits  # where compute runs its batches: as the model's own
        self._batched = config.max_batch_size > 0
        self._inputs = {t.name: list(t.reshape.shape) for t in config.input
                        if t.HasField("reshape")}
        self._outputs = {t.name: list(t.dims) for t in config.output if t.HasField("reshape")}

    def run(self, request: ModelInferRequest, version: str,
            cancelled: threading.Event | None = None) -> tuple[ModelInferResponse, object]:
        for tensor in request.inputs:
            target = self._inputs.get(tensor.name)
            if target is not None:
                tensor.shape[:] = resized(tensor.shape, target, self._batched,
                                          f"input '{tensor.name}'", InvalidArgument)
        response, timings = self._model.run(request, version, cancelled)
        shapes = batch_requests.read_shapes(response)
        for tensor in response.outputs:
            target = self._outputs.get(tensor.name)
            if target is None:
                continue
            what = f"output '{tensor.name}'"
            if tensor.name in shapes:  # each request's own shape
                shapes[tensor.name] = [resized(shape, target, True, what, Internal)
                                       for shape in shapes[tensor.name]]
            else:
                tensor.shape[:] = resized(tensor.shape, target, self._batched, what, Internal)
        batch_requests.write_shapes(response, shapes)
        return response, timings

    def warmup_requests(self, warmup_dir: Path | None = None) -> list[ModelInferRequest]:
        return self._model.warmup_requests(warmup_dir)


def resized(shape, target: list[int], batched: bool, what: str,
            error: type[ServingError]) -> list[int]:
    """`shape` as `target` (one -1 there takes what is left), its batch dimension kept."""
    shape = list(shape)
    lead = shape[:1] if batched else []
    elements = math.prod(shape[len(lead):])
    known = math.prod(d for d in target if d != -1)
    new = list(target)
    if -1 in new and known and elements % known == 0:
        new[new.index(-1)] = elements // known
    if -1 in new or math.prod(new) != elements:
        raise error(f"{what} of shape {shape} cannot be reshaped to {target}"
                    f"{' after its batch dimension' if batched else ''}")
    return lead + new
