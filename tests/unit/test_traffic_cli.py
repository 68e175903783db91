"""What `canary status` and `traffic status` print about a canary."""

import pytest

from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.traffic import format_canary, format_status

PLAN = pb.CanaryPlan(model="mlp", to_version="3", steps=[10, 50, 70], interval_seconds=10,
                     max_error_rate=0.01, max_latency_ratio=1.5, from_version="1")
START = {"1": 70, "2": 30, "3": 0}
BEFORE = pb.Policy(model="mlp", weights=START)
HEAD = ("canary of mlp: 1 → 3, {state}, weight {weight}% (steps 10,50,70, every 10s, max "
        "error rate 0.01, max latency ratio 1.5)")


def canary(state: str, weight: int, now: dict, by_weight: bool = True,
           restore: pb.Policy = BEFORE) -> pb.Canary:
    return pb.Canary(plan=PLAN, baseline="1", state=state, weight=weight, reason="why",
                     updated_at="T", restore=restore, baseline_by_weight=by_weight,
                     current=pb.Policy(model="mlp", weights=now))


CAPPED = "  steps end at 70%: what 1 and 3 carried together when it started"
CHOSEN = "  baseline 1: the version with the most weight (--from VERSION names another)"
AT_START = "1=70 2=30 3=0"
PROMOTED = {"1": 0, "2": 30, "3": 70}


def printed(state: str, weight: int, now: str, start: str = "",
            chosen: bool = False) -> list[str]:
    """What `canary status` prints; `start`: its line about the policy the canary began from."""
    return [HEAD.format(state=state, weight=weight), *([CHOSEN] if chosen else []), CAPPED,
            f"  weights now        {now}", *([start] if start else []), "  T why"]


@pytest.mark.parametrize(("record", "lines"), [
    (canary("running", 10, {"1": 60, "2": 30, "3": 10}),
     printed("running", 10, "1=60 2=30 3=10", f"  rollback restores  {AT_START}", True)),
    (canary("rolled_back", 0, START, by_weight=False),
     printed("rolled_back", 0, AT_START, f"  restored           {AT_START}")),
    (canary("aborted", 0, START, by_weight=False),
     printed("aborted", 0, AT_START, f"  restored           {AT_START}")),
    (canary("promoted", 70, PROMOTED, by_weight=False),
     printed("promoted", 70, "1=0 2=30 3=70", f"  before the canary  {AT_START}")),
    (canary("promoted", 70, PROMOTED, by_weight=False, restore=pb.Policy()),
     printed("promoted", 70, "1=0 2=30 3=70")),
], ids=["running", "rolled back", "aborted", "promoted", "start policy not recorded"])
def test_canary_status(record, lines):
    assert format_canary(record).splitlines() == lines


def test_no_canary():
    assert format_canary(pb.Canary()) == "no canary"


@pytest.mark.parametrize(("record", "head"), [
    (canary("running", 10, {}), "mlp  (canary 1 → 3 running at 10%, a rollback restores "
                                "1=70 2=30 3=0)"),
    (canary("rolled_back", 0, {}), "mlp  (last canary 1 → 3 rolled_back at 0%)"),
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
