"""Where compute runs its next batch: on the event loop while batches are quick (below
INLINE_BELOW_S, a tenth of a second), on its worker thread once they are slow; and when: on
the loop, only once the answers of the batches before it have been written."""

import asyncio

from meshserve.compute.service import INLINE_BELOW_S, Pace


def test_the_first_batch_runs_on_the_worker_thread():
    assert not Pace().inline()  # nothing is known of the model yet


def test_quick_batches_run_on_the_loop_and_slow_ones_on_the_worker():
    pace = Pace()
    pace.took(0.012)  # a cnn batch of 4 on 2 cores
    assert pace.inline()
    for _ in range(30):
        pace.took(0.25)
    assert pace.seconds > INLINE_BELOW_S and not pace.inline()
    for _ in range(30):
        pace.took(0.05)
    assert pace.inline()


def test_nothing_runs_on_the_loop_while_the_worker_runs_a_batch():
    pace = Pace()
    pace.took(0.001)
    pace.running = 1
    assert not pace.inline()


async def test_a_batch_runs_on_the_loop_only_once_the_answer_before_it_is_written():
    """Two batches read from the stream together: the first one's answer, written on the
    loop's next turn (as the connection writes), leaves before the second batch runs."""
    pace = Pace()
    loop = asyncio.get_running_loop()
    events: list[str] = []

    async def batch(name: str) -> None:
        await pace.turn()
        events.append(f"run {name}")
        pace.took(0.002)
        loop.call_soon(events.append, f"answer {name} written")

    await asyncio.gather(batch("first"), batch("second"))
    await asyncio.sleep(0)
    assert events == ["run first", "answer first written", "run second",
                      "answer second written"]
