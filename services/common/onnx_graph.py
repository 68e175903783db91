"""An ONNX graph's inputs and outputs, and a model configuration completed or checked
against them (as Triton does without `--strict-model-config`).

`complete_config` fills in the inputs and outputs a config.pbtxt leaves out, from the
graph; when every graph tensor's first dimension is dynamic it also sets Triton's default
`max_batch_size` of 4 (when the config has none) and turns the dynamic batcher on. A graph
scalar is completed as Triton completes it: `dims: [ 1 ]`, with `reshape: { shape: [ ] }`
when the model batches. `check_config` refuses a config whose declared tensors the graph does
not have, or has with another datatype or shape (a tensor's `reshape.shape` when it has one,
as the model sees it). Both are pure; `read_graph` parses the file (with the `onnx` package,
imported when needed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from meshserve.common.datatypes import WIRE_FROM_CONFIG
from meshserve.common.errors import FailedPrecondition
from meshserve.protocol import model_config_pb2 as mc
from meshserve.protocol.model_config_pb2 import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4  # Triton's, for a graph whose tensors all start with a dynamic dim

# onnx.TensorProto.DataType -> model configuration DataType: every datatype the protocol
# carries (STRING is BYTES). ONNX's others (complex, 8-bit floats, ...) have no match.
CONFIG_FROM_ONNX = {
    1: mc.TYPE_FP32, 2: mc.TYPE_UINT8, 3: mc.TYPE_INT8, 4: mc.TYPE_UINT16, 5: mc.TYPE_INT16,
    6: mc.TYPE_INT32, 7: mc.TYPE_INT64, 8: mc.TYPE_STRING, 9: mc.TYPE_BOOL, 10: mc.TYPE_FP16,
    11: mc.TYPE_FP64, 12: mc.TYPE_UINT32, 13: mc.TYPE_UINT64, 16: mc.TYPE_BF16,
}


@dataclass(frozen=True)
class GraphTensor:
    name: str
    data_type: int  # model configuration DataType; TYPE_INVALID when ONNX's has no match
    dims: tuple[int, ...]  # -1 for a dynamic (named or unknown) dimension
    onnx_type: int = 0


@dataclass(frozen=True)
class Graph:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    # graph inputs that are also initializers: the graph holds their value, a request may
    # send another (ONNX Runtime's overridable initializers)
    initializers: tuple[GraphTensor, ...] = ()


def read_graph(data: bytes, source: str) -> Graph:
    """The graph's inputs (initializers apart) and outputs; FailedPrecondition naming
    `source` when `data` is not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise FailedPrecondition(f"{source}: not an ONNX model (cannot parse it: {error})") \
            from None
    graph = model.graph
    if not model.ir_version or not graph.output:
        raise FailedPrecondition(f"{source}: not an ONNX model (no IR version or no graph "
                                 "outputs)")
    initializers = {i.name for i in graph.initializer}
    return Graph(inputs=tuple(_tensor(v) for v in graph.input if v.name not in initializers),
                 outputs=tuple(_tensor(v) for v in graph.output),
                 initializers=tuple(_tensor(v) for v in graph.input if v.name in initializers))


def _tensor(value) -> GraphTensor:
    tensor_type = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                 for d in tensor_type.shape.dim)
    return GraphTensor(value.name, CONFIG_FROM_ONNX.get(tensor_type.elem_type, mc.TYPE_INVALID),
                       dims, tensor_type.elem_type)


def read_file(path: Path, what: str) -> Graph:
    """`read_graph` of a file; FailedPrecondition when it is missing."""
    if not path.is_file():
        encrypted = path.with_name(path.name + ".enc").is_file()
        raise FailedPrecondition(
            f"{what}: {path} is missing" + (
                " (it is encrypted: declare the inputs and outputs in config.pbtxt)"
                if encrypted else "") + "; its inputs and outputs are read from it")
    return read_graph(path.read_bytes(), f"{what}: {path}")


def complete_config(config: ModelConfig, path: Path, what: str) -> None:
    """Fill in the inputs and outputs `config` leaves out from the graph in `path`, then
    check the config against the graph. `what` names the model and version in messages."""
    graph = read_file(path, what)
    source = f"{what}: {path}"
    if _all_batchable(graph):
        _complete_batching(config, source)
    skip = 1 if config.max_batch_size else 0
    if not config.input:
        for tensor in graph.inputs:
            _add(config.input.add(), tensor, skip, source, "input")
    if not config.output:
        for tensor in graph.outputs:
            _add(config.output.add(), tensor, skip, source, "output")
    check_config(config, graph, source)


