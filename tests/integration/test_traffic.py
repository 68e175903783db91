"""The mesh steering traffic through gRPC's own xDS client: splits, pins, live shifts,
control-plane restarts and automated canaries, against `meshserve up`."""

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy
import pytest
import yaml

from meshserve.common.tls import TlsFiles
from meshserve.protocol import admin_pb2 as admin
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.traffic import admin_channel
from tests.integration.conftest import children_of, meshserve
from tests.integration.test_mesh import public_stub
from tests.polling import until

MLP = numpy.ones((1, 256), numpy.float32).tobytes()


def request(model: str, version: str = "", row: numpy.ndarray | None = None):
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    data = MLP if row is None else row.tobytes()
    width = 256 if row is None else row.shape[1]
    message.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, width])
    message.raw_input_contents.append(data)
    return message


@dataclass
class Load:
    """Answers seen by a bounded background load: (time, version or status name)."""

    seen: list[tuple[float, str]] = field(default_factory=list)

    def versions_after(self, moment: float) -> set[str]:
        return {what for at, what in self.seen if at >= moment}

    @property
    def failures(self) -> list[str]:
        return [what for _, what in self.seen if not what.isdigit()]


async def drive(stub, model: str, seconds: float, load: Load, workers: int = 8,
                make=None) -> None:
    """Closed-loop load for `seconds`, bounded in time; every answer is recorded."""
    deadline = time.monotonic() + seconds
    rng = numpy.random.default_rng(3)

    async def worker() -> None:
        while time.monotonic() < deadline:
            message = make(rng) if make else request(model)
            try:
                reply = await stub.ModelInfer(message, timeout=10)
                load.seen.append((time.monotonic(), reply.model_version))
            except grpc.aio.AioRpcError as error:
                load.seen.append((time.monotonic(), error.code().name))

    await asyncio.gather(*(worker() for _ in range(workers)))


async def admin_stub(mesh):
    port = (mesh.data_dir / "run" / "control-plane.port").read_text().strip()
    channel = admin_channel(f"127.0.0.1:{port}", TlsFiles.for_identity(mesh.tls, "client"))
    return channel, AdminStub(channel)


async def set_weights(mesh, model: str, weights: dict[str, int]) -> None:
    channel, stub = await admin_stub(mesh)
    async with channel:
        await stub.SetPolicy(admin.SetPolicyRequest(
            policy=admin.Policy(model=model, weights=weights), reason="test"), timeout=10)


async def weights_of(mesh, model: str) -> dict[str, int]:
    channel, stub = await admin_stub(mesh)
    async with channel:
        status = await stub.Status(admin.StatusRequest(model=model), timeout=10)
    return dict(status.models[0].policy.weights)


async def test_weighted_split_holds_over_1000_requests(mesh):
    assert await weights_of(mesh, "mlp") == {"1": 90, "2": 10}
    channel, stub = await public_stub(mesh)
    counts = {"1": 0, "2": 0}
    async with channel:
        for _ in range(1000):  # one at a time: each request is a group of its own
            counts[(await stub.ModelInfer(request("mlp"), timeout=10)).model_version] += 1
    assert sum(counts.values()) == 1000
    assert 50 <= counts["2"] <= 150, counts  # binomial(1000, 0.1): mean 100, sd 9.5


async def test_pins_always_reach_their_version(mesh):
    channel, stub = await public_stub(mesh)
    async with channel:
        for version in ("1", "2"):
            by_field = [(await stub.ModelInfer(request("mlp", version), timeout=10)).model_version
                        for _ in range(50)]
            by_header = [(await stub.ModelInfer(request("mlp"), timeout=10,
                                                metadata=(("x-model-version", version),))
                          ).model_version for _ in range(50)]
            assert set(by_field) == {version}
            assert set(by_header) == {version}


async def test_live_shift_follows_within_a_second_without_errors(mesh):
    channel, stub = await public_stub(mesh)
    load = Load()
    try:
        async with channel:
            driving = asyncio.create_task(drive(stub, "mlp", 5.0, load))
            await until(lambda: {"1", "2"} <= load.versions_after(0), 3.0,
                        "answers from both versions before the shift")
            await set_weights(mesh, "mlp", {"1": 0, "2": 100})
            shifted = time.monotonic()
            await driving
        assert load.failures == []
        assert {"1", "2"} <= load.versions_after(0)
        assert load.versions_after(shifted + 1.0) == {"2"}
        last_v1 = max((at for at, what in load.seen if what == "1"), default=shifted)
        print(f"shift propagated in {max(0.0, last_v1 - shifted) * 1000:.0f} ms")
    finally:
        await set_weights(mesh, "mlp", {"1": 90, "2": 10})


