"""Readiness of model versions: the control plane's table, and what the ingress makes of it."""

import asyncio
from pathlib import Path

import pytest

from meshserve.common.errors import Unavailable
from meshserve.common.liveness import REASON_LIMIT
from meshserve.common.server import HealthServicer
from meshserve.common.tls import TlsFiles
from meshserve.ingress.readiness import ANY, STRICT, Readiness
from meshserve.mesh.policy import Endpoint, TrafficPolicy
from meshserve.mesh.readiness import Changes, VersionState, table
from meshserve.mesh.readiness import Readiness as ControlPlaneReadiness
from meshserve.protocol import admin_pb2
from meshserve.protocol.health_pb2 import HealthCheckRequest, HealthCheckResponse

POLICIES = {"mlp": TrafficPolicy("mlp", {"1": 90, "2": 10, "10": 0}),
            "cnn": TrafficPolicy("cnn", {"1": 0, "2": 100})}
ENDPOINTS = (Endpoint("mlp", "1", "a:1"), Endpoint("mlp", "1", "b:1"),
             Endpoint("mlp", "2", "c:1"), Endpoint("cnn", "2", "d:1"),
             Endpoint("gone", "1", "e:1"))


def test_a_version_is_ready_when_one_of_its_batchers_serves():
    states = table(POLICIES, ENDPOINTS + (Endpoint("cnn", "1", "f:1"),),
                   {"a:1": False, "b:1": True, "c:1": False, "d:1": True, "e:1": True})
    assert states == (VersionState("cnn", "1", 0, False), VersionState("cnn", "2", 100, True),
                      VersionState("mlp", "1", 90, True), VersionState("mlp", "2", 10, False))


def test_a_version_that_is_not_ready_says_why_as_one_of_its_batchers_said():
    states = table(POLICIES, ENDPOINTS, {"a:1": False, "b:1": True, "d:1": False},
                   {"a:1": "refused a", "c:1": "", "d:1": "refused d", "e:1": "refused e"})
    assert states == (VersionState("cnn", "2", 100, False, "refused d"),
                      VersionState("mlp", "1", 90, True, ""),  # b:1 serves it
                      VersionState("mlp", "2", 10, False, ""))  # c:1 said nothing


def test_a_version_with_neither_traffic_nor_a_batcher_is_left_out():
    names = [(v.model, v.version) for v in table(POLICIES, ENDPOINTS, {})]
    assert ("mlp", "10") not in names and ("cnn", "1") not in names
    assert ("mlp", "2") in names  # weight 10, even with its batcher down


def test_a_model_the_ingress_does_not_serve_holds_no_readiness():
    """`up` on another repository: the demo's policies stay in the store, their batchers are
    gone; the ingress counts only the models of its repository, so it can become ready (and a
    Kubernetes mesh whose model lost every batcher is still not ready)."""
    states = table(POLICIES | {"linear": TrafficPolicy("linear", {"1": 100})},
                   (Endpoint("linear", "1", "g:1"),), {"g:1": True})
    assert ("mlp", "1", False) in {(v.model, v.version, v.ready) for v in states}
    sent = admin_pb2.Readiness(versions=[
        admin_pb2.VersionReadiness(model=v.model, version=v.version, weight=v.weight,
                                   ready=v.ready) for v in states])
    ingress = Readiness(STRICT, served=frozenset({"linear"}))
    ingress.update(sent)
    assert ingress.ready() and set(ingress.models) == {"linear"}
    ingress.admit("mlp", "1")  # not its model: refused, if at all, further on
    every = Readiness(STRICT)
    every.update(sent)
    assert not every.ready()


def test_a_weighted_version_without_a_batcher_of_a_served_model_is_not_ready():
    """Its share of the model's requests has nowhere to go."""
    states = table(POLICIES, (Endpoint("mlp", "1", "a:1"),), {"a:1": True})
    assert [v for v in states if v.model == "mlp"] == [
        VersionState("mlp", "1", 90, True), VersionState("mlp", "2", 10, False)]


class Store:
    """What the control plane's readiness reads of the mesh's state."""

    def __init__(self, endpoints) -> None:
        self._endpoints = endpoints

    def policies(self):
        return POLICIES

    def endpoints(self):
        return self._endpoints


def fresh_control_plane() -> ControlPlaneReadiness:
    """The readiness of a control plane that has just started: no batcher has answered yet
    (nothing here connects to one; their answers are reported by hand)."""
    return ControlPlaneReadiness(Store(ENDPOINTS[:4]), Changes(),
                                 TlsFiles.for_identity(Path("unused"), "control-plane"),
                                 "batcher")


async def test_a_fresh_control_plane_waits_to_know_every_batchers_health():
    state = fresh_control_plane()
    waiting = asyncio.create_task(state.known(timeout=60))
    for address, serving in (("a:1", False), ("b:1", True), ("c:1", False)):
        state.health.report(address, serving)
        for _ in range(10):  # turns enough for the waiting task to see it ("d:1" unknown)
            await asyncio.sleep(0)
        assert not waiting.done()
    state.health.report("d:1", True)
    await asyncio.wait_for(waiting, 10)
    assert state.table() == (VersionState("cnn", "2", 100, True),
                             VersionState("mlp", "1", 90, True),
                             VersionState("mlp", "2", 10, False))
    state.health.report("c:1", False, "refusing model 'mlp' version 2: model.pt: bad")
    assert state.table()[2].reason == "refusing model 'mlp' version 2: model.pt: bad"
    state.health.report("c:1", True, "stale")
    assert state.table()[2] == VersionState("mlp", "2", 10, True, "")


