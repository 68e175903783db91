"""The control plane's core: registration, policy changes, live windows and canaries."""

import asyncio
import collections
import contextlib
import time
from pathlib import Path

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.mesh.canary import CanaryPlan
from meshserve.mesh.control import ControlPlane, plan_dict
from meshserve.mesh.live import Window
from meshserve.mesh.policy import Endpoint, Shadow, TrafficPolicy
from meshserve.mesh.resources import CLUSTER, ENDPOINTS, ROUTE
from meshserve.mesh.snapshot import Snapshot
from meshserve.mesh.store import Store
from meshserve.mesh.store_policies import PolicyChanged
from tests.polling import until

E1 = Endpoint("mlp", "1", "10.0.0.1:8001")
E1B = Endpoint("mlp", "1", "10.0.0.2:8001")
E2 = Endpoint("mlp", "2", "10.0.0.3:8001")
E3 = Endpoint("mlp", "3", "10.0.0.4:8001")
BOUNDS = (5.0, 10.0)
TICK = 0.05
WAIT = 4.0


@contextlib.asynccontextmanager
async def plane(tmp_path: Path, read=None, tick: float = TICK, endpoints=(E1, E2),
                counts_lag: float = 0.0):
    control = ControlPlane(Store.open(tmp_path / "x.db"), read_counters=read, tick_seconds=tick,
                           counts_lag=counts_lag)
    sampler = None
    try:
        for endpoint in endpoints:
            control.register(endpoint, "alice")
        if read is not None:
            sampler = asyncio.create_task(control.sample_batchers())
        yield control
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(sampler, WAIT)
        await control.close()


def served(control: ControlPlane) -> str:
    return control.cache.snapshot.version


def assert_serves(control: ControlPlane) -> None:
    """The served snapshot is the one the store's state makes."""
    assert served(control) == Snapshot.of(control.store.state()).version


async def test_register_first_version_gets_all_traffic_later_ones_none(tmp_path):
    async with plane(tmp_path, endpoints=()) as control:
        empty = served(control)
        control.register(E1, "alice")
        assert control.policy("mlp") == TrafficPolicy("mlp", {"1": 100})
        first = served(control)
        assert first != empty
        control.register(E1B, "alice")  # same version, another batcher: policy unchanged
        assert control.policy("mlp") == TrafficPolicy("mlp", {"1": 100})
        second = served(control)
        assert second != first
        control.register(E1B, "alice")  # again: nothing changes
        assert served(control) == second
        control.register(E2, "bob")
        assert control.policy("mlp").weights == {"1": 100, "2": 0}
        assert_serves(control)
        assert sorted(control.cache.snapshot.resources[CLUSTER]) == ["mlp-v1", "mlp-v2"]
        reasons = [(e.actor, e.action, e.subject, e.reason) for e in control.store.audit()
                   if e.action == "policy.set"]
        assert reasons == [("alice", "policy.set", "mlp", "first version registered"),
                           ("bob", "policy.set", "mlp", "new version registered")]


async def test_register_keeps_shadow_and_region_when_adding_a_version(tmp_path):
    async with plane(tmp_path, endpoints=(E1, E2)) as control:
        control.set_policy(TrafficPolicy.from_json(
            '{"model": "mlp", "weights": {"1": 90, "2": 10}, "region": "local", '
            '"shadow": {"version": "2", "percent": 5.0}}'), "alice")
        control.register(E3, "alice")
        policy = control.policy("mlp")
        assert policy.weights == {"1": 90, "2": 10, "3": 0}
        assert (policy.shadow.version, policy.shadow.percent, policy.region) == ("2", 5.0,
                                                                                 "local")


async def test_unregister_removes_the_endpoint_from_the_snapshot(tmp_path):
    async with plane(tmp_path, endpoints=(E1, E1B)) as control:
        before = served(control)
        control.unregister(E1B, "alice")
        assert served(control) != before
        assignment = control.cache.snapshot.resources[ENDPOINTS]["mlp-v1"]
        assert b"10.0.0.2" not in assignment.value
        assert b"10.0.0.1" in assignment.value
        with pytest.raises(NotFound) as caught:
            control.unregister(E1B, "alice")
        assert caught.value.message == ("no endpoint of model 'mlp' version '1' at "
                                        "'10.0.0.2:8001'")


