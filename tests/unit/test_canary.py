"""Canary analysis: the verdict rules, their boundaries, the plan's inputs, and the weights
each step serves (only the baseline and the candidate ever change)."""

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.mesh.canary import (
    CanaryPlan,
    Split,
    Verdict,
    VersionWindow,
    candidate_steps,
    choose_baseline,
    judge,
    parse_duration,
    parse_steps,
    restored,
)
from meshserve.mesh.policy import Shadow, TrafficPolicy

PLAN = CanaryPlan(model="mlp", baseline="1", canary="2")  # steps 5,25,50,100; 1%; 1.5x; 20
BASE = VersionWindow(requests=1000, failures=2, latency_p99_ms=100.0)


def w(requests: int, failures: int = 0, p99: float | None = 100.0) -> VersionWindow:
    return VersionWindow(requests=requests, failures=failures, latency_p99_ms=p99)


# name, step index, baseline, canary, expected (action, weight, reason or None)
CASES = [
    ("healthy first step moves on", 0, BASE, w(50), ("step", 25, None)),
    ("healthy middle step moves on", 1, BASE, w(50), ("step", 50, None)),
    ("healthy at 50 moves to 100", 2, BASE, w(50), ("step", 100, None)),
    ("healthy at the last step promotes", 3, BASE, w(50), ("promote", 100, None)),
    ("error rate above the bound rolls back", 1, BASE, w(50, 6),
     ("rollback", 0, "error rate 0.120 > 0.010 over 50 requests")),
    ("error rate exactly at the bound is healthy", 0, BASE, w(100, 1), ("step", 25, None)),
    ("error rate just above the bound", 0, BASE, w(99, 1),
     ("rollback", 0, "error rate 0.0101 > 0.0100 over 99 requests")),
    ("errors judged before the request count", 0, BASE, w(3, 1),
     ("rollback", 0, "error rate 0.333 > 0.010 over 3 requests")),
    ("no requests, no error rate: hold", 0, BASE, w(0, 0, None),
     ("hold", 5, "only 0 requests, need 20")),
    ("too few requests holds at the current weight", 2, BASE, w(7),
     ("hold", 50, "only 7 requests, need 20")),
    ("one request short of the minimum holds", 0, BASE, w(19), ("hold", 5, None)),
    ("exactly the minimum is enough", 0, BASE, w(20), ("step", 25, None)),
    ("latency ratio above the bound rolls back", 1, BASE, w(50, 0, 151.0),
     ("rollback", 0, "p99 latency ratio 1.51 > 1.50 (151 ms vs baseline 100 ms)")),
    ("latency ratio exactly at the bound is healthy", 1, BASE, w(50, 0, 150.0),
     ("step", 50, None)),
    ("latency ratio barely above the bound", 1, BASE, w(50, 0, 150.1),
     ("rollback", 0, "p99 latency ratio 1.501 > 1.500 (150.1 ms vs baseline 100 ms)")),
    ("latency judged before the request count", 0, BASE, w(5, 0, 400.0),
     ("rollback", 0, "p99 latency ratio 4.00 > 1.50 (400 ms vs baseline 100 ms)")),
    ("canary p99 unknown: latency not judged", 0, BASE, w(50, 0, None), ("step", 25, None)),
    ("baseline p99 unknown: latency not judged", 0, w(1000, 0, None), w(50, 0, 900.0),
     ("step", 25, None)),
    ("baseline p99 zero: latency not judged", 0, w(1000, 0, 0.0), w(50, 0, 900.0),
     ("step", 25, None)),
    ("faster canary is healthy", 3, BASE, w(50, 0, 10.0), ("promote", 100, None)),
    ("error rate wins over latency", 0, BASE, w(50, 10, 900.0),
     ("rollback", 0, "error rate 0.200 > 0.010 over 50 requests")),
    ("baseline errors do not matter", 0, w(100, 100), w(50), ("step", 25, None)),
]