async def test_a_batcher_that_never_answers_holds_the_first_table_back_only_so_long():
    state = fresh_control_plane()
    state.health.report("a:1", True)
    await asyncio.wait_for(state.known(timeout=0.05), 10)
    assert [v.ready for v in state.table()] == [False, True, False]  # only "a:1" answered


def readiness(rule: str, ready: dict[tuple[str, str], bool]) -> Readiness:
    state = Readiness(rule)
    state.update(admin_pb2.Readiness(versions=[
        admin_pb2.VersionReadiness(model=v.model, version=v.version, weight=v.weight,
                                   ready=ready.get((v.model, v.version), True))
        for v in table(POLICIES, ENDPOINTS, {})]))
    return state


EVERY = (("cnn", "2"), ("mlp", "1"), ("mlp", "2"))


@pytest.mark.parametrize(("not_ready", "strict", "any_"), [
    ((), True, True),
    ((("mlp", "2"),), False, True),
    ((("mlp", "1"), ("mlp", "2")), False, True),
    (EVERY[1:], False, True),  # one version can answer
    (EVERY, False, False),
])
def test_server_ready_strict_and_any(not_ready, strict, any_):
    ready = {key: False for key in not_ready}
    assert readiness(STRICT, ready).ready() is strict
    assert readiness(ANY, ready).ready() is any_


def test_no_table_yet_is_not_ready_and_refuses_nothing():
    state = Readiness()
    assert not state.ready()
    state.admit("mlp", "1")


def test_a_pinned_request_for_a_version_that_is_not_ready_is_refused_with_a_hint():
    state = readiness(STRICT, {("mlp", "2"): False})
    with pytest.raises(Unavailable) as refused:
        state.admit("mlp", "2")
    assert refused.value.message.startswith("model 'mlp' version '2' is not ready")
    assert refused.value.retry_after == 1.0
    state.admit("mlp", "1")
    state.admit("mlp", "")  # version 1 carries traffic and can answer


def test_the_ingress_says_why_a_version_cannot_answer_as_its_compute_said():
    long = "refusing model 'mlp' version 2: model.pt: " + "x" * 1000
    state = Readiness()
    state.update(admin_pb2.Readiness(versions=[
        admin_pb2.VersionReadiness(model="mlp", version="1", weight=100, ready=True,
                                   reason="stale"),
        admin_pb2.VersionReadiness(model="mlp", version="2", ready=False, reason=long),
        admin_pb2.VersionReadiness(model="mlp", version="3", ready=False)]))
    assert state.refusal("mlp", "2") == long[:REASON_LIMIT]
    assert state.refusal("mlp", "1") == state.refusal("mlp", "3") == ""
    assert state.refusal("mlp", "4") == state.refusal("cnn", "1") == ""
    with pytest.raises(Unavailable) as refused:
        state.admit("mlp", "2")
    assert refused.value.message.startswith(
        f"model 'mlp' version '2' is not ready: {long[:REASON_LIMIT]}")
    with pytest.raises(Unavailable, match="version '3' is not ready: no compute replica"):
        state.admit("mlp", "3")


def test_an_unpinned_refusal_says_why_each_version_with_traffic_cannot_answer():
    state = Readiness()
    state.update(admin_pb2.Readiness(versions=[
        admin_pb2.VersionReadiness(model="m", version="1", weight=60, ready=False,
                                   reason="refusing model 'm' version 1: warm-up failed"),
        admin_pb2.VersionReadiness(model="m", version="2", weight=40, ready=False),
        admin_pb2.VersionReadiness(model="m", version="3", ready=False,
                                   reason="refusing model 'm' version 3: no traffic")]))
    with pytest.raises(Unavailable) as refused:
        state.admit("m", "")
    assert refused.value.message == (
        "model 'm' is not ready: no version that carries its traffic has a compute replica "
        "that can answer now; refusing model 'm' version 1: warm-up failed; retry after 1 s")


async def test_health_says_why_it_is_not_serving_bounded_and_only_while_not_serving():
    health = HealthServicer()
    watch = health.Watch(HealthCheckRequest(), None)
    assert await anext(watch) == HealthCheckResponse(status=HealthCheckResponse.NOT_SERVING)
    health.set(False, reason="refused: " + "x" * 1000)  # the reason alone changed: told
    told = await asyncio.wait_for(anext(watch), 10)
    assert told.status == HealthCheckResponse.NOT_SERVING
    assert told.reason == ("refused: " + "x" * 1000)[:REASON_LIMIT]
    assert health.answer() == told  # what a Check answers
    health.set(True, reason="ignored")
    assert await asyncio.wait_for(anext(watch), 10) == HealthCheckResponse(
        status=HealthCheckResponse.SERVING)
    health.close()
    await watch.aclose()


def test_an_unpinned_request_is_refused_only_when_no_version_with_traffic_can_answer():
    state = readiness(STRICT, {("mlp", "1"): False, ("mlp", "2"): False})
    with pytest.raises(Unavailable, match="model 'mlp' is not ready"):
        state.admit("mlp", "")
    state.admit("unknown", "")  # not in the table: the mesh decides


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="not one of strict, any"):
        Readiness("some")
