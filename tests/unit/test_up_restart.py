"""How long `meshserve up` waits before restarting a service that exited: doubling from 0.5 s
up to 30 s while it keeps failing, and from 0.5 s again once it had run for 10 minutes."""

import pytest

from meshserve.tools.up import BACKOFF_RESET_S, restart_wait


@pytest.mark.parametrize(("previous", "ran_for", "wait"), [
    (None, 1.0, 0.5),                   # the first restart
    (0.5, 1.0, 1.0),                    # failing again at once: twice as long
    (16.0, 1.0, 30.0),                  # at most 30 s
    (30.0, 5.0, 30.0),
    (30.0, BACKOFF_RESET_S - 1, 30.0),  # ran a while, not long enough
    (30.0, BACKOFF_RESET_S, 0.5),       # ran 10 minutes: a new crash, not the old one
    (4.0, 3 * 3600.0, 0.5),             # a crash hours after the last
])
def test_restart_waits(previous, ran_for, wait):
    assert restart_wait(previous, ran_for) == wait
