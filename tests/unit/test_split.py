"""The router's split of unpinned groups, read from gRPC's xDS client status (CSDS)."""

import random
from collections import Counter

import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from meshserve.mesh import resources as res
from meshserve.mesh.policy import Endpoint, MeshState, TrafficPolicy
from meshserve.router.split import MeshSplits, Split, routes_of

MLP = TrafficPolicy("mlp", {"1": 90, "2": 10, "3": 0})
CNN = TrafficPolicy("cnn", {"2": 100})
ENDPOINTS = (Endpoint("mlp", "1", "127.0.0.1:1001"), Endpoint("mlp", "1", "127.0.0.1:1002"),
             Endpoint("mlp", "2", "127.0.0.1:1003"), Endpoint("cnn", "2", "127.0.0.1:1004"))


def status_of(state: MeshState, version: str = "v1",
              skip: tuple[str, ...] = ()) -> csds_pb2.ClientStatusResponse:
    """What gRPC's xDS client would report after receiving `state`'s resources."""
    status = csds_pb2.ClientStatusResponse()
    config = status.config.add()
    for type_url, named in res.resources(state).items():
        for name, resource in named.items():
            if name in skip:
                continue
            packed = any_pb2.Any()
            packed.Pack(resource)
            config.generic_xds_configs.add(
                type_url=type_url, name=name, version_info=version, xds_config=packed,
                client_status=config_dump_shared_pb2.ClientResourceStatus.ACKED)
    return status


def test_the_split_is_the_routes_weights_by_version_with_endpoints_counted():
    splits = routes_of(status_of(MeshState({"mlp": MLP, "cnn": CNN}, ENDPOINTS)))
    assert splits["mlp"] == Split(versions=("1", "2", "3"), weights=(("1", 90), ("2", 10)),
                                  endpoints={"1": ("127.0.0.1:1001", "127.0.0.1:1002"),
                                             "2": ("127.0.0.1:1003",), "3": ()})
    assert splits["cnn"] == Split(versions=("2",), weights=(("2", 100),),
                                  endpoints={"2": ("127.0.0.1:1004",)})


def test_a_model_whose_route_has_not_arrived_has_no_split():
    state = MeshState({"mlp": MLP, "cnn": CNN}, ENDPOINTS)
    assert set(routes_of(status_of(state, skip=("cnn-routes",)))) == {"mlp"}


@pytest.mark.parametrize(("draw", "version"), [
    (0.0, "1"), (0.5, "1"), (0.8999, "1"), (0.9, "2"), (0.9999, "2")])
def test_pick_maps_a_uniform_draw_onto_the_weights(draw, version):
    split = Split(versions=("1", "2"), weights=(("1", 90), ("2", 10)))
    assert split.pick(lambda: draw) == version


def test_picks_follow_the_weights():
    split = Split(versions=("1", "2", "3"), weights=(("1", 70), ("2", 20), ("3", 10)))
    rng = random.Random(7)
    counts = Counter(split.pick(rng.random) for _ in range(10_000))
    assert abs(counts["1"] - 7000) < 200
    assert abs(counts["2"] - 2000) < 150
    assert abs(counts["3"] - 1000) < 100


def test_nothing_to_pick_when_no_version_carries_weight():
    assert Split(versions=("1",), weights=()).pick(lambda: 0.3) is None


class FakeClient:
    """gRPC's xDS client as the router sees it: a status dump, counted."""

    def __init__(self, state: MeshState, version: str = "v1") -> None:
        self.set(state, version)
        self.dumps = 0

    def set(self, state: MeshState, version: str) -> None:
        self.raw = status_of(state, version).SerializeToString()

    def dump(self) -> bytes:
        self.dumps += 1
        return self.raw


def test_the_status_is_read_again_only_when_older_than_max_age_and_parsed_when_changed():
    now = [100.0]
    client = FakeClient(MeshState({"mlp": MLP}, ENDPOINTS))
    splits = MeshSplits(client.dump, lambda: now[0], max_age=0.02)
    first = splits.get("mlp")
    assert first.weights == (("1", 90), ("2", 10)) and client.dumps == 1
    now[0] += 0.01
    assert splits.get("mlp") is first and client.dumps == 1
    now[0] += 0.05
    assert splits.get("mlp") is first and client.dumps == 2  # read, same versions: kept
    client.set(MeshState({"mlp": TrafficPolicy("mlp", {"1": 50, "2": 50})}, ENDPOINTS), "v2")
    now[0] += 0.05
    assert splits.get("mlp").weights == (("1", 50), ("2", 50))
