"""Malformed and random messages, drawn by hypothesis: for the ingress's ModelInfer, and for
the internal hops that trust the ingress's validation (a batcher's group call, a compute's
ModelInfer), called with the certificate of the hop that may call them.

Two kinds: arbitrary bytes (most do not even parse), and structurally valid messages with
wrong contents (unknown models and versions, wrong names, datatypes, shapes, byte lengths,
typed contents, parameters; for groups, such requests with odd ids, timeouts and
priorities). Sent as raw bytes, so nothing on the client side checks them first.
"""

import asyncio
import time

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meshserve.protocol import groups_pb2
from meshserve.protocol import grpc_service_pb2 as pb
from tests.chaos.outcomes import INPUT_REFUSALS, Tally, classify

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
GROUP_INFER = "/meshserve.v1.GroupInference/Infer"
ANSWER_WITHIN = 10.0  # seconds: every malformed call must have its status by then

names = st.one_of(st.sampled_from(["mlp", "cnn", "slow", "", "INPUT__0"]), st.text(max_size=12))
datatypes = st.one_of(st.sampled_from(["FP32", "FP16", "INT8", "INT64", "BYTES", "BOOL", ""]),
                      st.text(max_size=6))
shapes = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=5)
parameter_values = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1).map(
        lambda v: pb.InferParameter(int64_param=v)),
    st.text(max_size=8).map(lambda v: pb.InferParameter(string_param=v)),
    st.booleans().map(lambda v: pb.InferParameter(bool_param=v)),
    st.floats(allow_nan=True).map(lambda v: pb.InferParameter(double_param=v)))


@st.composite
def wrong_request_messages(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(names), model_version=draw(
        st.one_of(st.sampled_from(["", "1", "2", "0", "99", "-1"]), st.text(max_size=4))),
        id=draw(st.text(max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(datatypes),
                                    shape=draw(shapes))
        contents = draw(st.sampled_from(["none", "fp32", "int", "bytes"]))
        if contents == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        elif contents == "int":
            tensor.contents.int_contents.extend(
                draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=8)))
        elif contents == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8),
                                                                max_size=3)))
    for raw in draw(st.lists(st.binary(max_size=1100), max_size=3)):
        request.raw_input_contents.append(raw)
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "sequence_id", "x"]),
                             max_size=3)):
        request.parameters[key].CopyFrom(draw(parameter_values))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(names))
    return request


@st.composite
def wrong_groups(draw) -> bytes:
    group = groups_pb2.InferGroup(model_name=draw(names))
    for request in draw(st.lists(wrong_request_messages(), max_size=4)):
        group.items.add(request=request, request_id=draw(st.text(max_size=8)),
                        timeout_us=draw(st.integers(0, 2**64 - 1)),
                        priority=draw(st.integers(0, 2**32 - 1)),
                        traceparent=draw(st.text(max_size=60)))
    return group.SerializeToString()


wrong_requests = wrong_request_messages().map(lambda request: request.SerializeToString())
payloads = st.one_of(st.binary(max_size=2048), wrong_requests)
group_payloads = st.one_of(st.binary(max_size=2048), wrong_groups())


def draw_payloads(examples: int, strategy=payloads) -> list[bytes]:
    """`examples` payloads, the same ones on every run (derandomized)."""
    drawn: list[bytes] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn


def is_leak(message: str) -> bool:
    """Whether an answer's message looks like a stack trace."""
    return "Traceback" in message or 'File "' in message


def group_answered(sent: bytes, answer: bytes) -> tuple[bool, list[str]]:
    """A group call's answer must hold one result per item, each either a response or a
    status with a message. Returns (whether it does, the items' messages)."""
    items = groups_pb2.InferGroup.FromString(sent).items
    results = groups_pb2.InferGroupResult.FromString(answer).results
    complete = len(results) == len(items) and all(
        result.HasField("response") if result.code == 0 else bool(result.message)
        for result in results)
    return complete, [result.message for result in results]


async def send_all(channel: grpc.aio.Channel, payloads: list[bytes], tally: Tally,
                   concurrency: int = 16, method: str = MODEL_INFER) -> list[str]:
    """Send each payload as raw bytes; classify each answer into `tally` (INVALID_ARGUMENT
    and the like are clear refusals). Returns the details of answers that look like a
    leaked stack trace."""
    infer = channel.unary_unary(method, request_serializer=None,
                                response_deserializer=None)
    leaks: list[str] = []
    queue = list(enumerate(payloads))

    async def caller() -> None:
        while queue:
            _, payload = queue.pop()
            tally.sent += 1
            start = time.monotonic()
            output_ok = True
            try:
                answer = await infer(payload, timeout=ANSWER_WITHIN)
                code, message = "OK", ""
                if method == GROUP_INFER:
                    output_ok, item_messages = group_answered(payload, answer)
                    message = next((m for m in item_messages if is_leak(m)), "")
            except grpc.aio.AioRpcError as error:
                code, message = error.code().name, error.details() or ""
            if is_leak(message):
                leaks.append(message)
            # An OK answer to a random message is a request that happened to be valid.
            tally.record(classify(code, message, time.monotonic() - start, ANSWER_WITHIN,
                                  output_ok=output_ok, refusals=INPUT_REFUSALS), code, message)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return leaks