@pytest.mark.parametrize(("step_index", "baseline", "canary", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge(step_index, baseline, canary, expected):
    verdict = judge(PLAN, step_index, baseline, canary)
    action, weight, reason = expected
    assert (verdict.action, verdict.weight) == (action, weight)
    if reason is not None:
        assert verdict.reason == reason


def test_healthy_reasons_say_why():
    assert judge(PLAN, 0, BASE, w(50)).reason == (
        "healthy at 5%: error rate 0.000 <= 0.010 over 50 requests; next 25%")
    assert judge(PLAN, 3, BASE, w(200, 1)).reason == (
        "healthy at 100%: error rate 0.005 <= 0.010 over 200 requests")


@pytest.mark.parametrize(("plan", "step_index", "canary", "expected"), [
    (CanaryPlan("m", "1", "2", steps=(100,)), 0, w(50), Verdict("promote", 100, "")),
    (CanaryPlan("m", "1", "2", steps=(10, 100)), 0, w(50), Verdict("step", 100, "")),
    (CanaryPlan("m", "1", "2", max_error_rate=0.0), 0, w(50, 1), Verdict("rollback", 0, "")),
    (CanaryPlan("m", "1", "2", max_error_rate=0.0), 0, w(50, 0), Verdict("step", 25, "")),
    (CanaryPlan("m", "1", "2", max_error_rate=1.0), 0, w(50, 50), Verdict("step", 25, "")),
    (CanaryPlan("m", "1", "2", min_requests=1), 0, w(1), Verdict("step", 25, "")),
    (CanaryPlan("m", "1", "2", max_latency_ratio=1.0), 0, w(50, 0, 100.5),
     Verdict("rollback", 0, "")),
], ids=["single-step", "two-steps", "zero-errors-tolerated-fails", "zero-errors-tolerated-ok",
        "all-errors-tolerated", "min-one-request", "no-slowdown-tolerated"])
def test_judge_with_other_plans(plan, step_index, canary, expected):
    verdict = judge(plan, step_index, BASE, canary)
    assert (verdict.action, verdict.weight) == (expected.action, expected.weight)


@pytest.mark.parametrize("step_index", [-1, 4, 10])
def test_judge_rejects_step_index_outside_the_plan(step_index):
    with pytest.raises(InvalidArgument, match="step index"):
        judge(PLAN, step_index, BASE, w(50))


def test_walkthrough_to_promotion():
    """A canary that stays healthy: 5 → 25 → 50 → 100 → promoted; one quiet interval held."""
    index, applied = 0, [PLAN.steps[0]]
    for window in [w(50), w(3), w(80), w(200), w(400)]:
        verdict = judge(PLAN, index, BASE, window)
        applied.append(verdict.weight)
        if verdict.action == "step":
            index = PLAN.steps.index(verdict.weight)
        elif verdict.action == "promote":
            break
    assert applied == [5, 25, 25, 50, 100, 100]
    assert verdict.action == "promote"


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5m", 90.0),
    (" 10s ", 10.0), ("0.5s", 0.5), (".5s", 0.5), ("1ms", 0.001), ("1m30s", 90.0),
    ("1h30m", 5400.0), ("2m500ms", 120.5), ("24h", 86400.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "30", "s", "30 sec", "1d", "-5s", "0s", "0ms", "5S", "1e3s", "inf s", "nan s",
    "١s", "1m30", "m30s", "1m-30s", "99999999h", "24h1ms",
])
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidArgument, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "steps"), [
    ("5,25,50,100", (5, 25, 50, 100)), ("100", (100,)), (" 1, 2 ,100 ", (1, 2, 100)),
    ("99,100", (99, 100)),
])
def test_parse_steps(text, steps):
    assert parse_steps(text) == steps


