"""The bare call: the reference every CPU budget of `meshserve bench budget` is a multiple of.

A `grpc.aio` server on uvloop, with the services' server options and mutual-TLS credentials
(the same kind of certificate, reloaded the same way), whose only method,
``inference.GRPCInferenceService/ModelInfer``, answers every call with the same bytes: a
ModelInferResponse of one FP32 output [1, 10] (a demo model's answer to one row). It neither
parses the request nor builds the answer, so its CPU per call is gRPC's own per-call cost.

    python -m meshserve.tools.budget_bare --tls-dir DIR --identity ingress --port-file FILE

serves on 127.0.0.1 (any free port, written to FILE) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc
import uvloop

from meshserve.common.runtime import write_port_file
from meshserve.common.server import SERVER_OPTIONS
from meshserve.common.tls import TlsFiles, server_credentials
from meshserve.protocol import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
HOST = "127.0.0.1"


def constant_answer() -> bytes:
    """The serialized answer: one FP32 [1, 10] output of zeros, as a demo model gives."""
    output = pb.ModelInferResponse.InferOutputTensor(name="OUTPUT__0", datatype="FP32",
                                                     shape=[1, 10])
    return pb.ModelInferResponse(model_name="bare", model_version="1", outputs=[output],
                                 raw_output_contents=[bytes(40)]).SerializeToString()


def build_server(tls: TlsFiles) -> tuple[grpc.aio.Server, int]:
    """The bare server bound to a free loopback port (not started) and that port."""
    answer = constant_answer()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})  # bytes in, bytes out
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(f"{HOST}:0", server_credentials(tls))
    if port == 0:
        raise OSError(f"could not bind {HOST}:0")
    return server, port


async def serve_until_signalled(server: grpc.aio.Server, port: int, port_file: Path) -> None:
    """Start `server`, write its `port` to `port_file`, and serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    write_port_file(port_file, port)
    await stop.wait()
    await server.stop(None)


async def serve(tls: TlsFiles, port_file: Path) -> None:
    await serve_until_signalled(*build_server(tls), port_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve.tools.budget_bare",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tls-dir", type=Path, required=True,
                        help="the mesh's certificates (IDENTITY.crt, IDENTITY.key, ca.crt)")
    parser.add_argument("--identity", default="ingress",
                        help="whose certificate the server presents (default ingress)")
    parser.add_argument("--port-file", type=Path, required=True,
                        help="write the bound port here once serving")
    args = parser.parse_args(argv)
    uvloop.run(serve(TlsFiles.for_identity(args.tls_dir, args.identity), args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
