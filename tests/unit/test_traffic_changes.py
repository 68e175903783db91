"""`meshserve traffic …` changes through the real admin servicer, in process: conditional
writes that lose no concurrent change, canary thresholds as given, and the command line's
refusals before it connects."""

import argparse
import subprocess
import sys

import grpc
import pytest

from meshserve.common.errors import InvalidArgument, ServingError
from meshserve.mesh.admin import AdminServicer
from meshserve.mesh.control import ControlPlane
from meshserve.mesh.istio import batcher_host, render
from meshserve.mesh.policy import Endpoint, Shadow, TrafficPolicy
from meshserve.mesh.store import Store
from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.cli import main
from meshserve.tools.traffic import (
    CONFLICT_TRIES,
    change,
    format_canary,
    format_status,
    policy_text,
    with_region,
    with_shadow,
    with_weights,
)
from tests.peers import Peer  # the operator's certificate: changes take an operator's


class Stub:
    """Calls the servicer as an AdminStub would, errors as gRPC statuses; `before_set` runs
    before each SetPolicy (another operator's change landing in between)."""

    def __init__(self, servicer: AdminServicer, before_set=None) -> None:
        self._servicer = servicer
        self._before_set = before_set

    def __getattr__(self, name: str):
        async def call(request, **_):
            if name == "SetPolicy" and self._before_set is not None:
                await self._before_set()
            try:
                return await getattr(self._servicer, name)(request, Peer())
            except ServingError as error:
                raise grpc.aio.AioRpcError(getattr(grpc.StatusCode, error.code),
                                           grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           error.message) from None
        return call


@pytest.fixture
async def control(tmp_path):
    plane = ControlPlane(Store.open(tmp_path / "mesh.db"))
    for version in ("1", "2"):
        plane.register(Endpoint("mlp", version, f"10.0.0.{version}:8001"), "alice")
    yield plane
    await plane.close()


def args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"model": "mlp", "reason": "", "off": False, **kwargs})


def shadow_args() -> argparse.Namespace:
    return args(version="1", percent=10.0)


async def test_a_change_landing_between_read_and_write_is_kept(control):
    """`traffic set` reads the policy, then `traffic shadow` lands, then set writes: set is
    refused (ABORTED), reads again and keeps the shadow."""
    servicer = AdminServicer(control)
    landed = []

    async def shadow_first():
        if not landed:
            landed.append(await change(Stub(servicer), shadow_args(),
                                       with_shadow(shadow_args())))

    text = await change(Stub(servicer, shadow_first), args(),
                        with_weights(args(), {"1": 40, "2": 60}))
    assert control.policy("mlp") == TrafficPolicy("mlp", {"1": 40, "2": 60}, Shadow("1", 10.0))
    assert landed == ["mlp: 1=100 2=0, shadow 10% to 1"]
    assert text == "mlp: 1=40 2=60, shadow 10% to 1"


async def test_a_policy_that_keeps_changing_is_reported(control):
    servicer = AdminServicer(control)
    turn = iter(range(1, 100))

    async def another_change():
        share = next(turn)
        control.set_weights("mlp", {"1": 100 - share, "2": share}, "bob")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await change(Stub(servicer, another_change), args(),
                     with_region(args(region="local")))
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert "changed since it was read" in refused.value.details()
    assert control.policy("mlp").region == ""
    assert CONFLICT_TRIES > 1


async def test_the_same_policy_again_is_unchanged(control):
    servicer = AdminServicer(control)
    entries = len(control.store.audit())
    text = await change(Stub(servicer), args(), with_weights(args(), {"1": 100}))
    assert text == "mlp unchanged: 1=100 2=0"
    assert len(control.store.audit()) == entries


