"""Health for the kubelet: plain HTTP `/livez` and `/readyz` on a port of their own.

Every serving port speaks only mutual TLS, which the kubelet's native probes cannot; running
`meshserve health` in the container instead costs a Python start per probe. So each service
can also answer (`--health-listen HOST:PORT`) two GETs that carry no data and accept nothing:

- `/readyz`: 200 `SERVING` when the service's `grpc.health.v1` status for the whole server
  ("") is SERVING, else 503 `NOT_SERVING`: exactly what a Check over mutual TLS answers
  (compute: loaded and warm; draining: not ready; an upstream lost: not ready);
- `/livez`: 200 while the event loop runs. The server answers from a thread of its own, so it
  cannot tell a wedged loop by being able to answer: the loop keeps a heartbeat (a task that
  notes the time every BEAT_S) and `/livez` is 503 once the last beat is older than STALE_S.
  A stopped process (SIGSTOP) answers nothing, and the probe times out. An upstream outage
  leaves liveness alone: restarting would not bring the upstream back.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from meshserve.common.metrics import HttpListener, split_address

BEAT_S = 1.0
# A loop that has not run for this long is wedged: no healthy callback takes seconds.
STALE_S = 5.0
# One request at a time, each answered at once: a client that sends nothing is dropped after
# this (only the node reaches this port; the NetworkPolicy admits no pod to it).
REQUEST_TIMEOUT_S = 2.0


class Heartbeat:
    """When the event loop last ran a beat; read from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def silence(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    async def keep(self, interval: float = BEAT_S) -> None:
        """Beat every `interval` seconds for as long as the loop runs this task."""
        while True:
            self.beat()
            await asyncio.sleep(interval)


def liveness(heartbeat: Heartbeat, stale_after: float = STALE_S) -> tuple[int, str]:
    silence = heartbeat.silence()
    if silence > stale_after:
        return 503, f"event loop has not run for {silence:.1f} s (limit {stale_after:g} s)"
    return 200, "ok"


def readiness(serving: Callable[[], bool]) -> tuple[int, str]:
    return (200, "SERVING") if serving() else (503, "NOT_SERVING")


@dataclass(frozen=True)
class ProbeEndpoint:
    """Where a service answers `/livez` and `/readyz` (`listen` empty: nowhere)."""

    listen: str = ""
    port_file: Path | None = None


def serve_probes(address: str, serving: Callable[[], bool], heartbeat: Heartbeat,
                 stale_after: float = STALE_S) -> HttpListener:
    """Answer `/livez` and `/readyz` on http://ADDRESS; port 0 picks a free port (`.port`).
    `serving()` is the service's readiness (its health servicer's "" status)."""
    routes = {"/livez": lambda: liveness(heartbeat, stale_after),
              "/readyz": lambda: readiness(serving)}

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 — http.server's naming
            answer = routes.get(self.path.split("?", 1)[0])
            status, text = (404, "only /livez and /readyz") if answer is None else answer()
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 — probes are not logged
            pass

    host, port = split_address(address)

    class Server(HTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "[::]" too

    server = Server((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="probes", daemon=True)
    thread.start()
    return HttpListener(server, thread)
