"""Waiting for what a test means, bounded: a condition polled until it holds, never a fixed
sleep before an assertion."""

import asyncio
import inspect
import time


async def until(check, seconds: float, what: str = "the condition",
                interval: float = 0.02) -> float:
    """Seconds until `check()` (a function or a coroutine function) is true; AssertionError
    naming `what` once `seconds` have passed without it."""
    started = time.monotonic()
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(interval)


def until_sync(check, seconds: float, what: str = "the condition",
               interval: float = 0.05) -> float:
    """`until` for code without an event loop."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(interval)
    return time.monotonic() - started
