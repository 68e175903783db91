"""Joining requests into one batch and splitting the batch's answer: pure functions.

Payload bytes are joined and sliced, never decoded: rows of a row-major tensor are
contiguous, so a batch is the concatenation of its requests' bytes along the first dimension.
For a model that answers each request on its own (a Python model), the batch also says whose
rows it holds, and its answer which requests failed on their own and, for an output whose
dims differ from request to request, each request's shape (`batch_requests`): such an
output is split by those shapes instead of by rows; each request's own response parameters
go to its answer.
"""

from collections.abc import Sequence

from meshserve.common import batch_requests, wire
from meshserve.common.datatypes import ELEMENT_SIZE, element_count, split_bytes_rows
from meshserve.common.errors import Internal, InvalidArgument
from meshserve.common.validation import Schema
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse


def batch_key(request: ModelInferRequest, batched: bool) -> tuple:
    """Requests share a batch only when their inputs agree on everything but the batch size."""
    start = 1 if batched else 0
    inputs = request.inputs
    if len(inputs) == 1:  # most models: nothing to sort
        tensor = inputs[0]
        return ((tensor.name, tensor.datatype, tuple(tensor.shape[start:])),)
    return tuple(sorted((t.name, t.datatype, tuple(t.shape[start:])) for t in inputs))


def sole_key(schema: Schema) -> tuple | None:
    """The batch key every valid request has when the model takes one input of fixed dims
    (validation holds its name, datatype and dims to the configuration's); None otherwise."""
    if schema.sole is None:
        return None
    name, datatype, (dims, _) = schema.sole
    return ((name, datatype, tuple(dims)),)


def merge(requests: Sequence[ModelInferRequest], rows: Sequence[int],
          wanted: Sequence[list[str] | None], version: str,
          per_request: bool = False) -> list[bytes]:
    """The request whose inputs are the requests' inputs joined along the batch dimension,
    asking for every output one of them wanted (`wanted`: the names each request gave, None
    for all, as validation reads them), of `version`; a sole request as it is, but for its
    version. Serialized in pieces: joined, they are its bytes. With `per_request` (a model
    that answers each request on its own), a batch of several also describes them.

    Each input's bytes are read once, and follow the rest of the request as they are (built
    as a message and serialized, a batch was copied four more times on its way to compute)."""
    first = requests[0]
    if len(requests) == 1:
        return [first.SerializeToString(), wire.length_delimited(_VERSION, version.encode())]
    total = sum(rows)
    batch = ModelInferRequest(model_name=first.model_name, model_version=version)
    # Where each request holds each input; one input (same key) is every request's first.
    positions = (None if len(first.inputs) == 1
                 else [{t.name: i for i, t in enumerate(r.inputs)} for r in requests])
    contents = []
    for tensor in first.inputs:
        joined = batch.inputs.add(name=tensor.name, datatype=tensor.datatype)
        joined.shape.extend([total, *tensor.shape[1:]])
        if positions is None:
            contents.append([r.raw_input_contents[0] for r in requests])
        else:
            contents.append([r.raw_input_contents[p[tensor.name]]
                             for r, p in zip(requests, positions)])
    for name in requested_outputs(wanted):
        batch.outputs.add(name=name)
    if per_request:
        batch.parameters[batch_requests.REQUESTS].string_param = batch_requests.describe(
            requests, rows, wanted)
    pieces = [batch.SerializeToString()]
    for parts in contents:
        pieces += (_RAW_INPUT, wire.varint(sum(map(len, parts))), *parts)
    return pieces


_VERSION = ModelInferRequest.MODEL_VERSION_FIELD_NUMBER
_RAW_INPUT = wire.tag(ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER)


def requested_outputs(wanted: Sequence[list[str] | None]) -> list[str]:
    """Every output any request named; empty (= all) when one of them wanted all."""
    names: dict[str, None] = {}
    for each in wanted:
        if each is None:
            return []
        for name in each:
            names[name] = None
    return list(names)


