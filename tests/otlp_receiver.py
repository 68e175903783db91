"""A local OTLP/gRPC trace receiver for tests: a real gRPC server (plaintext, loopback) that
answers `TraceService/Export` and keeps every span with its resource's `service.name`.

It decodes with meshserve's own OTLP messages (`otlp_trace_pb2`): tests/unit/test_otlp.py
shows that they are byte-for-byte what the OpenTelemetry exporter sends.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from meshserve.common.otlp import EXPORT_METHOD
from meshserve.protocol import otlp_trace_pb2 as pb

SERVICE, METHOD = EXPORT_METHOD.strip("/").split("/")


class Receiver:
    """What the receiver was sent. `answer`, when set, decides each call instead: return a
    gRPC status code to refuse it with, or None to accept it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, pb.Span]] = []
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.answer: Callable[[int], grpc.StatusCode | None] | None = None
        self._lock = threading.Lock()

    def export(self, request: pb.ExportTraceServiceRequest, context):
        with self._lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            refusal = self.answer(self.calls) if self.answer else None
            if refusal is None:
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value
                                  for a in resource_spans.resource.attributes}
                    for scope in resource_spans.scope_spans:
                        self.spans.extend((attributes.get("service.name", ""), span)
                                          for span in scope.spans)
        if refusal is not None:
            context.abort(refusal, "refused by the test")
        return pb.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, pb.Span]]:
        with self._lock:
            return [(service, span) for service, span in self.spans
                    if span.trace_id == trace_id]

    def names(self) -> set[str]:
        with self._lock:
            return {span.name for _, span in self.spans}


@contextlib.contextmanager
def receiving() -> Iterator[tuple[Receiver, int]]:
    """A started receiver on a free loopback port: (what it got, the port)."""
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(
        receiver.export, request_deserializer=pb.ExportTraceServiceRequest.FromString,
        response_serializer=pb.ExportTraceServiceResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)