def control_plane_pid(mesh) -> int:
    for pid in children_of(mesh.data_dir):
        if b"control-plane" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no control plane process")


async def test_control_plane_restart_under_load_fails_nothing(mesh):
    before = await weights_of(mesh, "mlp")
    old = control_plane_pid(mesh)
    channel, stub = await public_stub(mesh)
    load = Load()
    async with channel:
        driving = asyncio.create_task(drive(stub, "mlp", 6.0, load))
        await until(lambda: len(load.seen) >= 50, 3.0, "the load under way")
        os.kill(old, signal.SIGKILL)
        await driving
    assert load.failures == []
    assert len(load.seen) > 100
    for _ in range(100):  # `up` restarts it on the same port
        try:
            assert await weights_of(mesh, "mlp") == before
            break
        except (grpc.aio.AioRpcError, FileNotFoundError):  # down, or its port not yet written
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("control plane did not come back")
    assert control_plane_pid(mesh) != old


async def run_canary(mesh, to_version: str) -> tuple[admin.Canary, Load, float]:
    channel, stub = await public_stub(mesh)
    admin_channel_, admin_api = await admin_stub(mesh)
    load = Load()

    def random_row(rng):
        return request("flaky", row=rng.standard_normal((1, 8)).astype(numpy.float32))

    async with channel, admin_channel_:
        driving = asyncio.create_task(drive(stub, "flaky", 30.0, load, workers=4,
                                            make=random_row))
        await until(lambda: len(load.seen) >= 20, 10.0, "the load under way")
        started = time.monotonic()
        await admin_api.StartCanary(admin.CanaryPlan(
            model="flaky", to_version=to_version, steps=[50, 100], interval_seconds=2,
            max_error_rate=0.01, max_latency_ratio=50, min_requests=5), timeout=10)
        while time.monotonic() - started < 25:
            canary = await admin_api.GetCanary(admin.ModelRef(model="flaky"), timeout=10)
            if canary.state != "running":
                break
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        driving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await driving
    return canary, load, elapsed



async def test_canary_of_a_faulty_version_rolls_back_by_itself(mesh):
    try:
        canary, load, elapsed = await run_canary(mesh, "2")
        assert canary.state == "rolled_back"
        assert canary.reason.startswith("error rate ")
        assert await weights_of(mesh, "flaky") == {"1": 100, "2": 0, "3": 0}
        print(f"canary rolled back {elapsed:.1f} s after it started")
        channel, stub = await admin_stub(mesh)
        async with channel:
            audit = await stub.Audit(admin.AuditRequest(verify=True), timeout=10)
        assert list(audit.problems) == []
        rollbacks = [e for e in audit.entries if e.action == "canary.rollback"]
        assert rollbacks and rollbacks[-1].reason == canary.reason
        assert rollbacks[-1].actor == "canary-controller"
    finally:
        await set_weights(mesh, "flaky", {"1": 100, "2": 0, "3": 0})


async def test_canary_of_a_healthy_version_promotes(mesh):
    try:
        canary, load, _ = await run_canary(mesh, "3")
        assert canary.state == "promoted", canary.reason
        assert canary.weight == 100
        assert await weights_of(mesh, "flaky") == {"1": 0, "2": 0, "3": 100}
        assert load.failures == []
    finally:
        await set_weights(mesh, "flaky", {"1": 100, "2": 0, "3": 0})


def test_traffic_cli_sets_and_shows_weights(mesh):
    data = f"--data-dir={mesh.data_dir}"
    try:
        done = meshserve("traffic", "set", "mlp", "1=50", "2=50", data)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == "mlp: 1=50 2=50"
        status = meshserve("traffic", "status", "mlp", data)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()
                if line.startswith("  ") and line.split()[0].isdigit()}
        assert rows == {"1": "50%", "2": "50%"}
        bad = meshserve("traffic", "set", "mlp", "1=50", "2=60", data)
        assert bad.returncode == 1
        assert "weights of model 'mlp' sum to 110, not 100" in bad.stdout
        for weights, refusal in ((["3=100"], "model 'mlp' has no version '3' (versions: 1, 2)"),
                                 (["1=" + "9" * 20, "2=0"],
                                  f"weight {'9' * 20} of version '1' is not between 0 and 100")):
            bad = meshserve("traffic", "set", "mlp", *weights, data)  # a typo sends nothing
            assert (bad.returncode, bad.stdout.strip()) == (2, f"error: {refusal}")
        back = meshserve("traffic", "rollback", "mlp", data)
        assert back.stdout.strip() == "mlp rolled back to: 1=90 2=10"
    finally:
        asyncio.run(set_weights(mesh, "mlp", {"1": 90, "2": 10}))