def _all_batchable(graph: Graph) -> bool:
    tensors = graph.inputs + graph.outputs
    return bool(tensors) and all(t.dims and t.dims[0] == -1 for t in tensors)


def _complete_batching(config: ModelConfig, source: str) -> None:
    """As Triton completes the config of a graph that batches: max_batch_size 0 becomes 4,
    and a max_batch_size above 1 turns the dynamic batcher on unless the config has it."""
    if not config.max_batch_size:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        logger.info("%s: every tensor's first dimension is dynamic: max_batch_size %d",
                    source, DEFAULT_MAX_BATCH_SIZE)
    if config.max_batch_size > 1 and not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()
        logger.info("%s: the graph batches: dynamic batching", source)


def _add(target, tensor: GraphTensor, skip: int, source: str, kind: str) -> None:
    if tensor.data_type == mc.TYPE_INVALID:
        raise FailedPrecondition(f"{source}: {kind} '{tensor.name}' has ONNX element type "
                                 f"{tensor.onnx_type}, which the protocol cannot carry")
    target.name = tensor.name
    target.data_type = tensor.data_type
    dims = tensor.dims[skip:]
    target.dims.extend(dims or [1])  # a scalar is sent as [ 1 ], as Triton completes it
    if not dims and skip:
        target.reshape.SetInParent()  # one scalar a row: the model takes [ batch ]


def check_config(config: ModelConfig, graph: Graph, source: str) -> None:
    """Refuse a config that disagrees with the graph it serves."""
    batched = config.max_batch_size > 0
    graph_inputs = {t.name: t for t in graph.inputs + graph.initializers}
    graph_outputs = {t.name: t for t in graph.outputs}
    for kind, declared, present in (("input", config.input, graph_inputs),
                                    ("output", config.output, graph_outputs)):
        for tensor in declared:
            found = present.get(tensor.name)
            if found is None:
                raise FailedPrecondition(
                    f"{source}: config.pbtxt declares {kind} '{tensor.name}', which the graph "
                    f"lacks (graph {kind}s: {', '.join(present) or 'none'})")
            _check_tensor(kind, tensor, found, batched, source)
    held = {t.name for t in graph.initializers}
    for tensor in config.input:
        if tensor.name in held and not tensor.optional:
            raise FailedPrecondition(
                f"{source}: input '{tensor.name}' is an initializer of the graph (it holds a "
                "value a request may replace): declare it with optional: true")
    declared_inputs = {t.name for t in config.input}
    for tensor in graph.inputs:
        if tensor.name not in declared_inputs:
            raise FailedPrecondition(f"{source}: the graph's input '{tensor.name}' is not "
                                     "declared in config.pbtxt")


def _check_tensor(kind: str, tensor, found: GraphTensor, batched: bool, source: str) -> None:
    if found.data_type != tensor.data_type:
        graph_type = WIRE_FROM_CONFIG.get(found.data_type, f"ONNX type {found.onnx_type}")
        raise FailedPrecondition(
            f"{source}: {kind} '{tensor.name}' is {WIRE_FROM_CONFIG[tensor.data_type]} in "
            f"config.pbtxt but {graph_type} in the graph")
    dims = list(found.dims)
    if batched:
        if not dims or dims[0] != -1:
            raise FailedPrecondition(
                f"{source}: max_batch_size is set but {kind} '{tensor.name}' has shape "
                f"{dims} in the graph; its first dimension must be dynamic (the batch)")
        dims = dims[1:]
    reshaped = tensor.HasField("reshape")  # the model sees reshape.shape; clients, dims
    shape, field = ((list(tensor.reshape.shape), "reshape shape") if reshaped
                    else (list(tensor.dims), "dims"))
    if not batched and not dims and all(d == 1 for d in shape):
        return  # a graph scalar, sent as [ 1 ] (or [ ]), as Triton takes it
    if len(dims) != len(shape) or any(
            -1 not in (c, g) and c != g for c, g in zip(shape, dims)):
        hint = ("; one scalar a row is dims: [ 1 ] reshape: { shape: [ ] }"
                if batched and not dims and not reshaped else "")
        raise FailedPrecondition(
            f"{source}: {kind} '{tensor.name}' has {field} {shape} in config.pbtxt "
            f"but {dims} in the graph (without the batch dimension){hint}")
