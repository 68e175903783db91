"""The ingress counts a call whose caller left before its answer: DEADLINE_EXCEEDED when the
call's deadline passed, CANCELLED when the client cancelled it. In process, over real TLS, with
a router that accepts connections and never answers, so every call waits at the ingress."""

import asyncio

import grpc
import pytest
from prometheus_client import generate_latest

from meshserve.common.metrics import Metrics
from meshserve.common.tls import TlsFiles, channel_credentials
from meshserve.ingress.service import IngressSettings, build_service
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.certs import init_certs

CONFIG = """name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def request() -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="mlp")
    message.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(b"\0" * 16)
    return message


@pytest.fixture
async def stub(tmp_path):
    init_certs(tmp_path / "tls")
    (tmp_path / "models" / "mlp" / "1").mkdir(parents=True)
    (tmp_path / "models" / "mlp" / "config.pbtxt").write_text(CONFIG)
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    router = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    metrics = Metrics()
    service = build_service(IngressSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tmp_path / "tls", "ingress"),
        repository=tmp_path / "models", router=router, require_client_cert=True), metrics)
    port = await service.start()
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(
        TlsFiles.for_identity(tmp_path / "tls", "client")),
        options=[("grpc.ssl_target_name_override", "ingress")])
    try:
        yield GRPCInferenceServiceStub(channel), metrics
    finally:
        await channel.close()
        await service.stop(0.5)
        silent.close()


def failures(metrics: Metrics, reason: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("nv_inference_request_failure{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def until(check, seconds: float = 10.0) -> None:
    for _ in range(int(seconds * 50)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not in time")


async def test_calls_whose_caller_left_are_counted(stub):
    stub, metrics = stub
    calls = [stub.ModelInfer(request(), timeout=0.3) for _ in range(3)]
    codes = [error.code() for error in await asyncio.gather(*calls, return_exceptions=True)]
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    await until(lambda: failures(metrics, "DEADLINE_EXCEEDED") == 3)

    cancelled = stub.ModelInfer(request(), timeout=30)
    await asyncio.sleep(0.3)  # at the ingress, waiting on the router
    cancelled.cancel()
    await until(lambda: failures(metrics, "CANCELLED") == 1)
    assert failures(metrics, "DEADLINE_EXCEEDED") == 3
