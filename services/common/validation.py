"""Checks a request against its model's configuration before anything moves. Pure.

Names, datatypes, shapes and byte lengths are checked from metadata, without decoding the
payload. Typed `contents` (for clients that do not send raw bytes) are turned into raw bytes
here, once, so every later hop sees only raw_input_contents.

A message's repeated fields are read by slicing (`tensor.shape[:]`, `request.outputs[:]`),
which gives a list at once: iterating protobuf's container itself costs ~1.5 µs more for the
one or two elements a request usually has, and the hot path reads several per request.
"""

import math
import struct
from typing import NamedTuple

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.datatypes import (
    ELEMENT_SIZE,
    WIRE_FROM_CONFIG,
    bytes_elements,
    element_count,
)
from meshserve.common.errors import InvalidArgument, TooLarge
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest
from meshserve.protocol.model_config_pb2 import ModelConfig

TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# One message between the services carries at most this (`tls.MAX_MESSAGE_BYTES`), less
# what the hops add around a request or an answer (a group item's ids, deadline and trace
# context, compute's timings): a request or an answer that only just fits the client's
# message would pass the limit between the services. Its size is read (`ByteSize`) only
# when its tensors pass NEAR_LIMIT.
MESSAGE_LIMIT = 64 << 20
WRAPPING_BYTES = 4 << 10
MAX_MESSAGE = MESSAGE_LIMIT - WRAPPING_BYTES
NEAR_LIMIT = MESSAGE_LIMIT - (64 << 10)
MAX_ELEMENTS = 2**63 - 1  # a tensor's elements, as an int64 counts them


def check_message_bytes(size: int, what: str) -> None:
    """Refuse a message of `size` bytes past what the services carry (`what`: whose, for
    the refusal)."""
    if size > MAX_MESSAGE:
        raise TooLarge(
            f"{what} is {size} bytes, past the {MAX_MESSAGE} bytes that one message between "
            f"the services carries (their {MESSAGE_LIMIT}-byte message limit less "
            f"{WRAPPING_BYTES} for the fields each hop adds)")


def expected_shape(config: ModelConfig, dims) -> list[int]:
    return ([-1] if config.max_batch_size > 0 else []) + list(dims)


_HEAD_DIMS, _TAIL_DIMS = 8, 2  # what a message shows of a longer shape


def _fmt(shape) -> str:
    dims = [str(d) for d in shape]
    if len(dims) > _HEAD_DIMS + _TAIL_DIMS:
        left_out = len(dims) - _HEAD_DIMS - _TAIL_DIMS
        dims = [*dims[:_HEAD_DIMS], f"... {left_out} more ...", *dims[-_TAIL_DIMS:]]
    return "[" + ", ".join(dims) + "]"


class Checked(NamedTuple):
    """What validation read of a valid request, for the hops that batch it: its payload
    bytes, its rows (1 for a model without batching) and the outputs it names (None: all)."""

    size: int
    rows: int
    outputs: list[str] | None