async def test_a_region_without_endpoints_is_refused_unless_forced(control):
    servicer = AdminServicer(control)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await change(Stub(servicer), args(), with_region(args(region="eu-west1")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no endpoint in region 'eu-west1'" in refused.value.details()
    text = await change(Stub(servicer), args(), with_region(args(region="eu-west1")),
                        force=True)
    assert text == "mlp: 1=100 2=0, region eu-west1 only"


def plan(**numbers) -> pb.CanaryPlan:
    return pb.CanaryPlan(model="mlp", to_version="2", steps=[10, 100], **numbers)


async def test_canary_thresholds_of_zero_are_taken_as_given(control):
    servicer = AdminServicer(control)
    started = await servicer.StartCanary(plan(interval_seconds=5, max_error_rate=0,
                                              max_latency_ratio=1, min_requests=1), Peer())
    assert (started.plan.max_error_rate, started.plan.max_latency_ratio,
            started.plan.min_requests) == (0.0, 1.0, 1)
    assert control.store.canary("mlp")["plan"]["max_error_rate"] == 0.0


@pytest.mark.parametrize(("numbers", "refusal"), [
    ({"max_latency_ratio": 0}, "max latency ratio 0.0 must be at least 1"),
    ({"min_requests": 0}, "min requests 0 must be at least 1"),
    ({"interval_seconds": 0}, "interval 0.0 s must be above 0"),
])
async def test_canary_thresholds_of_zero_are_checked_not_defaulted(control, numbers, refusal):
    with pytest.raises(InvalidArgument, match=refusal):
        await AdminServicer(control).StartCanary(plan(**numbers), Peer())
    assert control.store.canary("mlp") is None


async def test_unset_canary_thresholds_are_the_defaults(control):
    started = await AdminServicer(control).StartCanary(plan(), Peer())
    assert (started.plan.interval_seconds, started.plan.max_error_rate,
            started.plan.max_latency_ratio, started.plan.min_requests) == (30, 0.01, 1.5, 20)


@pytest.mark.parametrize(("argv", "refusal"), [
    (["traffic", "shadow", "mlp"], "error: name the version to mirror to"),
    (["traffic", "shadow", "mlp", "--percent", "10"], "error: name the version to mirror to"),
    (["traffic", "shadow", "mlp", "2", "--off"], "error: --off turns shadowing off: name no "
                                                 "version (got '2')"),
    (["traffic", "region", "mlp"], "error: name the region"),
    (["traffic", "region", "mlp", "EU West/1"], "error: region 'EU West/1' is not a locality "
                                                "region name"),
    (["traffic", "region", "mlp", "  "], "error: region '  ' is not a locality region name"),
    (["traffic", "region", "mlp", "a" * 300],
     f"error: region '{'a' * 40}'… (300 characters) is not a locality region name"),
    (["traffic", "set", "mlp", "1=50", "1=50"], "error: version '1' is given twice ('1=50')"),
    (["canary", "start", "mlp", "--to", "2", "--steps", "-5,100"],
     "error: steps '-5,100' are not comma-separated whole percents"),
    (["canary", "start", "mlp", "--to", "2", "--interval", "-5s"],
     "error: duration '-5s' is not a number with a unit"),
    (["canary", "start", "mlp", "--to", "2", "--interval", "99999999h"],
     "error: duration '99999999h' is longer than 86400 s"),
    *[(["traffic", "render", "mlp", "--istio", f"--cluster-domain={domain}"],
       f"error: --cluster-domain '{domain}' is not a DNS domain")
      for domain in ("Cluster.Local", "cluster..local", "cluster.local.", "-corp.example", "")],
])
def test_the_command_line_refuses_in_one_line_before_connecting(argv, refusal, tmp_path,
                                                                 capsys):
    assert main([*argv, f"--data-dir={tmp_path}"]) == 2  # no control plane there
    out, err = capsys.readouterr()
    assert out.startswith(refusal) and out.count("\n") == 1 and err == ""


def test_policy_text_shows_shadow_and_region():
    policy = pb.Policy(model="cnn", weights={"1": 0, "2": 100}, region="eu-west1",
                       shadow=pb.Shadow(version="1", percent=5))
    assert policy_text(policy) == "1=0 2=100, shadow 5% to 1, region eu-west1 only"
    canary = pb.Canary(plan=pb.CanaryPlan(model="cnn", to_version="2", steps=[100]),
                       baseline="1", state="running", weight=100, restore=policy,
                       current=pb.Policy(model="cnn", weights={"1": 0, "2": 100}))
    assert ("  rollback restores  1=0 2=100, shadow 5% to 1, region eu-west1 only"
            in format_canary(canary).splitlines())


def test_status_shows_shadow_comparisons_only_while_shadowing():
    model = pb.ModelStatus(policy=pb.Policy(model="mlp", weights={"1": 100, "2": 0}))
    model.versions.add(version="2", shadow=pb.ShadowReport(compared=10, differing=1))
    assert "shadow:" not in format_status(pb.StatusResponse(models=[model]))
    model.policy.shadow.version, model.policy.shadow.percent = "2", 10
    assert "shadow: 1 of 10 answers differ" in format_status(pb.StatusResponse(models=[model]))


@pytest.mark.parametrize(("model", "host"), [
    ("mlp", "mesh-mlp-1-batcher.serving.svc.cluster.local"),
    ("mlp_onnx", "mesh-mlp-onnx-1-batcher.serving.svc.cluster.local"),
    ("My.Model", "mesh-my-model-1-batcher.serving.svc.cluster.local"),
])
def test_render_host_is_the_charts_service_name(model, host):
    assert batcher_host(model, "1", "serving") == host
    [virtual_service, _] = render(TrafficPolicy(model, {"1": 100}), namespace="serving")
    assert virtual_service["spec"]["hosts"] == [host]


@pytest.mark.parametrize("domain", ["corp.example", "k8s-prod.internal", "local"])
def test_render_hosts_end_in_the_cluster_domain(domain):
    """Every host rendered: the VirtualService's, each route's and mirror's destination, each
    DestinationRule's."""
    hosts = [f"mesh-mlp-{v}-batcher.serving.svc.{domain}" for v in ("1", "2")]
    assert batcher_host("mlp", "1", "serving", cluster_domain=domain) == hosts[0]
    [virtual_service, *rules] = render(
        TrafficPolicy("mlp", {"1": 90, "2": 10}, shadow=Shadow("2", 5)), namespace="serving",
        cluster_domain=domain)
    assert virtual_service["spec"]["hosts"] == hosts
    routes = virtual_service["spec"]["http"]
    targets = [r["destination"] for route in routes for r in route["route"]]
    mirrors = [route["mirror"] for route in routes if "mirror" in route]
    assert mirrors and {target["host"] for target in targets + mirrors} == set(hosts)
    assert [rule["spec"]["host"] for rule in rules] == hosts


@pytest.mark.parametrize(("model", "namespace", "refusal"), [
    ("mlp", "Bad_NS", "namespace 'Bad_NS' is not a DNS label"),
    ("__", "default", "has no letter or digit"),
])
def test_render_host_refusals(model, namespace, refusal):
    with pytest.raises(InvalidArgument, match=refusal):
        batcher_host(model, "1", namespace)


def test_render_refuses_a_cluster_domain_that_is_no_dns_domain():
    with pytest.raises(InvalidArgument, match="cluster domain 'svc.Cluster' is not a DNS "
                                              "domain"):
        render(TrafficPolicy("mlp", {"1": 100}), cluster_domain="svc.Cluster")


def test_output_cut_short_by_its_reader_is_no_error():
    """`canary status | head -1`: no BrokenPipeError traceback."""
    done = subprocess.run(
        f"{sys.executable} -c \"from meshserve.tools.traffic import emit; "
        f"emit('line\\n' * 100000, 0)\" | head -1", shell=True, capture_output=True,
        text=True, timeout=60)
    assert done.stdout == "line\n" and done.stderr == ""
