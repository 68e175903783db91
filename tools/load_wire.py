"""How the load generator speaks gRPC: its channel, the one request it sends (built from the
model's metadata, serialized once), an `id` appended to those bytes without re-encoding them,
and the status-code name an error is counted under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from meshserve.common import wire
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.load_spec import LoadSpec
from meshserve.tools.random_requests import random_request

SERVICE = "/inference.GRPCInferenceService/"
_METADATA_TIMEOUT_S = 10.0
ID_FIELD = pb.ModelInferRequest.ID_FIELD_NUMBER


def with_id(serialized: bytes, request_id: str) -> bytes:
    """A serialized ModelInferRequest with ``id`` set, without re-encoding the payload.

    Appends field 3 (``id``); for a singular field the last occurrence wins when parsed.
    """
    return serialized + wire.length_delimited(ID_FIELD, request_id.encode())


def stream_error_code(message: str) -> str:
    """Status code name an in-stream ``error_message`` starts with, else ``UNKNOWN``."""
    head = message.split(":", 1)[0].strip().upper()
    return head if head in grpc.StatusCode.__members__ and head != "OK" else "UNKNOWN"


def code_name(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def channel_for(spec: LoadSpec) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    if spec.ca is None:
        return grpc.aio.insecure_channel(spec.target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(spec.ca).read_bytes(),
        private_key=Path(spec.key).read_bytes() if spec.key else None,
        certificate_chain=Path(spec.cert).read_bytes() if spec.cert else None,
    )
    if spec.server_name:
        options += [
            ("grpc.ssl_target_name_override", spec.server_name),
            ("grpc.default_authority", spec.server_name),
        ]
    return grpc.aio.secure_channel(spec.target, credentials, options=options)


def metadata_of(spec: LoadSpec) -> tuple[tuple[str, str], ...]:
    return tuple((key.lower(), value) for key, value in spec.headers)


async def fetch_request(channel: grpc.aio.Channel, spec: LoadSpec) -> bytes:
    method = channel.unary_unary(
        SERVICE + "ModelMetadata",
        request_serializer=pb.ModelMetadataRequest.SerializeToString,
        response_deserializer=pb.ModelMetadataResponse.FromString,
    )
    try:
        metadata = await method(
            pb.ModelMetadataRequest(name=spec.model, version=spec.version),
            metadata=metadata_of(spec),
            timeout=_METADATA_TIMEOUT_S,
        )
    except grpc.RpcError as error:
        details = error.details() if hasattr(error, "details") else str(error)
        raise RuntimeError(
            f"ModelMetadata for {spec.model!r} at {spec.target} failed: "
            f"{code_name(error)}: {details}"
        ) from None
    request, _ = random_request(metadata, spec.batch, model=spec.model, version=spec.version)
    return request.SerializeToString()


async def request_bytes(spec: LoadSpec) -> bytes:
    channel = channel_for(spec)
    try:
        return await fetch_request(channel, spec)
    finally:
        await channel.close(grace=None)
