"""A peer that stops answering counts as not serving, whatever its Watch last said, until it
answers again (`meshserve.common.liveness`), with a scripted check and short intervals."""

import asyncio
import contextlib

from meshserve.common.liveness import REASON_LIMIT, Standing, keep_checking
from meshserve.protocol.health_pb2 import HealthCheckResponse
from tests.polling import until

EVERY_S = 0.01
WAIT_S = 5.0


class Peer:
    """Answers each check while `up`; counts the checks it was sent."""

    def __init__(self) -> None:
        self.up = True
        self.checks = 0
        self.timeouts: list[float] = []

    async def check(self, timeout: float) -> bool:
        self.checks += 1
        self.timeouts.append(timeout)
        return self.up


def following(peer: Peer, standing: Standing, seen: list[bool]) -> asyncio.Task:
    """keep_checking `peer`, each change of `standing.serving` appended to `seen`."""
    return asyncio.create_task(keep_checking(
        peer.check, standing, lambda: seen.append(standing.serving), EVERY_S, 0.5))


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_serving_needs_both_the_watch_and_an_answer():
    assert Standing(watched=True).serving
    assert not Standing().serving
    assert not Standing(watched=True, answers=False).serving
    assert not Standing(watched=False, answers=True).serving


def test_a_watch_that_says_why_a_peer_is_not_serving_is_kept_bounded():
    standing = Standing()
    standing.heard(HealthCheckResponse(status=HealthCheckResponse.NOT_SERVING,
                                       reason="refused: " + "x" * 1000))
    assert not standing.watched
    assert standing.reason == ("refused: " + "x" * 1000)[:REASON_LIMIT]
    standing.heard(HealthCheckResponse(status=HealthCheckResponse.SERVING, reason="stale"))
    assert (standing.watched, standing.reason) == (True, "")
    standing.heard(HealthCheckResponse(status=HealthCheckResponse.NOT_SERVING))
    assert (standing.watched, standing.reason) == (False, "")  # loading: nothing to say
    standing.heard(HealthCheckResponse(status=HealthCheckResponse.NOT_SERVING, reason="why"))
    standing.heard(None)  # the Watch ended: the peer says nothing more
    assert (standing.watched, standing.reason) == (False, "")


async def test_a_peer_that_stops_answering_is_not_serving_until_it_answers_again():
    peer, standing, seen = Peer(), Standing(watched=True), []
    task = following(peer, standing, seen)
    try:
        await until(lambda: peer.checks >= 2, WAIT_S, "checks of a serving peer")
        assert seen == [] and standing.serving
        peer.up = False
        await until(lambda: not standing.serving, WAIT_S, "not serving once it stopped")
        assert seen == [False]
        peer.up = True
        await until(lambda: standing.serving, WAIT_S, "serving once it answers again")
        assert seen == [False, True]
        assert set(peer.timeouts) == {0.5}
    finally:
        await stop(task)


async def test_a_peer_its_watch_calls_not_serving_is_not_checked():
    peer, standing, seen = Peer(), Standing(watched=False), []
    task = following(peer, standing, seen)
    try:
        await asyncio.sleep(EVERY_S * 10)
        assert peer.checks == 0
        standing.watched = True
        await until(lambda: peer.checks >= 1, WAIT_S, "checks once the watch says serving")
    finally:
        await stop(task)


async def test_a_peer_that_missed_a_check_is_checked_even_when_its_watch_ended():
    # Its Watch ends (gRPC's keepalive gives up on the connection) while it is stopped: it is
    # still checked, so that its return is seen once its Watch says serving again.
    peer, standing, seen = Peer(), Standing(watched=True), []
    peer.up = False
    task = following(peer, standing, seen)
    try:
        await until(lambda: not standing.answers, WAIT_S, "the missed check")
        standing.watched = False
        checks = peer.checks
        await until(lambda: peer.checks > checks, WAIT_S, "checks after the watch ended")
        peer.up = True
        await until(lambda: standing.answers, WAIT_S, "the answer")
        assert not standing.serving  # until its Watch says so
    finally:
        await stop(task)