def split(batch: ModelInferResponse, requests: Sequence[ModelInferRequest],
          rows: Sequence[int], wanted: Sequence[list[str] | None]) -> list[ItemResult]:
    """One result per request, its response holding its rows of the outputs it wanted
    (`wanted`, as for `merge`).

    Requests that want the same outputs for as many rows share a template of their answer
    (its version and its outputs' names, datatypes and shapes): each result is a copy of it
    with the request's name, id and bytes, a third of the cost of building it field by field."""
    if len(batch.raw_output_contents) != len(batch.outputs):
        raise Internal("compute answered without raw_output_contents for every output")
    total = sum(rows)
    single = len(requests) == 1  # its answer keeps the batch's shapes
    outputs = []  # name, datatype, shape (single) or the dims after the batch's, pieces
    for tensor, raw in zip(batch.outputs, batch.raw_output_contents):
        shape = tensor.shape[:]
        outputs.append((tensor.name, tensor.datatype, shape if single else shape[1:],
                        _row_slices(raw, tensor.datatype, total, rows,
                                    element_count(shape[1:]))))
    # Per kind of answer: its template, and the pieces of each output it holds, in order.
    templates: dict[tuple, tuple[ItemResult, list[list[bytes]]]] = {}
    results = []
    for index, (request, names, count) in enumerate(zip(requests, wanted, rows, strict=True)):
        key = (None if names is None else tuple(names), count)
        kind = templates.get(key)
        if kind is None:
            template, held = ItemResult(), []
            template.response.model_version = batch.model_version
            for name, datatype, dims, pieces in outputs:
                if names is None or name in names:
                    template.response.outputs.add(name=name, datatype=datatype,
                                                  shape=dims if single else [count, *dims])
                    held.append(pieces)
            kind = templates[key] = (template, held)
        template, held = kind
        result = ItemResult()
        result.CopyFrom(template)
        answer = result.response
        answer.model_name, answer.id = request.model_name, request.id
        for pieces in held:
            answer.raw_output_contents.append(pieces[index])
        results.append(result)
    return results


def split_answered(batch: ModelInferResponse, requests: Sequence[ModelInferRequest],
                   rows: Sequence[int], wanted: Sequence[list[str] | None]) -> list[ItemResult]:
    """`split` for a model that answers each request on its own: the requests the batch's
    answer lists as failed get their error, the others their rows (the answer holds only
    theirs), of the outputs the answer lists under `meshserve_shapes` each in its own shape
    (`split_shaped`), and the parameters it lists for them under `meshserve_parameters`."""
    failed = batch_requests.read_failed(batch)
    shapes = batch_requests.read_shapes(batch)
    parameters = batch_requests.read_parameters(batch)
    if not failed:
        results = _split_by(batch, requests, rows, wanted, shapes)
    else:
        if not failed.keys() <= set(range(len(requests))):
            raise Internal(f"compute answered failures of requests {sorted(failed)} for a "
                           f"batch of {len(requests)}")
        kept = [i for i in range(len(requests)) if i not in failed]
        answered = iter(_split_by(batch, [requests[i] for i in kept], [rows[i] for i in kept],
                                  [wanted[i] for i in kept], shapes) if kept else ())
        results = [failed[i] if i in failed else next(answered) for i in range(len(requests))]
    if parameters:
        _give_parameters(results, parameters)
    return results


def _give_parameters(results: list[ItemResult], parameters: dict[int, dict]) -> None:
    """Each answered request's own response parameters, in its response."""
    if not parameters.keys() <= {i for i, r in enumerate(results) if not r.code}:
        raise Internal(f"compute answered response parameters of requests {sorted(parameters)}"
                       f" for a batch of {len(results)} (failed: "
                       f"{[i for i, r in enumerate(results) if r.code]})")
    for index, values in parameters.items():
        target = results[index].response.parameters
        for name, value in values.items():
            batch_requests.set_parameter(target[name], value, f"response parameter '{name}'")


