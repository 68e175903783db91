"""Canary analysis: the verdict rules, their boundaries, and the plan's inputs."""

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.mesh.canary import (
    CanaryPlan,
    Verdict,
    VersionWindow,
    judge,
    parse_duration,
    parse_steps,
    weights,
)
from meshserve.mesh.policy import TrafficPolicy

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


@pytest.mark.parametrize(("canary_weight", "expected"), [
    (0, {"1": 100, "2": 0}), (5, {"1": 95, "2": 5}), (100, {"1": 0, "2": 100}),
])
def test_weights(canary_weight, expected):
    assert weights(PLAN, canary_weight) == expected
    policy = TrafficPolicy("mlp", {"1": 100, "2": 0}).with_weights(weights(PLAN, canary_weight))
    assert policy.weights == expected


@pytest.mark.parametrize("canary_weight", [-1, 101, True])
def test_weights_out_of_range(canary_weight):
    with pytest.raises(InvalidArgument, match="canary weight"):
        weights(PLAN, canary_weight)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5m", 90.0),
    (" 10s ", 10.0), ("0.5s", 0.5), (".5s", 0.5), ("1ms", 0.001),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "30", "s", "30 sec", "1d", "-5s", "0s", "0ms", "1h30m", "5S", "1e3s", "inf s", "nan s",
    "١s",
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
    ({"steps": (5, 50)}, "end at 100"),
    ({"steps": ()}, "end at 100"),
    ({"interval_s": 0.0}, "interval"),
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
