"""xDS resources built from the mesh state, and the snapshot that packs and checks them."""

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from meshserve.common.errors import FailedPrecondition
from meshserve.mesh import resources as res
from meshserve.mesh.policy import Endpoint, MeshState, TrafficPolicy
from meshserve.mesh.snapshot import Snapshot, check_consistent

POLICY = TrafficPolicy("mlp", {"1": 90, "2": 10})
E1A = Endpoint("mlp", "1", "10.0.0.1:8001", region="us", zone="us-1a")
E1B = Endpoint("mlp", "1", "10.0.0.2:8002", region="us", zone="us-1a")
E1C = Endpoint("mlp", "1", "[fd00::3]:8003", region="us", zone="us-1b")
E1D = Endpoint("mlp", "1", "10.1.0.4:8004", region="eu", zone="eu-1a")
E2A = Endpoint("mlp", "2", "10.0.0.5:9001", region="us", zone="us-1a")
BERT = TrafficPolicy("bert", {"3": 100})
EB = Endpoint("bert", "3", "10.2.0.1:7000")
STATE = MeshState({"mlp": POLICY, "bert": BERT}, (E1A, E1B, E1C, E1D, E2A, EB))


def manager_of(listener: listener_pb2.Listener) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    return manager


@pytest.mark.parametrize("model", ["mlp", "bert", "resnet-50"])
def test_listener_is_named_after_the_model_and_routes_by_rds(model):
    listener = res.listener(model)
    assert listener.name == model
    manager = manager_of(listener)
    assert manager.WhichOneof("route_specifier") == "rds"
    assert manager.rds.route_config_name == f"{model}-routes"
    assert manager.rds.config_source.HasField("ads")
    assert manager.rds.config_source.resource_api_version == config_source_pb2.V3
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    assert manager.http_filters[-1].typed_config.Is(router_pb2.Router.DESCRIPTOR)


def test_names():
    assert res.cluster_name("mlp", "2") == "mlp-v2"
    assert res.route_name("mlp") == "mlp-routes"


# name, policy, expected split [(cluster, weight)]
SPLITS = [
    ("90/10", POLICY, [("mlp-v1", 90), ("mlp-v2", 10)]),
    ("zero weight left out", TrafficPolicy("mlp", {"1": 100, "2": 0}), [("mlp-v1", 100)]),
    ("three versions, one idle", TrafficPolicy("mlp", {"1": 0, "2": 30, "3": 70}),
     [("mlp-v2", 30), ("mlp-v3", 70)]),
]


