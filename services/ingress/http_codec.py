"""The Open Inference Protocol's HTTP/REST bodies ↔ the ingress's protobuf messages. Pure.

An inference request body is a JSON object, optionally followed by raw tensor bytes (Triton's
binary tensor data extension: the JSON's length is the `Inference-Header-Content-Length`
header; an input with parameter `binary_data_size` takes that many of the bytes after it, in
input order). `decode_infer` turns it into the same `ModelInferRequest` a gRPC client sends,
every input as `raw_input_contents`, so validation and everything after it is shared.
`encode_infer` turns the response into JSON, with the outputs asked for `binary_data` (or all
of them, with the request parameter `binary_data_output`) as raw bytes after it.

JSON tensor `data` is a flat or nested list in row-major order: booleans for BOOL, integers
for the integer types, numbers for FP16/FP32/FP64/BF16, UTF-8 strings for BYTES.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy

from meshserve.common.arrays import NUMPY_DTYPE
from meshserve.common.batch_requests import INT64_MAX, set_parameter
from meshserve.common.datatypes import bytes_elements, element_count, split_bytes_rows
from meshserve.common.errors import InvalidArgument
from meshserve.common.validation import no_shared_memory
from meshserve.protocol import grpc_service_pb2 as pb

# Parameters of the binary tensor data extension: read here, never forwarded.
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"


@dataclass(frozen=True)
class OutputEncoding:
    """How the response's outputs travel: as raw bytes after the JSON (`binary`) or as
    JSON data. `by_name` holds the outputs the request named; others take `default`."""

    default: bool = False
    by_name: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.by_name.get(name, self.default)


# --- JSON values -----------------------------------------------------------------------------


def parse_json(data: bytes | memoryview, what: str = "request body") -> object:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} nests JSON arrays or objects too deeply") from None


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object")
    return value


def _list(value: object, where: str) -> list:
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be a JSON array")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string")
    return value


def set_parameters(target, parameters: dict, where: str, skip: Sequence[str] = ()) -> None:
    for name, value in parameters.items():
        if name not in skip:
            try:
                set_parameter(target[name], value, f"{where} '{name}'")
            except ValueError:
                raise InvalidArgument(f"{where} '{name}' is out of range") from None


def parameter_value(parameter: pb.InferParameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def parameters_json(parameters) -> dict:
    return {name: parameter_value(value) for name, value in parameters.items()}


# --- tensors ---------------------------------------------------------------------------------


def _shape(value: object, where: str) -> list[int]:
    shape = _list(value, f"{where} shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= INT64_MAX
               for d in shape):
        raise InvalidArgument(f"{where} shape must be a list of integers from 0 to 2^63 - 1")
    return shape


def _flatten(data: list, where: str) -> list:
    """Nested lists, row-major, as one flat list (any depth)."""
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _count(found: int, needed: int, where: str, shape: list[int]) -> None:
    if found != needed:
        raise InvalidArgument(f"{where} data holds {found} values; shape {shape} needs {needed}")


def json_to_raw(data: object, datatype: str, shape: list[int], where: str) -> bytes:
    """JSON tensor data (flat or nested) as the raw little-endian bytes of `datatype`."""
    data = _list(data, f"{where} data")
    needed = element_count(shape)
    if datatype in ("BYTES", "BOOL"):
        values = _flatten(data, where)
        _count(len(values), needed, where, shape)
        if datatype == "BOOL":
            if not all(isinstance(v, bool) for v in values):
                raise InvalidArgument(f"{where} data of BOOL must be true or false")
            return numpy.asarray(values, dtype=numpy.bool_).tobytes()
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"{where} data of BYTES must be strings")
        return b"".join(struct.pack("<I", len(v)) + v for v in (v.encode() for v in values))
    if datatype not in NUMPY_DTYPE and datatype != "BF16":
        raise InvalidArgument(f"{where} has datatype {datatype or '(empty)'}, which is not one "
                              "of the protocol's datatypes")
    if not (datatype.startswith("FP") or datatype == "BF16"):
        values = _flatten(data, where)  # exact: numpy would take 2**64 - 1 for a float
        _count(len(values), needed, where, shape)
        return _integers(values, datatype, where)
    try:
        array = numpy.asarray(data)  # nested lists in C; a ragged one is refused below
    except ValueError:
        array = None
    if array is None or array.dtype.kind not in "iufb":
        raise InvalidArgument(f"{where} data of {datatype} must be numbers in lists of equal "
                              "length")
    _count(array.size, needed, where, shape)
    if datatype == "BF16":
        return float32_to_bf16(array.astype(numpy.float32)).tobytes()
    with numpy.errstate(over="ignore"):
        return array.astype(NUMPY_DTYPE[datatype]).tobytes()


def _integers(values: list, datatype: str, where: str) -> bytes:
    if not all(type(v) is int for v in values):
        raise InvalidArgument(f"{where} data of {datatype} must be integers")
    dtype = NUMPY_DTYPE[datatype]
    info = numpy.iinfo(dtype)
    if values and (min(values) < info.min or max(values) > info.max):
        raise InvalidArgument(f"{where} data holds a value outside the range of {datatype}")
    return numpy.asarray(values, dtype=dtype).tobytes()


def float32_to_bf16(array: numpy.ndarray) -> numpy.ndarray:
    """The top 16 bits of each float32, rounded to nearest even."""
    bits = array.astype("<f4").view("<u4").astype(numpy.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def raw_to_json(raw: bytes, datatype: str, where: str) -> list:
    """Raw tensor bytes as a flat JSON list."""
    if datatype == "BYTES":
        elements = split_bytes_rows(raw, [1] * bytes_elements(raw))
        try:
            return [element[4:].decode() for element in elements]
        except UnicodeDecodeError:
            raise InvalidArgument(f"{where} holds bytes that are not UTF-8; ask for it with "
                                  f"parameter '{BINARY_DATA}': true") from None
    if datatype == "BF16":
        bits = numpy.frombuffer(raw, dtype="<u2").astype("<u4") << 16
        return bits.view("<f4").tolist()
    dtype = NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"{where} has datatype {datatype}, which JSON cannot carry")
    return numpy.frombuffer(raw, dtype=dtype).tolist()


# --- inference -------------------------------------------------------------------------------


def split_body(body: bytes | memoryview, header_length: int | None) -> tuple[memoryview,
                                                                             memoryview]:
    """(JSON part, binary part) of a request body."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    if header_length < 0 or header_length > len(view):
        raise InvalidArgument(f"Inference-Header-Content-Length is {header_length}; the body "
                              f"holds {len(view)} bytes")
    return view[:header_length], view[header_length:]


