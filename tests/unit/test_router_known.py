"""Which models the router may make a route for (meshserve.router.known): those the control
plane's last answer listed; a model it did not list is asked about again at most every
`recheck` seconds, one question at a time, and waited for no longer than the caller can."""

import asyncio

from meshserve.router.known import KnownModels


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ControlPlane:
    """Answers each question with `models`, after `answered` is set when `hold` is."""

    def __init__(self, models: list[str], hold: bool = False) -> None:
        self.models = models
        self.asked = 0
        self.fails = False
        self.answered = asyncio.Event()
        if not hold:
            self.answered.set()

    async def __call__(self) -> list[str]:
        self.asked += 1
        await self.answered.wait()
        if self.fails:
            raise ConnectionError("control plane away")
        return list(self.models)


async def test_a_listed_model_is_known_at_once_and_an_unlisted_one_asked_about_rarely():
    clock, control = Clock(), ControlPlane(["mlp"])
    known = KnownModels(control, clock, recheck=1.0)
    known.heard(["mlp", "cnn"])
    assert await known.knows("mlp", 5.0)
    assert not await known.knows("nosuch", 5.0)  # the answer is fresh: not asked again
    assert control.asked == 0
    clock.now += 1.5
    for _ in range(100):  # a stale answer: asked once, then fresh again
        assert not await known.knows("nosuch", 5.0)
    assert control.asked == 1
    assert known.names == frozenset({"mlp"})  # the new answer replaced the old one


async def test_a_model_given_its_policy_since_the_last_answer_is_found_by_asking():
    clock, control = Clock(), ControlPlane(["mlp", "fresh"])
    known = KnownModels(control, clock, recheck=1.0)
    known.heard(["mlp"])
    clock.now += 1.0
    assert await known.knows("fresh", 5.0)
    assert control.asked == 1


async def test_callers_share_one_question_and_wait_no_longer_than_they_may():
    clock, control = Clock(), ControlPlane(["mlp"], hold=True)
    known = KnownModels(control, clock)
    waiting = [asyncio.ensure_future(known.knows("mlp", 5.0)) for _ in range(10)]
    assert not await known.knows("mlp", 0.01)  # gave up; the question goes on
    control.answered.set()
    assert await asyncio.gather(*waiting) == [True] * 10
    assert control.asked == 1


async def test_before_any_answer_or_while_the_control_plane_is_away_nothing_is_known():
    clock, control = Clock(), ControlPlane(["mlp"])
    control.fails = True
    known = KnownModels(control, clock, recheck=1.0)
    assert not await known.knows("mlp", 5.0)
    assert known.names is None
    assert not await known.knows("mlp", 5.0)  # asked in vain a moment ago: not again yet
    assert control.asked == 1
    control.fails = False
    clock.now += 1.0
    assert await known.knows("mlp", 5.0)