def test_rollback_past_a_registration_keeps_the_version(mesh):
    """Rolling back all the way (past version 2's registration) restores weights only:
    version 2 stays listed at 0 %, pinnable, ready and served by its batcher."""
    data = f"--data-dir={mesh.data_dir}"
    try:
        while True:  # back to the first policy ever served: mlp's first version alone
            back = meshserve("traffic", "rollback", "mlp", data)
            if back.returncode != 0:
                assert "no earlier policy to roll back to" in back.stdout, back.stdout
                break
            assert back.stdout.startswith("mlp rolled back to: ")
            assert " 2=" in back.stdout, back.stdout
        assert asyncio.run(weights_of(mesh, "mlp")) == {"1": 100, "2": 0}

        async def version_2_answers():
            channel, stub = await public_stub(mesh)
            async with channel:
                for message, metadata in ((request("mlp", "2"), ()),
                                          (request("mlp"), (("x-model-version", "2"),))):
                    reply = await stub.ModelInfer(message, timeout=10, metadata=metadata)
                    assert reply.model_version == "2"
                ready = await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="2"),
                                              timeout=10)
                assert ready.ready is True
        asyncio.run(version_2_answers())
        assert meshserve("traffic", "pin", "mlp", "2", data).stdout.strip() == "mlp: 1=0 2=100"
    finally:
        asyncio.run(set_weights(mesh, "mlp", {"1": 90, "2": 10}))


async def test_shadow_copies_are_compared_and_never_answer_the_client(mesh):
    data = f"--data-dir={mesh.data_dir}"
    try:
        await set_weights(mesh, "mlp", {"1": 100, "2": 0})
        done = meshserve("traffic", "shadow", "mlp", "2", "--percent", "100", data)
        assert done.stdout.strip() == "mlp: 1=100 2=0, shadow 100% to 2", done.stdout
        channel, stub = await public_stub(mesh)
        admin_channel_, admin_api = await admin_stub(mesh)
        served: list[str] = []
        shadow = None

        async def compared_30() -> bool:
            """Ten more requests (routers learn shadow targets from the control plane within
            a second), then whether 30 shadow copies were compared."""
            nonlocal shadow
            served.extend([(await stub.ModelInfer(request("mlp"), timeout=10)).model_version
                           for _ in range(10)])
            status = await admin_api.Status(admin.StatusRequest(model="mlp"), timeout=10)
            shadow = {v.version: v.shadow for v in status.models[0].versions}["2"]
            return shadow.compared >= 30

        async with channel, admin_channel_:
            await until(compared_30, 30.0, "30 shadow copies compared", interval=0.2)
        assert set(served) == {"1"}  # shadow answers never reach the client
        assert 30 <= shadow.compared <= len(served)
        assert shadow.differing == shadow.compared  # versions 1 and 2 have other weights
        assert shadow.max_abs_diff > 1e-5
    finally:
        meshserve("traffic", "shadow", "mlp", "--off", data)
        await set_weights(mesh, "mlp", {"1": 90, "2": 10})


async def first_refusal(stub, message, seconds: float = 10.0) -> grpc.aio.AioRpcError:
    """The error of the first refused request, sent until one is (the mesh applies a policy
    change within milliseconds)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await stub.ModelInfer(message, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
        assert time.monotonic() < deadline, "every request was answered"
        await asyncio.sleep(0.05)


async def answered(stub, message, seconds: float = 10.0):
    """The first answer, sent until one comes."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await stub.ModelInfer(message, timeout=10)
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "no request was answered"
            await asyncio.sleep(0.05)