class Schema:
    """A model configuration compiled for validation: tables and message parts are built
    once, so a request's check is a few lookups (`validate` builds one per call)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.model = config.name
        self.batched = config.max_batch_size > 0
        self.max_batch_size = config.max_batch_size
        self.decoupled = config.model_transaction_policy.decoupled
        self.inputs = {t.name: (WIRE_FROM_CONFIG[t.data_type], expected_shape(config, t.dims))
                       for t in config.input}
        self.required = [t.name for t in config.input if not t.optional]
        self.outputs = {t.name for t in config.output}
        self.input_names = ", ".join(self.inputs)
        # Inputs of fixed dims and element size: (dims after the batch dimension, bytes per
        # row), so a well-formed request is checked with two comparisons.
        self.fixed = {t.name: (list(t.dims),
                               math.prod(t.dims) * ELEMENT_SIZE[WIRE_FROM_CONFIG[t.data_type]])
                      for t in config.input
                      if all(d > 0 for d in t.dims)
                      and WIRE_FROM_CONFIG[t.data_type] in ELEMENT_SIZE}
        # A model of one input of fixed dims (most models): (name, datatype, its `fixed`).
        self.sole = None
        if len(self.inputs) == 1 and not config.input[0].optional:
            [(name, (datatype, _))] = self.inputs.items()
            if name in self.fixed:
                self.sole = (name, datatype, self.fixed[name])

    def validate(self, request: ModelInferRequest) -> Checked:
        """Raise InvalidArgument naming the field and the expected value, or say what the
        request holds. May rewrite typed `contents` into `raw_input_contents`."""
        checked = self._sole_input(request)
        if checked is None:
            checked = self._check(request)
        if checked.size > NEAR_LIMIT:
            check_message_bytes(request.ByteSize(), "the request")
        return checked

    def _check(self, request: ModelInferRequest) -> Checked:
        """`validate` the long way: every field, naming the first that is wrong."""
        model = self.model
        if not request.inputs:
            raise InvalidArgument(f"request has no inputs; model '{model}' expects "
                                  f"{self.input_names}")
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for "
                                  f"{len(request.inputs)} inputs")
        seen: set[str] = set()
        batch_size = None
        size = 0
        for index, tensor in enumerate(request.inputs):
            name = tensor.name
            spec = self.inputs.get(name)
            if spec is None:
                raise InvalidArgument(f"unknown input '{name}' for model '{model}' "
                                      f"(inputs: {self.input_names})")
            if name in seen:
                raise InvalidArgument(f"input '{name}' appears more than once")
            seen.add(name)
            datatype, expected = spec
            if tensor.datatype != datatype:
                raise InvalidArgument(f"input '{name}' has datatype "
                                      f"{tensor.datatype or '(empty)'}; model '{model}' "
                                      f"expects {datatype}")
            shape = tensor.shape[:]
            known = self.fixed.get(name)
            if known is not None and raw and self._well_formed(shape, known, raw[index]):
                if batch_size is None:
                    batch_size = shape[0] if self.batched else None
                elif shape[0] != batch_size:
                    raise InvalidArgument(f"inputs disagree on the batch size: "
                                          f"{sorted({batch_size, shape[0]})}")
                if tensor.HasField("contents"):
                    raise InvalidArgument(f"input '{name}' sets contents while the request "
                                          "uses raw_input_contents; use one or the other")
                size += len(raw[index])
                continue
            self._check_shape(name, shape, expected)
            if self.batched:
                if batch_size is None:
                    batch_size = shape[0]
                elif shape[0] != batch_size:
                    raise InvalidArgument(f"inputs disagree on the batch size: "
                                          f"{sorted({batch_size, shape[0]})}")
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidArgument(f"input '{name}' sets contents while the request "
                                          "uses raw_input_contents; use one or the other")
                data = raw[index]
                _check_bytes(name, datatype, shape, data)
                size += len(data)
        if len(seen) != len(self.inputs):
            missing = [name for name in self.required if name not in seen]
            if missing:
                raise InvalidArgument(f"missing input '{missing[0]}' (model '{model}' expects "
                                      f"{self.input_names})")
        outputs = self._check_outputs(request)
        if not raw:
            _typed_to_raw(request)
            size = sum(len(data) for data in request.raw_input_contents)
        return Checked(size, batch_size if self.batched else 1, outputs)

    def _sole_input(self, request: ModelInferRequest) -> Checked | None:
        """A well-formed request to a model of one fixed-size input, its bytes raw: the
        common case, checked in a few comparisons (None: check the long way)."""
        if self.sole is None:
            return None
        inputs, raw = request.inputs, request.raw_input_contents
        if len(inputs) != 1 or len(raw) != 1:
            return None
        tensor = inputs[0]
        name, datatype, known = self.sole
        data = raw[0]
        shape = tensor.shape[:]
        if (tensor.name != name or tensor.datatype != datatype
                or not self._well_formed(shape, known, data)
                or tensor.HasField("contents")):
            return None
        return Checked(len(data), shape[0] if self.batched else 1, self._check_outputs(request))

    def _check_outputs(self, request: ModelInferRequest) -> list[str] | None:
        """The outputs the request names (None: all of them)."""
        wanted = request.outputs[:]
        for output in wanted:
            if output.name not in self.outputs:
                raise InvalidArgument(
                    f"unknown output '{output.name}' requested (model '{self.model}' outputs: "
                    f"{', '.join(t.name for t in self.config.output)})")
            no_shared_memory("output", output, "it comes back in raw_output_contents")
        return [output.name for output in wanted] or None

    def _well_formed(self, shape: list[int], known: tuple[list[int], int],
                     data: bytes) -> bool:
        """A fixed-size input with the expected dims, batch size and byte length (False:
        check it the long way, which says what is wrong)."""
        dims, row_bytes = known
        if not self.batched:
            return shape == dims and len(data) == row_bytes
        return (len(shape) == len(dims) + 1 and shape[1:] == dims
                and 1 <= shape[0] <= self.max_batch_size
                and len(data) == shape[0] * row_bytes)

    def _check_shape(self, name: str, dims: list[int], expected: list[int]) -> None:
        config = self.config
        if len(dims) != len(expected) or any(
                d < 0 or (e != -1 and d != e) for d, e in zip(dims, expected)):
            shown = f"; model '{config.name}' expects {_fmt(expected)}"
            if self.batched:
                shown += f" with batch size 1 to {config.max_batch_size}"
            raise InvalidArgument(f"input '{name}' has shape {_fmt(dims)}{shown}")
        # Past int64, a shape's bytes cannot match; with a 0 among its dims, they do (none).
        if 0 in dims and math.prod(d for d in dims if d) > MAX_ELEMENTS:
            raise InvalidArgument(f"input '{name}' has shape {_fmt(dims)}, whose dimensions "
                                  f"multiply past {MAX_ELEMENTS} (2^63 - 1)")
        if self.batched:
            batch = dims[0]
            if batch < 1 or batch > config.max_batch_size:
                raise InvalidArgument(f"input '{name}' has batch size {batch}; "
                                      f"max_batch_size of model '{config.name}' is "
                                      f"{config.max_batch_size}")


def validate(request: ModelInferRequest, config: ModelConfig) -> Checked:
    """`Schema(config).validate(request)`: for callers that check one request of a model."""
    return Schema(config).validate(request)


def _check_bytes(name: str, datatype: str, shape, raw: bytes) -> None:
    elements = element_count(shape)
    if datatype == "BYTES":
        found = bytes_elements(raw)
        if found != elements:
            raise InvalidArgument(f"input '{name}' raw_input_contents holds {found} BYTES "
                                  f"elements; shape {_fmt(shape)} needs {elements}")
        return
    needed = elements * ELEMENT_SIZE[datatype]
    if len(raw) != needed:
        raise InvalidArgument(f"input '{name}' raw_input_contents holds {len(raw)} bytes; "
                              f"shape {_fmt(shape)} of {datatype} needs {needed}")


SHARED_MEMORY_REGION = "shared_memory_region"
INTEGER_KINDS = ("int64_param", "uint64_param")


def integer_parameter(parameter) -> int | None:
    """The integer an `InferParameter` holds (None: it holds another kind)."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind in INTEGER_KINDS else None


