"""Logs never hold payloads or tokens: after requests that succeed, fail validation, fail in
compute, are refused by the policy and go through the asynchronous API, every log that
`meshserve up` and its services wrote is searched for the token and the payload's bytes in
every form a log could carry them (raw, hex, base64, the decoded numbers)."""

import base64
import re

import grpc
import numpy
import pytest

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.async_inference_pb2 import ResultRequest
from meshserve.protocol.async_inference_pb2_grpc import AsyncInferenceStub
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.tokens import issue
from tests.polling import until_sync

MARKER = b"PAYLOAD-MARKER-7f3a9c1e"  # ASCII: every float32 it makes is positive
TIMEOUT_S = 30


def payload(floats: int) -> bytes:
    raw = (MARKER * (floats * 4 // len(MARKER) + 1))[: floats * 4]
    assert MARKER in raw
    return raw


def request(model: str, version: str, floats: int, shape: list[int]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="INPUT__0", datatype="FP32", shape=shape)
    message.raw_input_contents.append(payload(floats))
    return message


def typed(model: str, floats: int, shape: list[int]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    tensor = message.inputs.add(name="INPUT__0", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(numpy.frombuffer(payload(floats), numpy.float32))
    return message


def forms_of_secrets(token: str) -> dict[str, bytes]:
    """What must never appear in a log, by what it is."""
    raw = payload(256)
    first = float(numpy.frombuffer(raw[:4], numpy.float32)[0])
    forms = {"token": token.encode(), "token signature": token.split(".")[2].encode(),
             "payload": MARKER, "payload hex": MARKER.hex().encode(),
             "payload base64": base64.b64encode(raw)[:40],
             "payload as a number": repr(first).encode(),
             "payload as a short number": f"{first:.6g}".encode()}
    for shift in range(3):  # base64 of the marker at each alignment
        forms[f"payload base64/{shift}"] = base64.b64encode(b"\0" * shift + MARKER)[4:28]
    return forms


@pytest.fixture(scope="module")
def token(mesh) -> str:
    return issue(mesh.data_dir / "auth", "app/hygiene", 600, models=["mlp", "flaky"])


def exercise(mesh, token: str) -> list[str]:
    """Requests of every kind; each answer is what it should be. Returns the error ids the
    INTERNAL answers name (their stack traces are logged under them)."""
    port = int((mesh.data_dir / "run" / "ingress.token-port").read_text())
    credentials = grpc.ssl_channel_credentials((mesh.tls / "ca.crt").read_bytes())
    bearer = [("authorization", f"Bearer {token}")]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request("mlp", "", 256, [1, 256]), metadata=bearer,
                                timeout=TIMEOUT_S)
        assert list(reply.outputs[0].shape) == [1, 10]
        stub.ModelInfer(typed("mlp", 256, [1, 256]), metadata=bearer, timeout=TIMEOUT_S)
        failures = [
            (request("mlp", "", 256, [1, 128]), bearer, grpc.StatusCode.INVALID_ARGUMENT),
            (request("flaky", "2", 8, [1, 8]), bearer, grpc.StatusCode.INTERNAL),
            (request("cnn", "", 256, [1, 256]), bearer, grpc.StatusCode.PERMISSION_DENIED),
            (request("mlp", "", 256, [1, 256]), [("authorization", f"Bearer {token}x")],
             grpc.StatusCode.UNAUTHENTICATED),
        ]
        error_ids = []
        for message, metadata, code in failures:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(message, metadata=metadata, timeout=TIMEOUT_S)
            assert caught.value.code() == code, caught.value.details()
            assert token not in caught.value.details()
            assert MARKER.decode() not in caught.value.details()
            error_ids += re.findall(r"internal error \(id ([0-9a-f]+)\)", caught.value.details())
        submissions = AsyncInferenceStub(channel)
        submitted = submissions.Submit(request("mlp", "", 256, [1, 256]), metadata=bearer,
                                       timeout=TIMEOUT_S)
        result = submissions.Result(ResultRequest(id=submitted.id, wait_ms=20_000),
                                    metadata=bearer, timeout=TIMEOUT_S)
        assert result.response.outputs[0].shape == [1, 10], result
    return error_ids


def test_no_log_holds_a_token_or_payload(mesh, token):
    error_ids = exercise(mesh, token)
    assert error_ids  # the failure in compute came back as an id, its trace went to a log
    logs = [*sorted((mesh.data_dir / "run").glob("*.log")),
            mesh.data_dir.parent / f"{mesh.data_dir.name}-up.log"]
    assert len(logs) > 10

    def logged(text: str) -> bool:
        return any(text.encode() in path.read_bytes() for path in logs)

    # The lines about these requests are written: the denials, and each internal error.
    until_sync(lambda: logged("app/hygiene") and all(logged(f"internal error {error_id}")
                                                       for error_id in error_ids),
               TIMEOUT_S, "the lines about these requests")
    found = [(path.name, what) for path in logs for what, secret in
             forms_of_secrets(token).items() if secret in path.read_bytes()]
    assert found == []