@pytest.mark.parametrize("policy, split", [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_route_configuration_pins_each_version_then_splits_by_weight(policy, split):
    config = res.route_configuration(policy)
    assert config.name == "mlp-routes"
    assert len(config.virtual_hosts) == 1
    host = config.virtual_hosts[0]
    assert (host.name, list(host.domains)) == ("mlp", ["*"])
    routes = list(host.routes)
    assert len(routes) == len(policy.versions) + 1
    for version, route in zip(policy.versions, routes):
        assert route.match.prefix == "/"
        assert len(route.match.headers) == 1
        header = route.match.headers[0]
        assert header.name == "x-model-version"
        assert header.WhichOneof("header_match_specifier") == "exact_match"
        assert header.exact_match == version
        assert route.route.WhichOneof("cluster_specifier") == "cluster"
        assert route.route.cluster == f"mlp-v{version}"
    last = routes[-1]
    assert last.match.prefix == "/"
    assert list(last.match.headers) == []
    assert last.route.WhichOneof("cluster_specifier") == "weighted_clusters"
    got = sorted((c.name, c.weight.value) for c in last.route.weighted_clusters.clusters)
    assert got == split
    for route in routes:
        retry = route.route.retry_policy
        assert (retry.retry_on, retry.num_retries.value) == ("unavailable,cancelled", 1)


def test_cluster_is_eds_over_ads_with_circuit_breaker_and_outlier_detection():
    cluster = res.cluster("mlp", "2")
    assert cluster.name == "mlp-v2"
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.eds_cluster_config.eds_config.resource_api_version == config_source_pb2.V3
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    thresholds = cluster.circuit_breakers.thresholds
    assert len(thresholds) == 1
    assert thresholds[0].max_requests.value == res.MAX_REQUESTS == 1024
    assert cluster.HasField("outlier_detection")
    outlier = cluster.outlier_detection
    assert outlier.interval.seconds == 1
    assert outlier.base_ejection_time.seconds == 10
    assert outlier.max_ejection_percent.value == 50
    assert outlier.failure_percentage_threshold.value == 50
    assert outlier.enforcing_failure_percentage.value == 100


def localities(assignment: endpoint_pb2.ClusterLoadAssignment) -> list:
    return [((g.locality.region, g.locality.zone), g.load_balancing_weight.value,
             [(e.endpoint.address.socket_address.address,
               e.endpoint.address.socket_address.port_value) for e in g.lb_endpoints])
            for g in assignment.endpoints]


# name, endpoints, region, expected localities
ASSIGNMENTS = [
    ("grouped by region and zone, sorted", [E1A, E1B, E1C, E1D], "",
     [(("eu", "eu-1a"), 1, [("10.1.0.4", 8004)]),
      (("us", "us-1a"), 1, [("10.0.0.1", 8001), ("10.0.0.2", 8002)]),
      (("us", "us-1b"), 1, [("fd00::3", 8003)])]),
    ("region keeps only its endpoints", [E1A, E1B, E1C, E1D], "us",
     [(("us", "us-1a"), 1, [("10.0.0.1", 8001), ("10.0.0.2", 8002)]),
      (("us", "us-1b"), 1, [("fd00::3", 8003)])]),
    ("region eu", [E1A, E1B, E1C, E1D], "eu", [(("eu", "eu-1a"), 1, [("10.1.0.4", 8004)])]),
    ("region with no endpoints there", [E1A, E1B, E1C, E1D], "ap", []),
    ("no endpoints", [], "", []),
    ("default locality", [Endpoint("mlp", "1", "h:1")], "", [(("local", ""), 1, [("h", 1)])]),
]


@pytest.mark.parametrize("endpoints, region, expected", [c[1:] for c in ASSIGNMENTS],
                         ids=[c[0] for c in ASSIGNMENTS])
def test_load_assignment_groups_endpoints_by_locality(endpoints, region, expected):
    assignment = res.load_assignment("mlp", "1", endpoints, region)
    assert assignment.cluster_name == "mlp-v1"
    assert localities(assignment) == expected
    for group in assignment.endpoints:
        assert group.HasField("load_balancing_weight")  # gRPC drops a locality without one
        for lb in group.lb_endpoints:
            assert lb.health_status == health_check_pb2.HEALTHY


def test_resources_cover_every_model():
    built = res.resources(STATE)
    assert set(built) == set(res.TYPES)
    assert sorted(built[res.LISTENER]) == ["bert", "mlp"]
    assert sorted(built[res.ROUTE]) == ["bert-routes", "mlp-routes"]
    assert sorted(built[res.CLUSTER]) == ["bert-v3", "mlp-v1", "mlp-v2"]
    assert sorted(built[res.ENDPOINTS]) == ["bert-v3", "mlp-v1", "mlp-v2"]
    assert [len(g.lb_endpoints) for g in built[res.ENDPOINTS]["mlp-v1"].endpoints] == [1, 2, 1]
    assert localities(built[res.ENDPOINTS]["mlp-v2"]) == [
        (("us", "us-1a"), 1, [("10.0.0.5", 9001)])]
    assert localities(built[res.ENDPOINTS]["bert-v3"]) == [
        (("local", ""), 1, [("10.2.0.1", 7000)])]


def test_resources_apply_the_policy_region():
    state = MeshState({"mlp": TrafficPolicy("mlp", {"1": 90, "2": 10}, region="eu")},
                      (E1A, E1D, E2A))
    built = res.resources(state)
    assert localities(built[res.ENDPOINTS]["mlp-v1"]) == [
        (("eu", "eu-1a"), 1, [("10.1.0.4", 8004)])]
    assert list(built[res.ENDPOINTS]["mlp-v2"].endpoints) == []  # none up there: none at all


def test_resources_of_an_empty_state_are_empty():
    assert res.resources(MeshState()) == {kind: {} for kind in res.TYPES}


def test_snapshot_packs_every_resource_by_type_and_name():
    snapshot = Snapshot.of(STATE)
    assert set(snapshot.resources) == set(res.TYPES)
    listener = listener_pb2.Listener()
    assert snapshot.resources[res.LISTENER]["mlp"].Unpack(listener)
    assert listener == res.listener("mlp")
    route = route_pb2.RouteConfiguration()
    assert snapshot.resources[res.ROUTE]["mlp-routes"].Unpack(route)
    assert route == res.route_configuration(POLICY)
    assert snapshot.resources[res.CLUSTER]["mlp-v1"].type_url == res.CLUSTER
    assert snapshot.resources[res.ENDPOINTS]["mlp-v1"].type_url == res.ENDPOINTS
    assert len(snapshot.version) == 16


def test_snapshot_version_is_stable_for_equal_states():
    reordered = MeshState({"bert": BERT, "mlp": TrafficPolicy("mlp", {"2": 10, "1": 90})},
                          STATE.endpoints)
    assert Snapshot.of(STATE).version == Snapshot.of(STATE).version
    assert Snapshot.of(reordered).version == Snapshot.of(STATE).version


# name, changed state
CHANGES = [
    ("a weight", MeshState({"mlp": TrafficPolicy("mlp", {"1": 80, "2": 20}), "bert": BERT},
                           STATE.endpoints)),
    ("an endpoint removed", MeshState(STATE.policies, STATE.endpoints[1:])),
    ("a region", MeshState({"mlp": TrafficPolicy("mlp", {"1": 90, "2": 10}, region="us"),
                            "bert": BERT}, STATE.endpoints)),
    ("a model removed", MeshState({"mlp": POLICY}, STATE.endpoints)),
]


@pytest.mark.parametrize("changed", [c[1] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_snapshot_version_changes_with_the_state(changed):
    assert Snapshot.of(changed).version != Snapshot.of(STATE).version


def broken(kind: str, name: str) -> dict:
    built = res.resources(STATE)
    del built[kind][name]
    return built


# name, resources, expected message
INCONSISTENT = [
    ("missing route", broken(res.ROUTE, "mlp-routes"),
     "listener 'mlp' names missing route 'mlp-routes'"),
    ("missing pinned cluster", broken(res.CLUSTER, "bert-v3"),
     "route 'bert-routes' names missing cluster 'bert-v3'"),
    ("missing split-only cluster", broken(res.CLUSTER, "mlp-v2"),
     "route 'mlp-routes' names missing cluster 'mlp-v2'"),
    ("missing load assignment", broken(res.ENDPOINTS, "mlp-v1"),
     "cluster 'mlp-v1' has no load assignment"),
]


@pytest.mark.parametrize("built, message", [c[1:] for c in INCONSISTENT],
                         ids=[c[0] for c in INCONSISTENT])
def test_check_consistent_names_what_is_missing(built, message):
    with pytest.raises(FailedPrecondition) as caught:
        check_consistent(built)
    assert caught.value.message == message


def test_check_consistent_accepts_built_resources_and_a_cluster_in_the_split_only():
    built = res.resources(STATE)
    check_consistent(built)
    route = built[res.ROUTE]["mlp-routes"]
    del route.virtual_hosts[0].routes[:2]  # only the split is left
    check_consistent(built)
    route.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].name = "mlp-v9"
    with pytest.raises(FailedPrecondition) as caught:
        check_consistent(built)
    assert caught.value.message == "route 'mlp-routes' names missing cluster 'mlp-v9'"


SNAPSHOT = Snapshot.of(STATE)

# name, kind, names, expected names
NAMED = [
    ("all clusters when none named", res.CLUSTER, set(), ["bert-v3", "mlp-v1", "mlp-v2"]),
    ("one cluster", res.CLUSTER, {"mlp-v2"}, ["mlp-v2"]),
    ("unknown names dropped", res.CLUSTER, {"mlp-v2", "nope", "bert-v3"}, ["bert-v3", "mlp-v2"]),
    ("only unknown", res.LISTENER, {"nope"}, []),
    ("all listeners", res.LISTENER, set(), ["bert", "mlp"]),
    ("unknown kind", "type.googleapis.com/unknown", set(), []),
]


@pytest.mark.parametrize("kind, names, expected", [c[1:] for c in NAMED],
                         ids=[c[0] for c in NAMED])
def test_snapshot_named(kind, names, expected):
    found = SNAPSHOT.named(kind, names)
    unpacked = []
    for message in found:
        target = {res.LISTENER: listener_pb2.Listener(),
                  res.CLUSTER: cluster_pb2.Cluster()}[kind]
        assert message.Unpack(target)
        unpacked.append(target.name)
    assert sorted(unpacked) == expected