def decode_infer(body: bytes | memoryview, header_length: int | None, model: str,
                 version: str = "") -> tuple[pb.ModelInferRequest, OutputEncoding]:
    """An inference request body as a ModelInferRequest (inputs as raw bytes) and how the
    answer's outputs should travel."""
    header, binary = split_body(body, header_length)
    document = _object(parse_json(header), "request body")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        request.id = _string(document["id"], "id")
    parameters = _object(document.get("parameters", {}), "parameters")
    default_binary = parameters.get(BINARY_DATA_OUTPUT, False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument(f"parameter '{BINARY_DATA_OUTPUT}' must be true or false")
    set_parameters(request.parameters, parameters, "parameter", skip=(BINARY_DATA_OUTPUT,))
    offset = 0
    for index, entry in enumerate(_list(document.get("inputs"), "inputs")):
        offset = _decode_input(request, _object(entry, f"inputs[{index}]"), index, binary,
                               offset)
    if offset != len(binary):
        raise InvalidArgument(f"the body holds {len(binary) - offset} bytes after the binary "
                              "data of the inputs")
    by_name = {}
    for index, entry in enumerate(_list(document.get("outputs", []), "outputs")):
        entry = _object(entry, f"outputs[{index}]")
        name = _string(entry.get("name"), f"outputs[{index}] name")
        output = request.outputs.add(name=name)
        options = _object(entry.get("parameters", {}), f"output '{name}' parameters")
        wanted = options.get(BINARY_DATA, default_binary)
        if not isinstance(wanted, bool):
            raise InvalidArgument(f"output '{name}' parameter '{BINARY_DATA}' must be true or "
                                  "false")
        by_name[name] = wanted
        set_parameters(output.parameters, options, f"output '{name}' parameter",
                        skip=(BINARY_DATA,))
        no_shared_memory("output", output, "it comes back in the response, as data or with "
                                           f"'{BINARY_DATA}': true")
    return request, OutputEncoding(default_binary, by_name)


def _decode_input(request: pb.ModelInferRequest, entry: dict, index: int, binary: memoryview,
                  offset: int) -> int:
    """Adds one input and its raw bytes; returns the offset of the next binary data."""
    name = _string(entry.get("name"), f"inputs[{index}] name")
    where = f"input '{name}'"
    datatype = _string(entry.get("datatype"), f"{where} datatype")
    shape = _shape(entry.get("shape"), where)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    options = _object(entry.get("parameters", {}), f"{where} parameters")
    size = options.get(BINARY_DATA_SIZE)
    set_parameters(tensor.parameters, options, f"{where} parameter", skip=(BINARY_DATA_SIZE,))
    if size is None:
        if "data" not in entry:
            no_shared_memory("input", tensor, f"send its data or parameter '{BINARY_DATA_SIZE}'")
            raise InvalidArgument(f"{where} has neither data nor parameter "
                                  f"'{BINARY_DATA_SIZE}'")
        request.raw_input_contents.append(json_to_raw(entry["data"], datatype, shape, where))
        return offset
    if "data" in entry:
        raise InvalidArgument(f"{where} has both data and parameter '{BINARY_DATA_SIZE}'")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{where} parameter '{BINARY_DATA_SIZE}' must be a non-negative "
                              "integer")
    if size > len(binary) - offset:
        raise InvalidArgument(f"{where} claims {BINARY_DATA_SIZE} {size}; only "
                              f"{len(binary) - offset} bytes of binary data remain in the body")
    request.raw_input_contents.append(bytes(binary[offset:offset + size]))
    return offset + size