async def test_policy_of_an_unknown_model(tmp_path):
    async with plane(tmp_path) as control:
        with pytest.raises(NotFound) as caught:
            control.policy("bert")
        assert caught.value.message == "no traffic policy for model 'bert'"


async def test_set_weights_pin_and_rollback_change_the_served_snapshot(tmp_path):
    async with plane(tmp_path) as control:
        versions = [served(control)]
        assert control.set_weights("mlp", {"1": 90, "2": 10}, "alice", "ramp") == (
            TrafficPolicy("mlp", {"1": 90, "2": 10}))
        versions.append(served(control))
        assert control.store.policy("mlp").weights == {"1": 90, "2": 10}
        assert_serves(control)

        assert control.pin("mlp", "2", "bob").weights == {"1": 0, "2": 100}
        versions.append(served(control))
        assert control.store.policy("mlp").weights == {"1": 0, "2": 100}
        assert control.store.audit()[-1].reason == "pin to 2"
        assert_serves(control)

        assert control.rollback("mlp", "carol", "too fast").weights == {"1": 90, "2": 10}
        versions.append(served(control))
        assert control.store.policy("mlp").weights == {"1": 90, "2": 10}
        assert versions[3] == versions[1]  # the same state serves the same snapshot
        assert len(set(versions[:3])) == 3
        last = control.store.audit()[-1]
        assert (last.actor, last.action, last.reason) == ("carol", "policy.rollback",
                                                          "too fast")