def no_shared_memory(kind: str, tensor, instead: str) -> None:
    """Refuse a tensor placed in a shared-memory region (Triton's extension, which a mesh of
    services on other hosts cannot read or write)."""
    if SHARED_MEMORY_REGION in tensor.parameters:
        region = tensor.parameters[SHARED_MEMORY_REGION].string_param
        raise InvalidArgument(f"{kind} '{tensor.name}' names shared_memory_region '{region}': "
                              f"shared memory is not supported; leave the parameter out and "
                              f"{instead}")


def _typed_to_raw(request: ModelInferRequest) -> None:
    for tensor in request.inputs:
        no_shared_memory("input", tensor, "send its bytes in raw_input_contents")
        field = TYPED_FIELD.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field else ()
        elements = element_count(tensor.shape)
        if not field:
            raise InvalidArgument(f"input '{tensor.name}': {tensor.datatype} data must come in "
                                  "raw_input_contents")
        if len(values) != elements:
            raise InvalidArgument(f"input '{tensor.name}' contents.{field} holds "
                                  f"{len(values)} values; shape {_fmt(tensor.shape)} needs "
                                  f"{elements}")
        if tensor.datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(v)) + v for v in values)
        else:
            try:
                data = numpy.asarray(values, dtype=NUMPY_DTYPE[tensor.datatype]).tobytes()
            except (OverflowError, ValueError):
                raise InvalidArgument(f"input '{tensor.name}' contents.{field} holds a value "
                                      f"outside the range of {tensor.datatype}") from None
        request.raw_input_contents.append(data)
        tensor.ClearField("contents")
