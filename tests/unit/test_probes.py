"""The kubelet's HTTP probes: `/readyz` is the health servicer's "" status, `/livez` the
event loop's heartbeat (fake clock), served over a real socket."""

import asyncio
import threading
import time
import urllib.error
import urllib.request

import pytest

from meshserve.common.probes import STALE_S, Heartbeat, liveness, readiness, serve_probes
from meshserve.common.server import HealthServicer

WAIT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_liveness_fails_once_the_heartbeat_is_stale():
    clock = Clock()
    heartbeat = Heartbeat(clock)
    clock.now += STALE_S
    assert liveness(heartbeat) == (200, "ok")
    clock.now += 2.5
    assert liveness(heartbeat) == (503, f"event loop has not run for 7.5 s (limit {STALE_S:g} s)")
    heartbeat.beat()
    assert liveness(heartbeat) == (200, "ok")


def test_readiness_is_the_serving_status():
    assert readiness(lambda: True) == (200, "SERVING")
    assert readiness(lambda: False) == (503, "NOT_SERVING")


@pytest.fixture
def loop_thread():
    """An event loop running in a thread of its own, as a service's loop does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def test_probes_over_http_follow_health_and_a_wedged_loop(loop_thread):
    clock = Clock()
    heartbeat = Heartbeat(clock)
    beating = asyncio.run_coroutine_threadsafe(heartbeat.keep(interval=0.01), loop_thread)
    health = HealthServicer(["inference.GRPCInferenceService"])
    server = serve_probes("127.0.0.1:0", health.serving, heartbeat)
    try:
        assert get(server.port, "/readyz") == (503, "NOT_SERVING\n")
        health.set(True)
        assert get(server.port, "/readyz") == (200, "SERVING\n")
        health.set(False, "inference.GRPCInferenceService")  # only "" counts
        assert get(server.port, "/readyz?verbose") == (200, "SERVING\n")
        assert get(server.port, "/livez") == (200, "ok\n")
        assert get(server.port, "/metrics")[0] == 404

        # Wedge the loop (a callback that does not return), then let time pass.
        release = threading.Event()
        loop_thread.call_soon_threadsafe(release.wait, WAIT_S)
        clock.now += STALE_S + 1
        status, text = get(server.port, "/livez")
        assert status == 503 and "event loop has not run for" in text
        assert get(server.port, "/readyz")[0] == 200  # readiness is not liveness

        release.set()  # the loop runs again: its next beat makes it live
        deadline = time.monotonic() + WAIT_S
        while get(server.port, "/livez")[0] != 200:
            assert time.monotonic() < deadline, "liveness did not recover"
            time.sleep(0.01)
    finally:
        beating.cancel()
        server.close()


def test_probes_listen_on_ipv6_too():
    """Charts on IPv6-only clusters set listenHost "[::]"."""
    server = serve_probes("[::1]:0", lambda: True, Heartbeat())
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/readyz", timeout=5) as reply:
            assert (reply.status, reply.read()) == (200, b"SERVING\n")
    finally:
        server.close()
