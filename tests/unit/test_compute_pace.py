"""Where compute runs its next batch: on the event loop while batches are quick (below
INLINE_BELOW_S, a tenth of a second), on its worker thread once they are slow."""

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