def _split_by(batch: ModelInferResponse, requests: Sequence[ModelInferRequest],
              rows: Sequence[int], wanted: Sequence[list[str] | None],
              shapes: dict[str, list[list[int]]]) -> list[ItemResult]:
    """By rows, or by the requests' own shapes when the answer lists any."""
    if shapes:
        return split_shaped(batch, requests, rows, wanted, shapes)
    return split(batch, requests, rows, wanted)


def split_shaped(batch: ModelInferResponse, requests: Sequence[ModelInferRequest],
                 rows: Sequence[int], wanted: Sequence[list[str] | None],
                 shapes: dict[str, list[list[int]]]) -> list[ItemResult]:
    """`split` of an answer whose outputs named in `shapes` differ in their dims from request
    to request: each of those holds the requests' elements one after the other, and each
    request gets its own shape (`shapes[name][i]`, its rows first) and its elements. The
    other outputs split by rows, as in `split`."""
    if len(batch.raw_output_contents) != len(batch.outputs):
        raise Internal("compute answered without raw_output_contents for every output")
    total = sum(rows)
    outputs = []  # name, datatype, each request's shape, each request's bytes
    for tensor, raw in zip(batch.outputs, batch.raw_output_contents):
        own = shapes.get(tensor.name)
        if own is None:
            dims = tensor.shape[1:]
            each = [[count, *dims] for count in rows]
            pieces = _row_slices(raw, tensor.datatype, total, rows, element_count(dims))
        else:
            each = _checked_shapes(tensor.name, own, rows)
            pieces = _element_slices(raw, tensor.datatype, [element_count(s) for s in each])
        outputs.append((tensor.name, tensor.datatype, each, pieces))
    results = []
    for index, (request, names) in enumerate(zip(requests, wanted, strict=True)):
        result = ItemResult()
        answer = result.response
        answer.model_name, answer.model_version = request.model_name, batch.model_version
        answer.id = request.id
        for name, datatype, each, pieces in outputs:
            if names is None or name in names:
                answer.outputs.add(name=name, datatype=datatype, shape=each[index])
                answer.raw_output_contents.append(pieces[index])
        results.append(result)
    return results


def _checked_shapes(name: str, shapes: list[list[int]], rows: Sequence[int]) -> list[list[int]]:
    """`shapes` of output `name`, when they are one per request, each of its request's rows."""
    if [shape[0] for shape in shapes] != list(rows):
        raise Internal(f"compute answered shapes {shapes} of output '{name}' for requests of "
                       f"{list(rows)} rows")
    return shapes


def _row_slices(raw: bytes, datatype: str, total: int, rows: Sequence[int],
                per_row: int) -> list[bytes]:
    if len(rows) == 1:
        return [raw]
    if datatype == "BYTES":
        try:
            return split_bytes_rows(raw, [count * per_row for count in rows])
        except InvalidArgument as error:  # the fault is compute's, not the client's
            raise Internal(f"compute answered a malformed BYTES output: {error.message}") from None
    row_bytes = per_row * ELEMENT_SIZE[datatype]
    if row_bytes * total != len(raw):
        raise Internal(f"compute answered {len(raw)} bytes for {total} rows of {datatype}")
    pieces, offset = [], 0
    for count in rows:
        end = offset + count * row_bytes
        pieces.append(raw[offset:end])
        offset = end
    return pieces


def _element_slices(raw: bytes, datatype: str, counts: Sequence[int]) -> list[bytes]:
    """`raw` cut into consecutive pieces of `counts[i]` elements each."""
    if datatype == "BYTES":
        try:
            return split_bytes_rows(raw, list(counts))
        except InvalidArgument as error:  # the fault is compute's, not the client's
            raise Internal(f"compute answered a malformed BYTES output: {error.message}") from None
    size = ELEMENT_SIZE[datatype]
    if sum(counts) * size != len(raw):
        raise Internal(f"compute answered {len(raw)} bytes for {sum(counts)} elements of "
                       f"{datatype}")
    pieces, offset = [], 0
    for count in counts:
        end = offset + count * size
        pieces.append(raw[offset:end])
        offset = end
    return pieces