# name, call, expected error type and message
REFUSED = [
    ("unknown version", lambda c: c.set_weights("mlp", {"3": 100}, "a"), InvalidArgument,
     "model 'mlp' has no version '3' (versions: 1, 2)"),
    ("bad sum", lambda c: c.set_weights("mlp", {"1": 50}, "a"), InvalidArgument,
     "weights of model 'mlp' sum to 50, not 100"),
    ("pin unknown", lambda c: c.pin("mlp", "9", "a"), InvalidArgument,
     "model 'mlp' has no version '9' (versions: 1, 2)"),
    ("weights of unknown model", lambda c: c.set_weights("bert", {"1": 100}, "a"), NotFound,
     "no traffic policy for model 'bert'"),
    ("roll back an unknown model", lambda c: c.rollback("bert", "a"), NotFound,
     "model 'bert' has no policy, so there is nothing to roll back"),
    ("set policy without an actor", lambda c: c.set_policy(
        TrafficPolicy("mlp", {"1": 50, "2": 50}, region="local"), ""),
     InvalidArgument, "actor must be a non-empty string"),
    ("region without endpoints", lambda c: c.set_policy(
        TrafficPolicy("mlp", {"1": 50, "2": 50}, region="eu-west1"), "a"), FailedPrecondition,
     "model 'mlp' has no endpoint in region 'eu-west1' (its endpoints are only in local): "
     "every request would fail; to set it before its endpoints register, force it (traffic "
     "region --force)"),
    ("region Istio cannot name", lambda c: c.set_policy(
        TrafficPolicy("mlp", {"1": 50, "2": 50}, region="EU West/1"), "a", force=True),
     InvalidArgument, "region 'EU West/1' is not a locality region name (at most 63 letters, "
     "digits, '-', '_' or '.', starting and ending with a letter or digit; for example "
     "eu-west1)"),
    ("changed since read", lambda c: c.set_policy(
        TrafficPolicy("mlp", {"1": 50, "2": 50}), "a",
        expected=TrafficPolicy("mlp", {"1": 0, "2": 100})), PolicyChanged,
     "the policy of model 'mlp' changed since it was read; read it again"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
async def test_refused_changes_leave_the_snapshot_alone(tmp_path, call, error, message):
    async with plane(tmp_path) as control:
        before = (served(control), control.store.policy("mlp"))
        with pytest.raises(error) as caught:
            call(control)
        assert caught.value.message == message
        assert (served(control), control.store.policy("mlp")) == before


async def test_rollback_with_no_earlier_policy_is_refused(tmp_path):
    async with plane(tmp_path, endpoints=(E1,)) as control:
        before = served(control)
        with pytest.raises(FailedPrecondition) as caught:
            control.rollback("mlp", "alice")
        assert caught.value.message == ("model 'mlp' has no earlier policy to roll back to: "
                                        "its history begins with the current one")
        assert served(control) == before


async def test_rollback_past_a_registration_keeps_the_version_routable(tmp_path):
    """Registering version 2 was the policy change a rollback undoes: the weights go back,
    version 2 stays (at 0 %), pinnable and served, and so does a version of the current
    policy the restored one did not know."""
    async with plane(tmp_path, endpoints=(E1, E2)) as control:
        control.set_weights("mlp", {"1": 90, "2": 10}, "alice")
        assert control.rollback("mlp", "bob").weights == {"1": 100, "2": 0}
        assert control.rollback("mlp", "bob").weights == {"1": 100, "2": 0}
        assert control.policy("mlp") == TrafficPolicy("mlp", {"1": 100, "2": 0})
        assert sorted(control.cache.snapshot.resources[CLUSTER]) == ["mlp-v1", "mlp-v2"]
        assert_serves(control)
        assert control.pin("mlp", "2", "bob").weights == {"1": 0, "2": 100}
        control.set_policy(TrafficPolicy("mlp", {"1": 50, "2": 25, "9": 25}), "bob")
        assert control.rollback("mlp", "bob").weights == {"1": 0, "2": 100, "9": 0}


async def test_a_new_policy_keeps_every_registered_version(tmp_path):
    async with plane(tmp_path, endpoints=(E1, E2)) as control:
        kept = control.set_policy(TrafficPolicy("mlp", {"1": 100}), "alice")
        assert kept == control.policy("mlp") == TrafficPolicy("mlp", {"1": 100, "2": 0})


async def test_the_same_policy_again_changes_nothing(tmp_path):
    async with plane(tmp_path, endpoints=(E1, E2)) as control:
        control.set_weights("mlp", {"1": 90, "2": 10}, "alice")
        before = (served(control), len(control.store.audit()))
        assert control.set_weights("mlp", {"1": 90, "2": 10}, "bob").weights == {"1": 90,
                                                                                  "2": 10}
        assert control.pin("mlp", "1", "bob") and control.pin("mlp", "1", "bob")
        assert len(control.store.audit()) == before[1] + 1  # the first pin only
        assert control.rollback("mlp", "bob").weights == {"1": 90, "2": 10}


async def test_a_region_without_endpoints_needs_force(tmp_path):
    async with plane(tmp_path, endpoints=(E1, E2)) as control:
        ahead = TrafficPolicy("mlp", {"1": 100, "2": 0}, region="eu-west1")
        assert control.set_policy(ahead, "alice", force=True) == ahead
        # In force already: other changes need no force.
        assert control.set_weights("mlp", {"2": 100}, "alice").region == "eu-west1"
        control.register(Endpoint("mlp", "1", "10.1.0.1:8001", region="eu-west2"), "alice")
        assert control.set_policy(TrafficPolicy("mlp", {"1": 100, "2": 0}, region="eu-west2"),
                                  "alice").region == "eu-west2"


async def test_set_policy_naming_a_version_without_endpoints_is_consistent(tmp_path):
    async with plane(tmp_path) as control:
        policy = TrafficPolicy("mlp", {"1": 50, "2": 25, "3": 25})
        assert control.set_policy(policy, "alice", "ahead of the rollout") == policy
        snapshot = control.cache.snapshot
        assert_serves(control)
        assert sorted(snapshot.resources[CLUSTER]) == ["mlp-v1", "mlp-v2", "mlp-v3"]
        assert sorted(snapshot.resources[ENDPOINTS]) == ["mlp-v1", "mlp-v2", "mlp-v3"]
        assert b"mlp-v3" in snapshot.resources[ROUTE]["mlp-routes"].value
        assert b"10.0.0" not in snapshot.resources[ENDPOINTS]["mlp-v3"].value  # no endpoints
        assert control.store.policy("mlp") == policy


class Counters:
    """A fake batcher reader: cumulative counters per version that grow every read.

    Each read of a version's batcher adds `per_read` requests, `failures` of them failed,
    all in the first latency bucket."""

    def __init__(self, per_read: dict[str, tuple[int, int]]) -> None:
        self.per_read = per_read
        self.totals: dict[str, list[int]] = {}

    async def __call__(self, endpoint: Endpoint):
        requests, failures = self.per_read.get(endpoint.version, (0, 0))
        total = self.totals.setdefault(endpoint.address, [0, 0])
        total[0] += requests
        total[1] += failures
        return total[0], total[1], (total[0], 0, 0), BOUNDS


class Late:
    """A reader whose counts arrive `lag` seconds late, as the batchers' pushed counters do:
    each read returns the newest reading of `read` that is at least `lag` old."""

    def __init__(self, read, lag: float) -> None:
        self._read = read
        self._lag = lag
        self._readings: dict[str, collections.deque] = {}

    async def __call__(self, endpoint: Endpoint):
        now = time.monotonic()
        readings = self._readings.setdefault(endpoint.address, collections.deque())
        readings.append((now, await self._read(endpoint)))
        while len(readings) > 1 and now - readings[1][0] >= self._lag:
            readings.popleft()
        return readings[0][1]


class Scripted:
    """A fake reader that answers from a fixed list per address, then fails (skipped)."""

    def __init__(self, script: dict[str, list[tuple]]) -> None:
        self.script = {address: list(values) for address, values in script.items()}
        self.done = asyncio.Event()

    async def __call__(self, endpoint: Endpoint):
        values = self.script[endpoint.address]
        if not values:
            if not any(self.script.values()):
                self.done.set()
            raise ConnectionError("batcher gone")
        return values.pop(0)


async def test_window_sums_the_batchers_of_a_version(tmp_path):
    read = Scripted({
        E1.address: [(100, 1, (90, 10, 0), BOUNDS), (150, 2, (130, 20, 0), BOUNDS),
                     (200, 4, (170, 30, 0), BOUNDS)],
        E1B.address: [(10, 0, (0, 10, 0), BOUNDS), (30, 1, (0, 25, 5), BOUNDS),
                      (60, 1, (0, 50, 10), BOUNDS)],
        E2.address: [(7, 7, (0, 0, 7), BOUNDS), (7, 7, (0, 0, 7), BOUNDS),
                     (7, 7, (0, 0, 7), BOUNDS)],
    })
    async with plane(tmp_path, read, endpoints=(E1, E1B, E2)) as control:
        await asyncio.wait_for(read.done.wait(), WAIT)
        v1 = control.window("mlp", "1", 3600.0)
        assert (v1.requests, v1.failures, v1.buckets, v1.bounds_ms) == (
            150, 4, (80 + 0, 20 + 40, 0 + 10), BOUNDS)
        assert 0 < v1.seconds < WAIT
        assert v1.error_rate == 4 / 150
        assert v1.percentile(50) == 5.0
        assert v1.percentile(99) == 20.0
        v2 = control.window("mlp", "2", 3600.0)
        assert (v2.requests, v2.failures, v2.buckets) == (0, 0, (0, 0, 0))
        assert v2.percentile(99) is None
        nothing = control.window("mlp", "9", 30.0)
        assert nothing == Window(30.0, 0, 0, (0, 0, 0), BOUNDS)


async def test_window_before_any_sample_is_empty(tmp_path):
    async with plane(tmp_path) as control:
        assert control.window("mlp", "1", 10.0) == Window(10.0, 0, 0, (0,), ())


PLAN = CanaryPlan("mlp", baseline="1", canary="2")
START = {"1": 70, "2": 30, "3": 0}


@contextlib.asynccontextmanager
async def three_versions(tmp_path: Path, read=None, counts_lag: float = 0.0):
    """mlp versions 1, 2 and 3 serving 1=70 2=30 3=0."""
    async with plane(tmp_path, read, endpoints=(E1, E2, E3), counts_lag=counts_lag) as control:
        control.set_weights("mlp", START, "alice", "before the canary")
        yield control


def canary_policies(control: ControlPlane) -> list[tuple[str, dict, dict]]:
    """(action, weights before, weights after) of every canary entry in the audit log."""
    return [(e.action, TrafficPolicy.from_json(e.before).weights,
             TrafficPolicy.from_json(e.after).weights)
            for e in control.store.audit() if e.action.startswith("canary.")]


async def test_start_canary_refuses_an_unknown_version(tmp_path):
    async with plane(tmp_path) as control:
        with pytest.raises(InvalidArgument) as caught:
            control.start_canary(CanaryPlan("mlp", "1", "3"), "alice")
        assert caught.value.message == "model 'mlp' has no version '3' (versions: 1, 2)"
        assert control.store.canary("mlp") is None
        with pytest.raises(NotFound) as caught:
            control.start_canary(CanaryPlan("bert", "1", "2"), "alice")
        assert caught.value.message == "no traffic policy for model 'bert'"


async def test_a_canary_of_the_baseline_is_refused_by_the_plan(tmp_path):
    # ControlPlane.start_canary's own "already serves" check cannot be reached: the plan
    # refuses canary == baseline when it is made.
    with pytest.raises(InvalidArgument) as caught:
        CanaryPlan("mlp", baseline="1", canary="1")
    assert caught.value.message == "baseline and canary are both version '1'"


async def test_a_canary_with_an_unknown_baseline_leaves_nothing_running(tmp_path):
    async with plane(tmp_path) as control:
        with pytest.raises(InvalidArgument) as caught:
            control.start_canary(CanaryPlan("mlp", baseline="7", canary="2"), "alice")
        assert caught.value.message == "model 'mlp' has no version '7' (versions: 1, 2)"
        record = control.store.canary("mlp")
        assert record is None or record["state"] != "running"


async def test_a_canary_from_a_version_without_traffic_is_refused(tmp_path):
    async with three_versions(tmp_path) as control:
        before = (served(control), control.store.audit())
        with pytest.raises(FailedPrecondition) as caught:
            control.start_canary(CanaryPlan("mlp", baseline="3", canary="2"), "alice")
        assert caught.value.message == ("baseline version '3' of model 'mlp' carries no "
                                        "traffic, so there is none to move to version '2'")
        assert (served(control), control.store.audit()) == before
        assert control.store.canary("mlp") is None


async def test_a_running_canary_refuses_a_second_and_other_changes_and_abort_restores(
        tmp_path):
    read = Counters({"1": (10, 0), "3": (10, 0)})
    async with three_versions(tmp_path, read) as control:
        record = control.start_canary(CanaryPlan("mlp", "", "3", interval_s=30.0), "alice")
        assert (record["state"], record["step"], record["weight"]) == ("running", 0, 5)
        assert (record["plan"]["baseline"], record["baseline_by_weight"]) == ("1", True)
        assert record["plan"]["steps"] == [5, 25, 50, 70]  # capped at 1's and 3's 70 %
        assert record["start_policy"]["weights"] == START
        assert control.policy("mlp").weights == {"1": 65, "2": 30, "3": 5}
        assert_serves(control)
        running = "(1 → 3, weight 5%); abort it first (meshserve canary abort mlp)"
        with pytest.raises(FailedPrecondition) as caught:
            control.start_canary(CanaryPlan("mlp", "2", "3"), "bob")
        assert caught.value.message == f"a canary of model 'mlp' is already running {running}"
        for change in (lambda: control.set_weights("mlp", START, "bob"),
                       lambda: control.pin("mlp", "2", "bob"),
                       lambda: control.rollback("mlp", "bob")):
            with pytest.raises(FailedPrecondition) as caught:
                change()
            assert caught.value.message == f"a canary of model 'mlp' is running {running}"
        assert control.policy("mlp").weights == {"1": 65, "2": 30, "3": 5}
        aborted = control.abort_canary("mlp", "bob")
        assert (aborted["state"], aborted["weight"], aborted["reason"]) == (
            "aborted", 0, "aborted by operator")
        assert control.policy("mlp").weights == START
        assert_serves(control)
        assert canary_policies(control) == [
            ("canary.start", START, {"1": 65, "2": 30, "3": 5}),
            ("canary.abort", {"1": 65, "2": 30, "3": 5}, START)]
        with pytest.raises(FailedPrecondition) as caught:
            control.abort_canary("mlp", "bob")
        assert caught.value.message == "no canary of model 'mlp' is running"
        control.pin("mlp", "2", "bob")  # changes are taken again


async def finished(control: ControlPlane, model: str) -> dict:
    async def poll() -> dict:
        while (record := control.store.canary(model))["state"] == "running":
            await asyncio.sleep(0.02)
        return record

    return await asyncio.wait_for(poll(), WAIT)


async def test_a_failing_canary_restores_exactly_the_policy_it_started_from(tmp_path):
    read = Counters({"1": (10, 0), "3": (10, 5)})
    async with three_versions(tmp_path, read) as control:
        control.start_canary(CanaryPlan("mlp", "", "3", steps=(10, 50, 100), interval_s=0.2,
                                        min_requests=5), "alice")
        assert control.policy("mlp").weights == {"1": 60, "2": 30, "3": 10}
        record = await finished(control, "mlp")
        assert (record["state"], record["weight"], record["step"]) == ("rolled_back", 0, 0)
        assert record["reason"].startswith("error rate 0.500 > 0.010 over ")
        assert control.policy("mlp").weights == START
        assert_serves(control)
        assert canary_policies(control) == [
            ("canary.start", START, {"1": 60, "2": 30, "3": 10}),
            ("canary.rollback", {"1": 60, "2": 30, "3": 10}, START)]
        start, last = [e for e in control.store.audit() if e.action.startswith("canary.")]
        assert (start.actor, start.reason) == (
            "alice", "1 → 3, steps 10,50,70 every 0.2s; baseline: the version with the most "
                     "weight")
        assert (last.actor, last.subject, last.reason) == ("canary-controller", "mlp",
                                                           record["reason"])
        # The canary left the undo stack as if it had not run: the policy before 70/30.
        assert control.rollback("mlp", "alice").weights == {"1": 100, "2": 0, "3": 0}


@pytest.mark.parametrize("lag", [0.0, 0.25], ids=["counts at once", "counts 0.25 s late"])
async def test_failures_counted_before_a_canary_began_do_not_roll_it_back(tmp_path, lag):
    """Even when counts reach the control plane `lag` late, as the batchers' pushed ones do:
    then the failures that rolled back the last canary may arrive after the next one began."""
    read = Counters({"1": (10, 0), "3": (10, 5)})
    async with three_versions(tmp_path, Late(read, lag), counts_lag=lag) as control:
        await until(lambda: control.window("mlp", "3", 60.0).failures >= 50, WAIT,
                    "failures of version 3 counted")
        read.per_read["3"] = (10, 0)  # healthy from the canary's start on
        control.start_canary(CanaryPlan("mlp", "", "3", steps=(10, 100), interval_s=0.6,
                                        min_requests=5), "alice")
        record = await finished(control, "mlp")
        assert record["state"] == "promoted", record["reason"]


async def test_a_failing_canary_restores_a_candidate_that_already_had_traffic(tmp_path):
    read = Counters({"1": (10, 0), "2": (10, 5)})
    async with plane(tmp_path, read) as control:
        control.set_weights("mlp", {"1": 90, "2": 10}, "alice")
        control.start_canary(CanaryPlan("mlp", "", "2", steps=(50, 100), interval_s=0.2,
                                        min_requests=5), "alice")
        assert control.policy("mlp").weights == {"1": 50, "2": 50}
        record = await finished(control, "mlp")
        assert (record["state"], record["weight"]) == ("rolled_back", 10)
        assert control.policy("mlp").weights == {"1": 90, "2": 10}


@pytest.mark.parametrize(("baseline", "steps", "served"), [
    ("", [10, 50, 70], [{"1": 60, "2": 30, "3": 10}, {"1": 20, "2": 30, "3": 50},
                        {"1": 0, "2": 30, "3": 70}]),
    ("2", [10, 30], [{"1": 70, "2": 20, "3": 10}, {"1": 70, "2": 0, "3": 30}]),
], ids=["baseline 1, the most weight", "--from 2"])
async def test_a_healthy_canary_moves_weight_only_from_its_baseline(tmp_path, baseline, steps,
                                                                    served):
    read = Counters({"1": (10, 0), "2": (10, 0), "3": (10, 0)})
    async with three_versions(tmp_path, read) as control:
        control.start_canary(CanaryPlan("mlp", baseline, "3", steps=(10, 50, 100),
                                        interval_s=0.2, min_requests=5), "alice")
        record = await finished(control, "mlp")
        assert (record["state"], record["weight"], record["step"]) == (
            "promoted", steps[-1], len(steps) - 1)
        assert record["plan"]["steps"] == steps
        assert record["reason"].startswith(f"healthy at {steps[-1]}%: error rate 0.000 <= ")
        assert control.policy("mlp").weights == served[-1]
        assert_serves(control)
        assert canary_policies(control) == [
            ("canary.start", START, served[0]),
            *[("canary.step", a, b) for a, b in zip(served, served[1:])],
            ("canary.promote", served[-1], served[-1])]
        actors = {e.actor for e in control.store.audit() if e.action in ("canary.step",
                                                                         "canary.promote")}
        assert actors == {"canary-controller"}
        # One change in the undo stack: rolling back a promotion restores 70/30.
        assert control.rollback("mlp", "alice").weights == START


async def test_canary_steps_keep_shadow_and_region(tmp_path):
    read = Counters({"1": (10, 0), "2": (10, 0), "3": (10, 0)})
    async with plane(tmp_path, read, endpoints=(E1, E2, E3)) as control:
        control.set_policy(TrafficPolicy("mlp", START, Shadow("2", 5.0), "local"), "alice")
        control.start_canary(CanaryPlan("mlp", "1", "3", steps=(50, 100), interval_s=0.2,
                                        min_requests=5), "alice")
        await finished(control, "mlp")
        assert control.policy("mlp") == TrafficPolicy(
            "mlp", {"1": 0, "2": 30, "3": 70}, Shadow("2", 5.0), "local")


async def test_a_restarted_control_plane_resumes_the_canary_with_its_start_policy(tmp_path):
    async with three_versions(tmp_path) as control:
        control.start_canary(CanaryPlan("mlp", "", "3", steps=(10, 50, 100), interval_s=0.2,
                                        min_requests=5), "alice")
    read = Counters({"1": (10, 0), "3": (10, 5)})
    async with plane(tmp_path, read, endpoints=(E1, E2, E3)) as control:
        assert control.policy("mlp").weights == {"1": 60, "2": 30, "3": 10}
        control.resume_canaries()
        record = await finished(control, "mlp")
        assert record["state"] == "rolled_back"
        assert control.policy("mlp").weights == START


async def test_a_canary_recorded_without_its_start_policy_restores_the_baseline(tmp_path):
    """Records written before canaries kept the policy they started from."""
    read = Counters({"1": (10, 0), "3": (10, 5)})
    async with three_versions(tmp_path, read) as control:
        plan = CanaryPlan("mlp", "1", "3", steps=(10, 100), interval_s=0.2, min_requests=5)
        control.store.put_canary("mlp", {"plan": plan_dict(plan), "state": "running",
                                         "step": 0, "weight": 10, "reason": "started"},
                                 "alice", "canary.start")
        control.resume_canaries()
        record = await finished(control, "mlp")
        assert (record["state"], record["weight"]) == ("rolled_back", 0)
        assert control.policy("mlp").weights == {"1": 100, "2": 0, "3": 0}