@pytest.mark.parametrize(("text", "message"), [
    ("", "comma-separated"), ("5,,100", "comma-separated"), ("5;100", "comma-separated"),
    ("five,100", "comma-separated"), ("-5,100", "comma-separated"), ("5.5,100", "comma-separated"),
    ("5,25,50", "end at 100"), ("0,100", "between 1 and 100"), ("5,150,100", "between 1 and 100"),
    ("50,25,100", "increase"), ("5,5,100", "increase"), ("100,100", "increase"),
    ("5,100,", "comma-separated"), ("²,100", "comma-separated"),
])
def test_parse_steps_rejects(text, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_steps(text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"baseline": "v1"}, "not a number"),
    ({"canary": "1"}, "both version"),
    ({"baseline": "-1"}, "not a number"),
    ({"canary": ""}, "not a number"),
    ({"steps": ()}, "at least one step"),
    ({"steps": (50, 5)}, "increase"),
    ({"steps": (0, 70)}, "between 1 and 100"),
    ({"interval_s": 0.0}, "interval"),
    ({"interval_s": 86400.5}, "at most 86400 s"),
    ({"max_error_rate": 1.5}, "error rate"),
    ({"max_latency_ratio": 0.9}, "latency ratio"),
    ({"min_requests": 0}, "min requests"),
])
def test_plan_rejects(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        CanaryPlan(**{"model": "mlp", "baseline": "1", "canary": "2", **kwargs})


@pytest.mark.parametrize(("requests", "failures", "p99"), [
    (-1, 0, None), (5, 6, None), (5, -1, None), (5, 0, -1.0), (5, 0, float("nan")),
])
def test_window_rejects(requests, failures, p99):
    with pytest.raises(InvalidArgument):
        VersionWindow(requests, failures, p99)


def test_plan_defaults():
    assert (PLAN.steps, PLAN.interval_s, PLAN.max_error_rate, PLAN.max_latency_ratio,
            PLAN.min_requests) == ((5, 25, 50, 100), 30.0, 0.01, 1.5, 20)


def test_a_plan_may_leave_the_baseline_to_be_chosen_and_run_capped_steps():
    assert CanaryPlan("mlp", baseline="", canary="3").baseline == ""
    assert CanaryPlan("mlp", "1", "3", steps=(10, 50, 70)).steps == (10, 50, 70)


def test_the_last_capped_step_promotes_at_the_share():
    plan = CanaryPlan("mlp", "1", "3", steps=(10, 50, 70))
    assert judge(plan, 1, BASE, w(50)) == Verdict(
        "step", 70, "healthy at 50%: error rate 0.000 <= 0.010 over 50 requests; next 70%")
    assert judge(plan, 2, BASE, w(50)) == Verdict(
        "promote", 70, "healthy at 70%: error rate 0.000 <= 0.010 over 50 requests")


# requested steps, share of baseline + candidate, the candidate's weight at each step
CAPPED = [
    ((10, 50, 100), 100, (10, 50, 100)),
    ((10, 50, 100), 70, (10, 50, 70)),
    ((10, 50, 100), 50, (10, 50)),
    ((10, 50, 100), 30, (10, 30)),
    ((10, 50, 100), 10, (10,)),
    ((10, 50, 100), 5, (5,)),
    ((5, 25, 50, 100), 1, (1,)),
    ((100,), 40, (40,)),
    ((99, 100), 100, (99, 100)),
    ((99, 100), 99, (99,)),
]


@pytest.mark.parametrize(("requested", "share", "expected"), CAPPED)
def test_candidate_steps_cap_at_the_share(requested, share, expected):
    assert candidate_steps(requested, share) == expected


@pytest.mark.parametrize(("requested", "share", "message"), [
    ((10, 50), 70, "must end at 100"),
    ((), 70, "must end at 100"),
    ((50, 10, 100), 70, "must increase"),
    ((10, 100), 0, "share 0 is not between 1 and 100"),
    ((10, 100), 101, "share 101 is not between 1 and 100"),
])
def test_candidate_steps_reject(requested, share, message):
    with pytest.raises(InvalidArgument, match=message):
        candidate_steps(requested, share)


# start weights, baseline, candidate, candidate weight, every version's weight
SPLITS = [
    ({"1": 70, "2": 30, "3": 0}, "1", "3", 10, {"1": 60, "2": 30, "3": 10}),
    ({"1": 70, "2": 30, "3": 0}, "1", "3", 50, {"1": 20, "2": 30, "3": 50}),
    ({"1": 70, "2": 30, "3": 0}, "1", "3", 70, {"1": 0, "2": 30, "3": 70}),
    ({"1": 70, "2": 30, "3": 0}, "1", "3", 0, {"1": 70, "2": 30, "3": 0}),
    ({"1": 70, "2": 30, "3": 0}, "2", "3", 10, {"1": 70, "2": 20, "3": 10}),
    ({"1": 70, "2": 30, "3": 0}, "2", "3", 30, {"1": 70, "2": 0, "3": 30}),
    # the demo's split: a canary of 3 leaves version 2's 10 % alone
    ({"1": 90, "2": 10, "3": 0}, "1", "3", 10, {"1": 80, "2": 10, "3": 10}),
    ({"1": 90, "2": 10, "3": 0}, "1", "3", 90, {"1": 0, "2": 10, "3": 90}),
    # a candidate that already carried traffic keeps the share with its baseline
    ({"1": 90, "2": 10}, "1", "2", 5, {"1": 95, "2": 5}),
    ({"1": 90, "2": 10}, "1", "2", 100, {"1": 0, "2": 100}),
    ({"1": 40, "2": 20, "3": 25, "4": 15}, "3", "4", 40, {"1": 40, "2": 20, "3": 0, "4": 40}),
]


@pytest.mark.parametrize(("start", "baseline", "canary", "weight", "expected"), SPLITS)
def test_split_moves_weight_only_between_baseline_and_candidate(start, baseline, canary,
                                                                weight, expected):
    assert Split(start, baseline, canary).weights(weight) == expected


@pytest.mark.parametrize(("start", "baseline", "canary"), [
    ({"1": 70, "2": 30, "3": 0}, "1", "3"), ({"1": 70, "2": 30, "3": 0}, "2", "3"),
    ({"1": 33, "2": 33, "3": 34}, "3", "1"), ({"1": 100, "2": 0}, "1", "2"),
])
def test_every_weight_of_a_split_sums_to_100_and_keeps_the_others(start, baseline, canary):
    split = Split(start, baseline, canary)
    for weight in range(split.share + 1):
        weights = split.weights(weight)
        assert sum(weights.values()) == 100
        assert {v: w for v, w in weights.items() if v not in (baseline, canary)} == {
            v: w for v, w in start.items() if v not in (baseline, canary)}
        TrafficPolicy("mlp", weights)  # a valid policy at every step


@pytest.mark.parametrize("weight", [-1, 71, True])
def test_split_refuses_weights_beyond_the_share(weight):
    with pytest.raises(InvalidArgument, match=f"canary weight {weight} is not between 0 and "
                                              "the share 70 of versions 1 and 3"):
        Split({"1": 70, "2": 30, "3": 0}, "1", "3").weights(weight)


@pytest.mark.parametrize(("baseline", "canary", "message"), [
    ("1", "1", "both version '1'"), ("4", "3", "version '4' has no weight"),
    ("1", "4", "version '4' has no weight"),
])
def test_split_refuses_versions_it_does_not_know(baseline, canary, message):
    with pytest.raises(InvalidArgument, match=message):
        Split({"1": 70, "2": 30, "3": 0}, baseline, canary)


# weights, candidate, --from, the baseline chosen
BASELINES = [
    ({"1": 70, "2": 30, "3": 0}, "3", "", "1"),
    ({"1": 30, "2": 70, "3": 0}, "3", "", "2"),
    ({"1": 70, "2": 30, "3": 0}, "3", "2", "2"),
    ({"1": 90, "2": 10}, "2", "", "1"),
    ({"1": 10, "2": 90}, "2", "", "1"),  # the candidate's own weight does not count
    ({"1": 100, "2": 0, "3": 0}, "3", "", "1"),
    ({"1": 40, "2": 40, "3": 20}, "3", "1", "1"),  # a tie, settled by --from
    ({"1": 40, "2": 40, "3": 20}, "1", "", "2"),  # the candidate's tie does not count
]


@pytest.mark.parametrize(("weights", "canary", "named", "expected"), BASELINES)
def test_choose_baseline(weights, canary, named, expected):
    assert choose_baseline(TrafficPolicy("mlp", weights), canary, named) == expected


@pytest.mark.parametrize(("weights", "canary", "named", "error", "message"), [
    ({"1": 40, "2": 40, "3": 20}, "3", "", InvalidArgument,
     "versions 1 and 2 of model 'mlp' both carry 40%; name the baseline with --from (for "
     "example --from 1)"),
    ({"1": 25, "2": 25, "3": 0, "4": 25, "5": 25}, "5", "", InvalidArgument,
     "versions 1, 2 and 4 of model 'mlp' all carry 25%; name the baseline with --from (for "
     "example --from 1)"),
    ({"1": 0, "2": 0, "3": 100}, "3", "", FailedPrecondition,
     "version '3' already carries all unpinned traffic of model 'mlp'; no other version has "
     "any to move"),
    ({"1": 70, "2": 30, "3": 0}, "3", "3", InvalidArgument,
     "baseline and canary are both version '3'"),
    ({"1": 100, "2": 0, "3": 0}, "3", "2", FailedPrecondition,
     "baseline version '2' of model 'mlp' carries no traffic, so there is none to move to "
     "version '3'"),
    ({"1": 70, "2": 30}, "3", "", InvalidArgument,
     "model 'mlp' has no version '3' (versions: 1, 2)"),
    ({"1": 70, "2": 30, "3": 0}, "3", "7", InvalidArgument,
     "model 'mlp' has no version '7' (versions: 1, 2, 3)"),
])
def test_choose_baseline_refuses(weights, canary, named, error, message):
    with pytest.raises(error) as caught:
        choose_baseline(TrafficPolicy("mlp", weights), canary, named)
    assert caught.value.message == message


START = TrafficPolicy("mlp", {"1": 70, "2": 30, "3": 0}, Shadow("2", 5.0), "eu-west1")


@pytest.mark.parametrize(("current", "expected"), [
    (TrafficPolicy("mlp", {"1": 60, "2": 30, "3": 10}, Shadow("2", 5.0), "eu-west1"), START),
    (TrafficPolicy("mlp", {"1": 0, "2": 100, "3": 0}), START),
    (TrafficPolicy("mlp", {"1": 60, "2": 30, "3": 10, "4": 0}),
     TrafficPolicy("mlp", {"1": 70, "2": 30, "3": 0, "4": 0}, Shadow("2", 5.0), "eu-west1")),
], ids=["a step", "anything else", "a version registered since"])
def test_restored_is_the_policy_before_the_canary(current, expected):
    assert restored(START, current) == expected


@pytest.mark.parametrize(("baseline", "verdicts", "served"), [
    ("1", ["step", "step", "promote"],
     [{"1": 60, "2": 30, "3": 10}, {"1": 20, "2": 30, "3": 50}, {"1": 0, "2": 30, "3": 70},
      {"1": 0, "2": 30, "3": 70}]),
    ("1", ["step", "rollback"],
     [{"1": 60, "2": 30, "3": 10}, {"1": 20, "2": 30, "3": 50}, {"1": 70, "2": 30, "3": 0}]),
    ("2", ["step", "promote"],
     [{"1": 70, "2": 20, "3": 10}, {"1": 70, "2": 0, "3": 30}, {"1": 70, "2": 0, "3": 30}]),
], ids=["promoted", "rolled back at 50", "from 2"])
def test_walkthrough_from_70_30(baseline, verdicts, served):
    """Steps 10,50,100 from 1=70 2=30 3=0, applied as the runner applies verdicts: the
    weights served at the first step and after each verdict."""
    split = Split(dict(START.weights), baseline, "3")
    plan = CanaryPlan("mlp", baseline, "3", steps=candidate_steps((10, 50, 100), split.share),
                      min_requests=1)
    index, seen = 0, [split.weights(plan.steps[0])]
    for action in verdicts:
        verdict = judge(plan, index, BASE, w(50, 50 if action == "rollback" else 0))
        assert verdict.action == action
        if action == "rollback":
            seen.append(restored(START, START.with_weights(seen[-1])).weights)
        else:
            seen.append(split.weights(verdict.weight))
            index += 1
    assert seen == served
