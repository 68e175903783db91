"""The services' own gRPC server tells its `unserved` hook of each call it admitted that its
client reset before the handler ran (the server answers such a call itself, so no handler
counts it): the ingress counts those ModelInfer calls as failures, so that what clients sent
and what the ingress counted agree. Not a call that was answered first. Loopback port 0,
mutual TLS, a client that writes HTTP/2 frames: HEADERS, the request and RST_STREAM in one
write."""

import grpc
import hpack
from prometheus_client import generate_latest

from meshserve.common import http2_frames as h2
from meshserve.common.metrics import IngressMetrics, Metrics
from meshserve.ingress.service import MODEL_INFER, unserved_counter
from tests.integration.edge_servers import method
from tests.integration.test_http2_server import call_headers, raw_connection, settled
from tests.polling import until

CALLS = 20
CANCEL = 0x8  # RST_STREAM error code (RFC 9113 section 7)


async def test_calls_reset_before_their_handler_ran_are_told_to_the_hook(own):
    ran, told = [], []

    async def echo(request: bytes, context) -> bytes:
        ran.append(request)
        return request

    server, target = await own.start({"Echo": grpc.unary_unary_rpc_method_handler(echo)},
                                     unserved=lambda path, code: told.append((path, code)))
    reader, writer = await raw_connection(own, target)
    await settled(reader, writer)
    encoder = hpack.Encoder()
    try:
        frames = b""
        for index in range(CALLS):
            stream = 2 * index + 1
            frames += (h2.frame(h2.HEADERS, h2.END_HEADERS, stream, call_headers(encoder, "Echo"))
                       + h2.frame(h2.DATA, h2.END_STREAM, stream, h2.message(b"x"))
                       + h2.rst_stream(stream, CANCEL))
        answered = 2 * CALLS + 1  # answered, then reset: not counted
        frames += (h2.frame(h2.HEADERS, h2.END_HEADERS, answered, call_headers(encoder, "Echo"))
                   + h2.frame(h2.DATA, h2.END_STREAM, answered, h2.message(b"last")))
        writer.write(frames)
        await writer.drain()
        await until(lambda: b"last" in ran, 10, "the last call's handler")
        writer.write(h2.rst_stream(answered, CANCEL))
        await writer.drain()
        assert told == [(method("Echo"), grpc.StatusCode.CANCELLED)] * CALLS
        assert ran == [b"last"]
    finally:
        writer.close()


def test_the_ingress_counts_an_unserved_model_infer_as_a_failure():
    metrics = Metrics()
    count = unserved_counter(IngressMetrics(metrics))
    count(MODEL_INFER, grpc.StatusCode.DEADLINE_EXCEEDED)
    count(MODEL_INFER, grpc.StatusCode.CANCELLED)
    count("/inference.GRPCInferenceService/ModelMetadata", grpc.StatusCode.CANCELLED)
    text = generate_latest(metrics.registry).decode()
    failures = [line for line in text.splitlines()
                if line.startswith("nv_inference_request_failure{")]
    assert sorted(failures) == [
        'nv_inference_request_failure{model="",protocol="grpc",reason="CANCELLED",'
        'version=""} 1.0',
        'nv_inference_request_failure{model="",protocol="grpc",reason="DEADLINE_EXCEEDED",'
        'version=""} 1.0']
