"""Record a security event in the control plane's audit log (admin RPC `RecordEvent`).

    from meshserve.common.audit_client import record, record_async
    record("127.0.0.1:7000", tls, "token.issue", "client/alice", "ttl 3600 s")   # a CLI
    await record_async(channel, "ingress.denied", "mlp", "quota exceeded")     # a service

The actor recorded is the caller's certificate identity; the control plane accepts events
from the ingress and from operators' client certificates.
"""

import asyncio

import grpc

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub


async def record_async(channel: grpc.aio.Channel, action: str, subject: str, reason: str = "",
                       details: str = "", timeout: float = 5.0) -> pb.AuditEntry:
    """Record on an open channel to the control plane (one the caller keeps)."""
    return await AdminStub(channel).RecordEvent(
        pb.AuditEvent(action=action, subject=subject, reason=reason, details=details),
        timeout=timeout)


def record(address: str, tls: TlsFiles, action: str, subject: str, reason: str = "",
           details: str = "", timeout: float = 5.0) -> pb.AuditEntry:
    """Record one event over a channel of its own (for command-line tools)."""

    async def once() -> pb.AuditEntry:
        async with secure_channel(address, tls, "control-plane") as channel:
            return await record_async(channel, action, subject, reason, details, timeout)

    return asyncio.run(once())
