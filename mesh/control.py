"""The control plane's core: state changes, the snapshot they produce, live statistics, and
automated canaries. gRPC appears only in the batcher sampling, behind `sample_batchers`."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime

from meshserve.common.errors import FailedPrecondition, NotFound
from meshserve.mesh.canary import (
    HOLD,
    PROMOTE,
    ROLLBACK,
    CanaryPlan,
    Split,
    VersionWindow,
    candidate_steps,
    choose_baseline,
    judge,
    restored,
)
from meshserve.mesh.live import History, Sample, Window, window
from meshserve.mesh.policy import Endpoint, TrafficPolicy, check_region
from meshserve.mesh.readiness import Changes
from meshserve.mesh.snapshot import Snapshot
from meshserve.mesh.store import Store
from meshserve.mesh.store_canaries import CANARY_START, OVER_START, RESTORE, START
from meshserve.mesh.xds import SnapshotCache

log = logging.getLogger(__name__)

# Reads one batcher's cumulative counters: (requests, failures, bucket counts, bounds).
CounterReader = Callable[[Endpoint], Awaitable[tuple[int, int, tuple[int, ...], tuple[float, ...]]]]


class ControlPlane:
    """`read_counters` returns counts up to `counts_lag` seconds old (batchers push theirs
    at most once an interval), so a canary's window starts that much after its step began:
    a sample taken sooner may hold failures from before the step, such as those that rolled
    back the canary before it."""

    def __init__(self, store: Store, read_counters: CounterReader | None = None,
                 tick_seconds: float = 1.0, counts_lag: float = 0.0) -> None:
        self.store = store
        self.cache = SnapshotCache(Snapshot.of(store.state()))
        self._read = read_counters
        self._tick = tick_seconds
        self._counts_lag = counts_lag
        self._histories: dict[tuple[str, str, str], History] = {}
        self._bounds: tuple[float, ...] = ()
        self._canaries: dict[str, asyncio.Task] = {}
        # (model, shadow version) → [compared, differing, max abs diff], from the routers.
        self.shadow_counts: dict[tuple[str, str], list[float]] = {}
        # Told of every change of the state (policies, endpoints).
        self.changes = Changes()

    # ---------------------------------------------------------------- state changes

    def _apply(self) -> None:
        self.cache.set(Snapshot.of(self.store.state()))
        self.changes.notify()

    def policy(self, model: str) -> TrafficPolicy:
        policy = self.store.policy(model)
        if policy is None:
            raise NotFound(f"no traffic policy for model '{model}'")
        return policy

    def set_policy(self, policy: TrafficPolicy, actor: str, reason: str = "",
                   expected: TrafficPolicy | None = None,
                   force: bool = False) -> TrafficPolicy:
        """Serve `policy`, naming every registered version (at weight 0 where it names none).
        With `expected`: only while that is still the model's policy (else `PolicyChanged`).
        A new region with no endpoint of the model is refused unless `force`: it would send
        the model's requests nowhere. The same policy again changes nothing."""
        self._refuse_running(policy.model, "running")
        policy = policy.with_versions(self._registered(policy.model))
        if policy.region:
            self._check_region(policy, force)
        Snapshot.of(self._with(policy))  # refuse what would not make a consistent snapshot
        if self.store.put_policy(policy, actor, reason, expected=expected):
            self._apply()
        return policy

    def _registered(self, model: str) -> list[str]:
        """The versions of `model` that have endpoints."""
        return sorted({e.version for e in self.store.endpoints() if e.model == model}, key=int)

    def _check_region(self, policy: TrafficPolicy, force: bool) -> None:
        current = self.store.policy(policy.model)
        if current is not None and current.region == policy.region:
            return  # in force already
        check_region(policy.region)
        if force:
            return
        regions = sorted({e.region for e in self.store.endpoints() if e.model == policy.model})
        if policy.region not in regions:
            where = f"only in {', '.join(regions)}" if regions else "nowhere yet"
            raise FailedPrecondition(
                f"model '{policy.model}' has no endpoint in region '{policy.region}' (its "
                f"endpoints are {where}): every request would fail; to set it before its "
                "endpoints register, force it (traffic region --force)")

    def set_weights(self, model: str, new: dict[str, int], actor: str,
                    reason: str = "") -> TrafficPolicy:
        return self.set_policy(self.policy(model).with_weights(new), actor, reason)

    def pin(self, model: str, version: str, actor: str, reason: str = "") -> TrafficPolicy:
        return self.set_weights(model, {version: 100}, actor, reason or f"pin to {version}")

    def rollback(self, model: str, actor: str, reason: str = "") -> TrafficPolicy:
        """The previous policy's weights, shadow and region; every version the model has
        stays (at weight 0 where that policy did not know it)."""
        self._refuse_running(model, "running")
        policy = self.store.rollback(model, actor, reason, keep=self._registered(model))
        self._apply()
        return policy

    def register(self, endpoint: Endpoint, actor: str) -> None:
        """Add an endpoint; a model's first version gets all its traffic, later ones none
        (pinnable at once, shifted by an SRE or a canary)."""
        self.store.put_endpoint(endpoint, actor)
        policy = self.store.policy(endpoint.model)
        if policy is None:
            self.store.put_policy(TrafficPolicy(endpoint.model, {endpoint.version: 100}), actor,
                                  "first version registered")
        elif endpoint.version not in policy.weights:
            self.store.put_policy(
                TrafficPolicy(policy.model, {**policy.weights, endpoint.version: 0},
                              policy.shadow, policy.region), actor, "new version registered")
        self._apply()

    def replace_endpoints(self, endpoints: tuple[Endpoint, ...], actor: str) -> None:
        """Make the registered endpoints exactly `endpoints` (a watch's latest view)."""
        wanted = set(endpoints)
        for endpoint in self.store.endpoints():
            if endpoint not in wanted:
                self.store.remove_endpoint(endpoint.model, endpoint.version, endpoint.address,
                                           actor)
        present = set(self.store.endpoints())
        for endpoint in endpoints:
            if endpoint not in present:
                self.register(endpoint, actor)
        self._apply()

    def unregister(self, endpoint: Endpoint, actor: str) -> None:
        self.store.remove_endpoint(endpoint.model, endpoint.version, endpoint.address, actor)
        self._apply()

    def _with(self, policy: TrafficPolicy):
        state = self.store.state()
        return type(state)({**state.policies, policy.model: policy}, state.endpoints)

    def record_shadow(self, model: str, version: str, compared: int, differing: int,
                      max_abs_diff: float) -> None:
        counts = self.shadow_counts.setdefault((model, version), [0, 0, 0.0])
        counts[0] += compared
        counts[1] += differing
        counts[2] = max(counts[2], max_abs_diff)

    # ---------------------------------------------------------------- live statistics

    async def sample_batchers(self) -> None:
        """Sample every batcher's counters forever, one round per tick."""
        while True:
            endpoints = self.store.endpoints()
            results = await asyncio.gather(*(self._read(e) for e in endpoints),
                                           return_exceptions=True)
            now = time.monotonic()
            for endpoint, result in zip(endpoints, results):
                if isinstance(result, BaseException):
                    continue
                requests, failures, buckets, bounds = result
                self._bounds = bounds
                key = (endpoint.model, endpoint.version, endpoint.address)
                self._histories.setdefault(key, History()).add(
                    Sample(now, requests, failures, buckets))
            await asyncio.sleep(self._tick)

    def window(self, model: str, version: str, seconds: float,
               since: float | None = None) -> Window:
        """The version's last `seconds`; with `since` (monotonic), only what its batchers
        counted after that time."""
        deltas = [history.delta(seconds) if since is None else history.delta_since(since)
                  for (m, v, _), history in self._histories.items() if (m, v) == (model, version)]
        return window([d for d in deltas if d is not None], self._bounds, seconds)

    # ---------------------------------------------------------------- canaries

    def start_canary(self, plan: CanaryPlan, actor: str) -> dict:
        """Start moving weight from the baseline (`plan.baseline`; "" for the version with the
        most weight) to `plan.canary`; every other version keeps its weight throughout, and
        the policy in force now is what a rollback restores."""
        self._refuse_running(plan.model, "already running")
        current = self.policy(plan.model)
        baseline = choose_baseline(current, plan.canary, plan.baseline)
        chosen = "" if plan.baseline else "; baseline: the version with the most weight"
        split = Split(dict(current.weights), baseline, plan.canary)
        plan = replace(plan, baseline=baseline, steps=candidate_steps(plan.steps, split.share))
        record = {"plan": plan_dict(plan), "state": "running", "step": 0,
                  "weight": plan.steps[0], "reason": "started",
                  "start_policy": asdict(current), "baseline_by_weight": bool(chosen)}
        self._change(record, current.with_weights(split.weights(plan.steps[0])), actor,
                     CANARY_START, START, f"{baseline} → {plan.canary}, steps "
                     f"{','.join(map(str, plan.steps))} every {plan.interval_s:g}s{chosen}")
        self._launch(plan.model)
        return self.store.canary(plan.model)

    def abort_canary(self, model: str, actor: str) -> dict:
        """Stop the running canary and restore the policy in force when it started."""
        record = self.store.canary(model)
        if not record or record.get("state") != "running":
            raise FailedPrecondition(f"no canary of model '{model}' is running")
        self._stop(model)
        self._restore(record, actor, "aborted", "canary.abort", "aborted by operator")
        return self.store.canary(model)

    def resume_canaries(self) -> None:
        """After a restart, running canaries continue from their recorded step."""
        for model in self.store.policies():
            record = self.store.canary(model)
            if record and record.get("state") == "running":
                self._launch(model)

    def _refuse_running(self, model: str, doing: str) -> None:
        record = self.store.canary(model)
        if record and record.get("state") == "running":
            plan = record["plan"]
            raise FailedPrecondition(
                f"a canary of model '{model}' is {doing} ({plan['baseline']} → "
                f"{plan['canary']}, weight {record['weight']}%); abort it first (meshserve "
                f"canary abort {model})")

    def _launch(self, model: str) -> None:
        self._stop(model)
        self._canaries[model] = asyncio.get_running_loop().create_task(self._run_canary(model))

    def _stop(self, model: str) -> None:
        task = self._canaries.pop(model, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _change(self, record: dict, policy: TrafficPolicy, actor: str, action: str,
                stacking: str, reason: str) -> None:
        """Serve `policy` and keep `record`, in one transaction, audited once as `action`."""
        Snapshot.of(self._with(policy))  # refuse what would not make a consistent snapshot
        record = {**record, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
        self.store.put_canary(policy.model, record, actor, action, reason, policy=policy,
                              stacking=stacking)
        self._apply()

    def _restore(self, record: dict, actor: str, state: str, action: str,
                 reason: str) -> None:
        """End the canary with the policy in force when it started."""
        plan = plan_from(record["plan"])
        current = self.policy(plan.model)
        policy = restored(start_policy(record, current), current)
        self._change({**record, "state": state, "weight": policy.weights[plan.canary],
                      "reason": reason}, policy, actor, action, RESTORE, reason)

    async def _run_canary(self, model: str) -> None:
        actor = "canary-controller"
        record = self.store.canary(model)
        plan = plan_from(record["plan"])
        split = Split(start_policy(record, self.policy(model)).weights, plan.baseline,
                      plan.canary)
        step = record["step"]
        step_started = time.monotonic()
        while True:
            await asyncio.sleep(self._tick)
            now = time.monotonic()
            elapsed = now - step_started
            # Never before the step began, nor before counts from then have arrived (at most
            # half the interval: a window is never empty).
            since = max(step_started + min(self._counts_lag, plan.interval_s / 2),
                        now - plan.interval_s)
            verdict = judge(plan, step, self._version_window(model, plan.baseline, since),
                            self._version_window(model, plan.canary, since))
            if verdict.action == ROLLBACK:
                self._restore(record, actor, "rolled_back", "canary.rollback", verdict.reason)
                log.warning("canary of %s rolled back: %s", model, verdict.reason)
                return
            if elapsed < plan.interval_s or verdict.action == HOLD:
                continue
            if verdict.action == PROMOTE:
                record = {**record, "state": "promoted", "reason": verdict.reason}
                action = "canary.promote"
            else:
                step += 1
                record = {**record, "step": step, "weight": verdict.weight,
                          "reason": verdict.reason}
                action = "canary.step"
            self._change(record, self.policy(model).with_weights(split.weights(verdict.weight)),
                         actor, action, OVER_START, verdict.reason)
            if verdict.action == PROMOTE:
                return
            step_started = time.monotonic()

    def _version_window(self, model: str, version: str, since: float) -> VersionWindow:
        found = self.window(model, version, time.monotonic() - since, since)
        return VersionWindow(found.requests, found.failures, found.percentile(99))

    async def close(self) -> None:
        for model in list(self._canaries):
            self._stop(model)
        with contextlib.suppress(Exception):
            self.store.close()


def plan_dict(plan: CanaryPlan) -> dict:
    return {"model": plan.model, "baseline": plan.baseline, "canary": plan.canary,
            "steps": list(plan.steps), "interval_s": plan.interval_s,
            "max_error_rate": plan.max_error_rate, "max_latency_ratio": plan.max_latency_ratio,
            "min_requests": plan.min_requests}


def plan_from(data: dict) -> CanaryPlan:
    return CanaryPlan(**{**data, "steps": tuple(data["steps"])})


def start_policy(record: dict, current: TrafficPolicy) -> TrafficPolicy:
    """The policy in force when the canary of `record` started: what a rollback restores.
    A record written before canaries kept it restores what they restored then: everything
    to the baseline (`current`: the model's policy now)."""
    if "start_policy" in record:
        return TrafficPolicy.from_dict(record["start_policy"])
    return current.pinned(record["plan"]["baseline"])
