"""What `canary status` and `traffic status` print about a canary."""

import pytest

from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.traffic import format_canary, format_status

PLAN = pb.CanaryPlan(model="mlp", to_version="3", steps=[10, 50, 70], interval_seconds=10,
                     max_error_rate=0.01, max_latency_ratio=1.5, from_version="1")
BEFORE = pb.Policy(model="mlp", weights={"1": 70, "2": 30, "3": 0})
HEAD = ("canary of mlp: 1 → 3, {state}, weight {weight}% (steps 10,50,70, every 10s, max "
        "error rate 0.01, max latency ratio 1.5)")


def canary(state: str, weight: int, now: dict, by_weight: bool = True,
           restore: pb.Policy = BEFORE) -> pb.Canary:
    return pb.Canary(plan=PLAN, baseline="1", state=state, weight=weight, reason="why",
                     updated_at="T", restore=restore, baseline_by_weight=by_weight,
                     current=pb.Policy(model="mlp", weights=now))


@pytest.mark.parametrize(("record", "lines"), [
    (canary("running", 10, {"1": 60, "2": 30, "3": 10}), [
        HEAD.format(state="running", weight=10),
        "  baseline 1: the version with the most weight (--from VERSION names another)",
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=60 2=30 3=10",
        "  rollback restores  1=70 2=30 3=0",
        "  T why"]),
    (canary("rolled_back", 0, {"1": 70, "2": 30, "3": 0}, by_weight=False), [
        HEAD.format(state="rolled_back", weight=0),
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=70 2=30 3=0",
        "  restored           1=70 2=30 3=0",
        "  T why"]),
    (canary("aborted", 0, {"1": 70, "2": 30, "3": 0}, by_weight=False), [
        HEAD.format(state="aborted", weight=0),
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=70 2=30 3=0",
        "  restored           1=70 2=30 3=0",
        "  T why"]),
    (canary("promoted", 70, {"1": 0, "2": 30, "3": 70}, by_weight=False), [
        HEAD.format(state="promoted", weight=70),
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=0 2=30 3=70",
        "  before the canary  1=70 2=30 3=0",
        "  T why"]),
    (canary("promoted", 70, {"1": 0, "2": 30, "3": 70}, by_weight=False,
            restore=pb.Policy()), [
        HEAD.format(state="promoted", weight=70),
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=0 2=30 3=70",
        "  T why"]),
], ids=["running", "rolled back", "aborted", "promoted", "start policy not recorded"])
def test_canary_status(record, lines):
    assert format_canary(record).splitlines() == lines


def test_no_canary():
    assert format_canary(pb.Canary()) == "no canary"


@pytest.mark.parametrize(("record", "head"), [
    (canary("running", 10, {}), "mlp  (canary 1 → 3 running at 10%, a rollback restores "
                                "1=70 2=30 3=0)"),
    (canary("rolled_back", 0, {}), "mlp  (canary 1 → 3 rolled_back at 0%)"),
    (pb.Canary(), "mlp"),
], ids=["running", "ended", "none"])
def test_traffic_status_names_the_canary_and_what_a_rollback_restores(record, head):
    weights = {"1": 60, "2": 30, "3": 10}
    model = pb.ModelStatus(policy=pb.Policy(model="mlp", weights=weights), canary=record)
    for version, weight in weights.items():
        model.versions.add(version=version, weight=weight)
    lines = format_status(pb.StatusResponse(models=[model], snapshot_version="s")).splitlines()
    assert lines[0] == head
    assert [line.split()[:2] for line in lines[2:5]] == [["1", "60%"], ["2", "30%"],
                                                         ["3", "10%"]]
