"""Canaries on a model with three versions, against `meshserve up`: weight moves only between
the baseline and the candidate, a rollback restores exactly the policy the canary started
from, and the audit log holds the policies before and after each change.

`mlp` version 3 (written before `up` starts) fails every request whose input sums above 0:
a load of rows of ones finds it broken, a load of rows of minus ones healthy.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass

import numpy
import pytest

from meshserve.mesh.policy import TrafficPolicy
from meshserve.protocol import admin_pb2 as admin
from tests.integration.conftest import meshserve, running_mesh
from tests.integration.flaky_model import write_mlp_version_3
from tests.integration.test_mesh import public_stub
from tests.integration.test_traffic import Load, admin_stub, drive, request, weights_of
from tests.polling import until

START = {"1": 70, "2": 30, "3": 0}
BROKEN = numpy.ones((1, 256), numpy.float32)  # version 3 fails these
FINE = -BROKEN  # and answers these
# Steps every 2 s; latency is not what these tests judge.
CANARY = ("--steps", "10,50,100", "--interval", "2s", "--min-requests", "5",
          "--max-latency-ratio", "50")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """`meshserve up` whose mlp has versions 1, 2 and 3."""
    data_dir = tmp_path_factory.mktemp("three") / "data"
    write_mlp_version_3(data_dir / "models")
    with running_mesh(data_dir) as started:
        yield started


@pytest.fixture
def from_70_30(three):
    """mlp at 1=70 2=30 3=0, and no canary left running afterwards."""
    done = cli(three, "traffic", "set", "mlp", "1=70", "2=30", "3=0")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield three
    finally:
        cli(three, "canary", "abort", "mlp")


def cli(mesh, *args: str):
    return meshserve(*args, f"--data-dir={mesh.data_dir}")


@dataclass
class Run:
    started: str  # what `canary start` printed
    seen: list[dict]  # every policy GetCanary showed while it ran, in order (from the
    # first poll, a second after the start: a failing canary may have ended by then)
    canary: admin.Canary  # its record once it ended
    load: Load


async def run_canary(mesh, row: numpy.ndarray, *flags: str) -> Run:
    """`canary start mlp --to 3 FLAGS` under a closed-loop load of `row`, until it ends."""
    channel, stub = await public_stub(mesh)
    admin_channel, api = await admin_stub(mesh)
    load, seen = Load(), []
    async with channel, admin_channel:
        driving = asyncio.create_task(drive(stub, "mlp", 40.0, load, workers=6,
                                            make=lambda rng: request("mlp", row=row)))
        try:
            await until(lambda: len(load.seen) >= 20, 10.0, "the load under way")
            started = await asyncio.to_thread(cli, mesh, "canary", "start", "mlp", "--to", "3",
                                              *CANARY, *flags)
            assert started.returncode == 0, started.stdout + started.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                canary = await api.GetCanary(admin.ModelRef(model="mlp"), timeout=10)
                if canary.state != "running":
                    break
                current = dict(canary.current.weights)
                if not seen or seen[-1] != current:
                    seen.append(current)
                await asyncio.sleep(0.2)
        finally:
            driving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driving
    return Run(started.stdout, seen, canary, load)


async def canary_entries(mesh) -> list[tuple[str, dict, dict]]:
    """(action, weights before, weights after) of the audit log's entries of the last
    canary, after checking the hash chain."""
    channel, api = await admin_stub(mesh)
    async with channel:
        audit = await api.Audit(admin.AuditRequest(verify=True), timeout=10)
    assert list(audit.problems) == []
    entries = [e for e in audit.entries if e.action.startswith("canary.")]
    last_start = max(i for i, e in enumerate(entries) if e.action == "canary.start")
    return [(e.action, TrafficPolicy.from_json(e.before).weights,
             TrafficPolicy.from_json(e.after).weights) for e in entries[last_start:]]


def weights_column(status: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in status.splitlines()
            if line.startswith("  ") and line.split()[0].isdigit()}


async def test_a_failing_canary_keeps_2_and_rolls_back_to_70_30_exactly(from_70_30):
    mesh = from_70_30
    run = await run_canary(mesh, BROKEN)
    assert run.started.splitlines()[:5] == [
        "canary of mlp: 1 → 3, running, weight 10% (steps 10,50,70, every 2s, max error rate "
        "0.01, max latency ratio 50)",
        "  baseline 1: the version with the most weight (--from VERSION names another)",
        "  steps end at 70%: what 1 and 3 carried together when it started",
        "  weights now        1=60 2=30 3=10",
        "  rollback restores  1=70 2=30 3=0"]
    assert run.canary.state == "rolled_back", run.canary.reason
    assert run.canary.reason.startswith("error rate ")
    assert await weights_of(mesh, "mlp") == START
    assert await canary_entries(mesh) == [
        ("canary.start", START, {"1": 60, "2": 30, "3": 10}),
        ("canary.rollback", {"1": 60, "2": 30, "3": 10}, START)]
    assert {"1", "2"} <= run.load.versions_after(0)  # the others kept serving
    assert run.load.failures  # version 3's answers
    status = cli(mesh, "canary", "status", "mlp").stdout.splitlines()
    assert status[0].startswith("canary of mlp: 1 → 3, rolled_back, weight 0% ")
    assert status[3:5] == ["  weights now        1=70 2=30 3=0",
                           "  restored           1=70 2=30 3=0"]
    assert status[5].endswith(run.canary.reason)


async def test_a_healthy_canary_keeps_2_and_promotes_to_0_30_70(from_70_30):
    mesh = from_70_30
    run = await run_canary(mesh, FINE)
    assert run.canary.state == "promoted", run.canary.reason
    assert await weights_of(mesh, "mlp") == {"1": 0, "2": 30, "3": 70}
    steps = [{"1": 60, "2": 30, "3": 10}, {"1": 20, "2": 30, "3": 50}, {"1": 0, "2": 30, "3": 70}]
    assert run.seen == steps
    assert await canary_entries(mesh) == [
        ("canary.start", START, steps[0]), ("canary.step", steps[0], steps[1]),
        ("canary.step", steps[1], steps[2]), ("canary.promote", steps[2], steps[2])]
    assert run.load.failures == []
    undo = cli(mesh, "traffic", "rollback", "mlp")  # the canary is one change to undo
    assert undo.stdout.strip() == "mlp rolled back to: 1=70 2=30 3=0", undo.stdout


async def test_from_2_moves_weight_only_between_2_and_3(from_70_30):
    mesh = from_70_30
    run = await run_canary(mesh, FINE, "--from", "2")
    assert run.started.startswith("canary of mlp: 2 → 3, running, weight 10% (steps 10,30, ")
    assert "the version with the most weight" not in run.started
    assert run.canary.state == "promoted", run.canary.reason
    steps = [{"1": 70, "2": 20, "3": 10}, {"1": 70, "2": 0, "3": 30}]
    assert run.seen == steps
    assert await weights_of(mesh, "mlp") == steps[-1]
    assert await canary_entries(mesh) == [
        ("canary.start", START, steps[0]), ("canary.step", steps[0], steps[1]),
        ("canary.promote", steps[1], steps[1])]
    assert run.load.failures == []


def test_a_second_canary_and_other_changes_are_refused_while_one_runs(from_70_30):
    mesh = from_70_30
    first = cli(mesh, "canary", "start", "mlp", "--to", "3", "--steps", "10,100",
                "--interval", "60s")
    assert first.returncode == 0, first.stdout + first.stderr
    running = ("(1 → 3, weight 10%); abort it first (meshserve canary abort mlp)")
    second = cli(mesh, "canary", "start", "mlp", "--to", "3", "--from", "2")
    assert (second.returncode, second.stdout.strip()) == (
        1, f"error: FAILED_PRECONDITION: a canary of model 'mlp' is already running {running}")
    manual = cli(mesh, "traffic", "set", "mlp", "1=100")
    assert (manual.returncode, manual.stdout.strip()) == (
        1, f"error: FAILED_PRECONDITION: a canary of model 'mlp' is running {running}")
    assert asyncio.run(weights_of(mesh, "mlp")) == {"1": 60, "2": 30, "3": 10}
    status = cli(mesh, "traffic", "status", "mlp").stdout
    assert weights_column(status) == {"1": "60%", "2": "30%", "3": "10%"}
    assert status.startswith("mlp  (canary 1 → 3 running at 10%, a rollback restores 1=70 "
                             "2=30 3=0)\n"), status
    aborted = cli(mesh, "canary", "abort", "mlp")
    assert aborted.stdout.splitlines()[3:5] == ["  weights now        1=70 2=30 3=0",
                                                "  restored           1=70 2=30 3=0"], (
        aborted.returncode, aborted.stdout, aborted.stderr)
    assert asyncio.run(weights_of(mesh, "mlp")) == START


def test_an_ambiguous_baseline_is_refused(three):
    tie = cli(three, "traffic", "set", "mlp", "1=50", "2=50", "3=0")
    assert tie.returncode == 0, tie.stdout
    refused = cli(three, "canary", "start", "mlp", "--to", "3")
    assert (refused.returncode, refused.stdout.strip()) == (
        1, "error: INVALID_ARGUMENT: versions 1 and 2 of model 'mlp' both carry 50%; name the "
           "baseline with --from (for example --from 1)")
    assert asyncio.run(weights_of(three, "mlp")) == {"1": 50, "2": 50, "3": 0}