def tensor_json(tensor, raw: bytes, binary: bool, where: str, trailer: list[bytes]) -> dict:
    """A tensor's JSON: its data, or (`binary`) its size, its bytes then added to `trailer`."""
    entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    parameters = parameters_json(tensor.parameters)
    if binary:
        parameters[BINARY_DATA_SIZE] = len(raw)
        trailer.append(raw)
    else:
        entry["data"] = raw_to_json(raw, tensor.datatype, where)
    if parameters:
        entry["parameters"] = parameters
    return entry


def encode_infer(response: pb.ModelInferResponse,
                 encoding: OutputEncoding) -> tuple[dict, list[bytes]]:
    """(the JSON document, the raw bytes of the binary outputs in order)."""
    document: dict = {"model_name": response.model_name,
                      "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameters_json(response.parameters)
    binary: list[bytes] = []
    raw = response.raw_output_contents
    outputs = [tensor_json(tensor, raw[index] if index < len(raw) else b"",
                           encoding.binary(tensor.name), f"output '{tensor.name}'", binary)
               for index, tensor in enumerate(response.outputs)]
    document["outputs"] = outputs
    return document, binary


# The codings an inference answer is compressed with when the client accepts one (Triton's
# `Accept-Encoding`, tritonclient's `response_compression_algorithm`); "deflate" is the zlib
# format (RFC 9110 §8.4.1.2).
RESPONSE_CODINGS = ("gzip", "deflate")


def response_coding(accept_encoding: str) -> str:
    """The coding of RESPONSE_CODINGS that `Accept-Encoding` prefers (the highest q above 0,
    the first listed among equals), or "" for none (the body goes as it is)."""
    best, best_q = "", 0.0
    for item in accept_encoding.split(","):
        coding, _, options = item.partition(";")
        coding = coding.strip().lower()
        if coding not in RESPONSE_CODINGS:
            continue
        q = 1.0
        name, _, value = options.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        if q > best_q:
            best, best_q = coding, q
    return best


def encode_body(body: bytes, coding: str) -> bytes:
    """`body` compressed with `coding` ("gzip" or "deflate")."""
    compressor = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
    return compressor.compress(body) + compressor.flush()


def dump(document: object) -> bytes:
    """The document as compact JSON. A non-finite float is written as Triton writes it
    (`NaN`, `Infinity`, `-Infinity`, which it reads too, as do Python's json and so
    tritonclient): a model's NaN output is an answer, not a server error."""
    return json.dumps(document, separators=(",", ":")).encode()


# --- other messages --------------------------------------------------------------------------

_INT64 = {3, 4, 6, 16, 18}  # FieldDescriptor types: int64, uint64, fixed64, sfixed64, sint64


def message_json(message) -> dict:
    """A protobuf message as JSON the way Triton writes it: field names as declared, 64-bit
    integers as numbers, enums by name, bytes as base64; scalars and lists always present,
    messages and oneof members only when set."""
    out = {}
    for descriptor in message.DESCRIPTOR.fields:
        repeated = descriptor.is_repeated
        has_presence = (descriptor.message_type is not None and not repeated
                        ) or descriptor.containing_oneof is not None
        if has_presence and not message.HasField(descriptor.name):
            continue
        value = getattr(message, descriptor.name)
        if repeated and descriptor.message_type is not None \
                and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            out[descriptor.name] = {key: _json_value(value_field, item)
                                    for key, item in value.items()}
        elif repeated:
            out[descriptor.name] = [_json_value(descriptor, item) for item in value]
        else:
            out[descriptor.name] = _json_value(descriptor, value)
    return out


def _json_value(descriptor, value):
    if descriptor.message_type is not None:
        return message_json(value)
    if descriptor.enum_type is not None:
        named = descriptor.enum_type.values_by_number.get(value)
        return value if named is None else named.name
    if descriptor.type == descriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if descriptor.type in _INT64:
        return int(value)
    return value


def encode_request(request: pb.ModelInferRequest, binary: bool) -> tuple[bytes, int | None]:
    """A client's body for `request` (raw inputs): (body, Inference-Header-Content-Length or
    None). `binary`: inputs as binary tensor data and outputs asked as binary too; else
    every tensor as JSON data."""
    document: dict = {}
    if request.id:
        document["id"] = request.id
    parameters = parameters_json(request.parameters)
    if binary:
        parameters[BINARY_DATA_OUTPUT] = True
    if parameters:
        document["parameters"] = parameters
    trailer: list[bytes] = []
    inputs = [tensor_json(tensor, raw, binary, f"input '{tensor.name}'", trailer)
              for tensor, raw in zip(request.inputs, request.raw_input_contents)]
    document["inputs"] = inputs
    if request.outputs:
        document["outputs"] = [
            {"name": output.name,
             "parameters": {**parameters_json(output.parameters), BINARY_DATA: binary}}
            for output in request.outputs]
    header = dump(document)
    if not binary:
        return header, None
    return b"".join([header, *trailer]), len(header)
