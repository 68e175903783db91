"""Events of the ingress recorded in the control plane's audit log: denied calls, sampled by
the gate, and changes of the log and trace settings.

Recording never holds up the answer to the caller: each event is sent in a task of its own
on one long-lived channel, at most `max_pending` at a time; beyond that (the control plane
slow or away) events are dropped, counted, and a warning is logged once.
"""

import asyncio
import logging

import grpc

from meshserve.common.audit_client import record_async
from meshserve.common.tls import TlsFiles, secure_channel

log = logging.getLogger(__name__)

DENIED = "request.denied"
LOG_SETTINGS_CHANGED = "logging.changed"
TRACE_SETTINGS_CHANGED = "tracing.changed"


class AuditEvents:
    """`record(action, principal, reason)`; called, an `on_denied(principal, action, model,
    reason)` hook for the ingress's gate."""

    def __init__(self, control_plane: str, tls: TlsFiles, identity: str = "control-plane",
                 max_pending: int = 64) -> None:
        self._channel = secure_channel(control_plane, tls, identity)
        self._max_pending = max_pending
        self._pending: set[asyncio.Task] = set()
        self.dropped = 0

    def __call__(self, principal: str, action: str, model: str, reason: str) -> None:
        self.record(DENIED, principal, f"{reason}: {action or '-'} on {model or '-'}")

    def record(self, action: str, principal: str, reason: str) -> None:
        if len(self._pending) >= self._max_pending:
            if not self.dropped:
                log.warning("the audit log is falling behind; dropping events")
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._record(action, principal, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, action: str, principal: str, reason: str) -> None:
        try:
            await record_async(self._channel, action, principal, reason=reason)
        except grpc.aio.AioRpcError as error:
            log.warning("could not record %s in the audit log: %s %s", action,
                        error.code().name, error.details())

    async def close(self) -> None:
        """Give events in flight a moment, then close the channel."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        await self._channel.close()
