"""Waiting for what a test means, bounded: a condition polled until it holds, never a fixed
sleep before an assertion."""

import asyncio
import inspect
import os
import signal
import time
from pathlib import Path


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


def stopped(pid: int) -> bool:
    """Whether no thread of process `pid` can run: each is stopped (state T in /proc), or has
    exited and is not reaped yet (Z, X)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
        except OSError:  # the thread has just exited
            continue
    return bool(states) and all(state in "TtZX" for state in states)


def suspend(pid: int, seconds: float = 10.0) -> None:
    """SIGSTOP `pid`, and return once every one of its threads has stopped. The kernel stops a
    process only when one of its threads takes the signal, and until then the others run on:
    a call sent right after `os.kill` may still be answered."""
    os.kill(pid, signal.SIGSTOP)
    until_sync(lambda: stopped(pid), seconds, f"process {pid} stopped", interval=0.005)