async def test_region_policy_keeps_traffic_in_its_region(mesh):
    data = f"--data-dir={mesh.data_dir}"
    channel, stub = await public_stub(mesh)
    try:
        unforced = meshserve("traffic", "region", "cnn", "eu-west1", data)
        assert unforced.returncode == 1
        assert "has no endpoint in region 'eu-west1'" in unforced.stdout
        done = meshserve("traffic", "region", "cnn", "eu-west1", "--force", data)
        assert done.stdout.strip() == "cnn: 1=0 2=100, region eu-west1 only", done.stdout
        message = request("cnn")
        message.inputs[0].ClearField("shape")
        message.inputs[0].shape.extend([1, 3, 64, 64])
        message.raw_input_contents[0] = numpy.ones((1, 3, 64, 64), numpy.float32).tobytes()
        async with channel:
            refused = await first_refusal(stub, message)
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "batcher of cnn@2 unavailable" in refused.details()
            # Not ready, not an error: no endpoint of the region answers.
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="cnn"), timeout=10)
            assert ready.ready is False
            meshserve("traffic", "region", "cnn", "local", data)
            assert (await answered(stub, message)).model_version == "2"
    finally:
        meshserve("traffic", "region", "cnn", "--off", data)


def test_canary_cli_starts_reports_and_aborts(mesh):
    data = f"--data-dir={mesh.data_dir}"
    try:
        started = meshserve("canary", "start", "flaky", "--to", "3", "--steps", "10,100",
                            "--interval", "60s", data)
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.startswith("canary of flaky: 1 → 3, running, weight 10%")
        again = meshserve("canary", "start", "flaky", "--to", "3", data)
        assert again.returncode == 1
        assert "a canary of model 'flaky' is already running" in again.stdout
        status = meshserve("canary", "status", "flaky", data)
        assert "running, weight 10%" in status.stdout
        aborted = meshserve("canary", "abort", "flaky", data)
        assert "aborted, weight 0%" in aborted.stdout
        assert asyncio.run(weights_of(mesh, "flaky")) == {"1": 100, "2": 0, "3": 0}
    finally:
        asyncio.run(set_weights(mesh, "flaky", {"1": 100, "2": 0, "3": 0}))


def test_traffic_render_istio(mesh):
    """To the umbrella chart's batcher Services (release `mesh`), one per version, on 7003;
    or, with --host, to subsets of one Service."""
    done = meshserve("traffic", "render", "mlp", "--istio", "--namespace", "serving",
                     f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d["kind"] for d in documents] == ["VirtualService", *["DestinationRule"] * 2]
    hosts = [f"mesh-mlp-{v}-batcher.serving.svc.cluster.local" for v in ("1", "2")]
    assert [d["spec"]["host"] for d in documents[1:]] == hosts
    split = documents[0]["spec"]["http"][-1]["route"]
    assert sorted((r["destination"]["host"], r["destination"]["port"]["number"], r["weight"])
                  for r in split) == [(hosts[0], 7003, 90), (hosts[1], 7003, 10)]
    done = meshserve("traffic", "render", "mlp", "--istio", "--host", "mlp.serving",
                     "--port", "7010", "--release", "prod", f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d["kind"] for d in documents] == ["VirtualService", "DestinationRule"]
    assert {r["destination"]["subset"]: (r["destination"]["host"],
                                         r["destination"]["port"]["number"])
            for r in documents[0]["spec"]["http"][-1]["route"]} == {
        "v1": ("mlp.serving", 7010), "v2": ("mlp.serving", 7010)}
    refused = meshserve("traffic", "render", "mlp", "--istio", "--release", "Prod.1",
                        f"--data-dir={mesh.data_dir}")
    assert (refused.returncode, refused.stdout) == (
        2, "error: release 'Prod.1' is not one the charts install (at most 53 lower-case "
           "letters, digits or '-', starting with a letter and ending with a letter or digit)\n")
    # A cluster whose DNS domain is not cluster.local (the charts' clusterDomain).
    done = meshserve("traffic", "render", "mlp", "--istio", "--namespace", "serving",
                     "--cluster-domain", "corp.example", f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    hosts = [f"mesh-mlp-{v}-batcher.serving.svc.corp.example" for v in ("1", "2")]
    assert documents[0]["spec"]["hosts"] == hosts
    assert [d["spec"]["host"] for d in documents[1:]] == hosts
    assert "cluster.local" not in done.stdout
    refused = meshserve("traffic", "render", "mlp", "--istio", "--cluster-domain",
                        "Corp.Example", f"--data-dir={mesh.data_dir}")
    assert (refused.returncode, refused.stdout.count("\n")) == (2, 1), refused.stdout
    assert refused.stdout.startswith("error: --cluster-domain 'Corp.Example' is not a DNS "
                                     "domain")
