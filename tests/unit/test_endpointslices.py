"""EndpointSlices → endpoints, with the `kubernetes` client's own model objects."""

import pytest
from kubernetes.client import (
    DiscoveryV1EndpointPort,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1ObjectMeta,
)

from meshserve.mesh.endpointslices import endpoints_from_slices, region_of_zone, watch_selector
from meshserve.mesh.policy import Endpoint

LABELS = {"meshserve.io/model": "mlp", "meshserve.io/version": "1",
          "kubernetes.io/service-name": "batcher"}


def conditions(ready=True, terminating=None, serving=None) -> V1EndpointConditions:
    return V1EndpointConditions(ready=ready, terminating=terminating, serving=serving)


def endpoint(*addresses: str, cond: V1EndpointConditions | None = None,
             zone: str | None = "us-east1-b", topology: dict | None = None) -> V1Endpoint:
    return V1Endpoint(addresses=list(addresses), conditions=cond, zone=zone,
                      deprecated_topology=topology)


def endpoint_slice(*endpoints: V1Endpoint, labels: dict | None = None, name: str = "batcher-a",
                   ports: list | None = None, address_type: str = "IPv4") -> V1EndpointSlice:
    return V1EndpointSlice(
        address_type=address_type,
        metadata=V1ObjectMeta(name=name, namespace="serving",
                              labels=LABELS if labels is None else labels),
        endpoints=list(endpoints),
        ports=[DiscoveryV1EndpointPort(name="grpc", port=8001, protocol="TCP")]
        if ports is None else ports)


def ep(address: str, version: str = "1", region: str = "us-east1", zone: str = "us-east1-b",
       model: str = "mlp") -> Endpoint:
    return Endpoint(model=model, version=version, address=address, region=region, zone=zone)


V2 = {**LABELS, "meshserve.io/version": "2"}

CASES = [
    ("ready", [endpoint_slice(endpoint("10.0.0.1", cond=conditions(ready=True)))],
     [ep("10.0.0.1:8001")]),
    ("not ready", [endpoint_slice(endpoint("10.0.0.1", cond=conditions(ready=False)))], []),
    ("ready unknown counts as ready",
     [endpoint_slice(endpoint("10.0.0.1", cond=conditions(ready=None)))], [ep("10.0.0.1:8001")]),
    ("no conditions at all counts as ready",
     [endpoint_slice(endpoint("10.0.0.1", cond=None))], [ep("10.0.0.1:8001")]),
    ("terminating but still serving is left out",
     [endpoint_slice(endpoint("10.0.0.1",
                              cond=conditions(ready=False, serving=True, terminating=True)))], []),
    ("terminating with ready unknown is left out",
     [endpoint_slice(endpoint("10.0.0.1", cond=conditions(ready=None, terminating=True)))], []),
    ("terminating false", [endpoint_slice(endpoint("10.0.0.1", cond=conditions(
        ready=True, terminating=False)))], [ep("10.0.0.1:8001")]),
    ("two addresses of one endpoint", [endpoint_slice(endpoint("10.0.0.2", "10.0.0.1"))],
     [ep("10.0.0.1:8001"), ep("10.0.0.2:8001")]),
    ("IPv6 bracketed and normalised",
     [endpoint_slice(endpoint("FD00:0:0::1"), address_type="IPv6")], [ep("[fd00::1]:8001")]),
    ("no labels", [endpoint_slice(endpoint("10.0.0.1"), labels={})], []),
    ("no version label",
     [endpoint_slice(endpoint("10.0.0.1"), labels={"meshserve.io/model": "mlp"})], []),
    ("no model label",
     [endpoint_slice(endpoint("10.0.0.1"), labels={"meshserve.io/version": "1"})], []),
    ("version that is not a number",
     [endpoint_slice(endpoint("10.0.0.1"), labels={**LABELS, "meshserve.io/version": "v1"})],
     []),
    ("no metadata", [V1EndpointSlice(address_type="IPv4", endpoints=[endpoint("10.0.0.1")],
                                     ports=[DiscoveryV1EndpointPort(name="grpc", port=8001)])],
     []),
    ("wrong port name", [endpoint_slice(endpoint("10.0.0.1"), ports=[
        DiscoveryV1EndpointPort(name="metrics", port=9090)])], []),
    ("unnamed port", [endpoint_slice(endpoint("10.0.0.1"), ports=[
        DiscoveryV1EndpointPort(port=8001)])], []),
    ("no ports", [endpoint_slice(endpoint("10.0.0.1"), ports=[])], []),
    ("named port among others", [endpoint_slice(endpoint("10.0.0.1"), ports=[
        DiscoveryV1EndpointPort(name="metrics", port=9090),
        DiscoveryV1EndpointPort(name="grpc", port=7003)])], [ep("10.0.0.1:7003")]),
    ("two slices of one version merged, duplicates dropped", [
        endpoint_slice(endpoint("10.0.0.3"), endpoint("10.0.0.1"), name="batcher-a"),
        endpoint_slice(endpoint("10.0.0.2"), endpoint("10.0.0.1"), name="batcher-b"),
    ], [ep("10.0.0.1:8001"), ep("10.0.0.2:8001"), ep("10.0.0.3:8001")]),
    ("two versions, sorted by number", [
        endpoint_slice(endpoint("10.0.0.9"), labels={**LABELS, "meshserve.io/version": "10"}),
        endpoint_slice(endpoint("10.0.0.8"), labels=V2),
        endpoint_slice(endpoint("10.0.0.7")),
    ], [ep("10.0.0.7:8001"), ep("10.0.0.8:8001", "2"), ep("10.0.0.9:8001", "10")]),
    ("one slice without endpoints", [V1EndpointSlice(
        address_type="IPv4", metadata=V1ObjectMeta(name="s", labels=LABELS), endpoints=[],
        ports=[DiscoveryV1EndpointPort(name="grpc", port=8001)])], []),
]


@pytest.mark.parametrize(("slices", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_endpoints_from_slices(slices, expected):
    assert endpoints_from_slices(slices) == tuple(expected)


def test_other_port_name():
    slices = [endpoint_slice(endpoint("10.0.0.1"), ports=[
        DiscoveryV1EndpointPort(name="grpc", port=8001),
        DiscoveryV1EndpointPort(name="grpc-tls", port=8443)])]
    assert endpoints_from_slices(slices, port_name="grpc-tls") == (ep("10.0.0.1:8443"),)


def test_accepts_any_iterable():
    slices = (s for s in [endpoint_slice(endpoint("10.0.0.1"))])
    assert endpoints_from_slices(slices) == (ep("10.0.0.1:8001"),)


# region and zone: endpoint, slice labels, expected (region, zone)
WHERE = [
    ("region derived from a GCP zone", endpoint("10.0.0.1", zone="europe-west4-a"), {},
     ("europe-west4", "europe-west4-a")),
    ("region derived from an AWS zone", endpoint("10.0.0.1", zone="us-east-1a"), {},
     ("us-east-1", "us-east-1a")),
    ("slice region label wins over the zone", endpoint("10.0.0.1", zone="dc1-rack7"),
     {"meshserve.io/region": "onprem-west"}, ("onprem-west", "dc1-rack7")),
    ("node region label wins over everything",
     endpoint("10.0.0.1", zone="us-east1-b",
              topology={"topology.kubernetes.io/region": "us-east4"}),
     {"meshserve.io/region": "elsewhere"}, ("us-east4", "us-east1-b")),
    ("zone from the node's labels when the endpoint has none",
     endpoint("10.0.0.1", zone=None, topology={"topology.kubernetes.io/zone": "us-west1-c"}), {},
     ("us-west1", "us-west1-c")),
    ("nothing known: Endpoint's default region", endpoint("10.0.0.1", zone=None), {},
     ("local", "")),
    ("a zone that is not region+letter gives no region", endpoint("10.0.0.1", zone="zone"), {},
     ("local", "zone")),
]


@pytest.mark.parametrize(("ep_", "labels", "where"), [c[1:] for c in WHERE],
                         ids=[c[0] for c in WHERE])
def test_region_and_zone(ep_, labels, where):
    (found,) = endpoints_from_slices([endpoint_slice(ep_, labels={**LABELS, **labels})])
    assert (found.region, found.zone) == where


@pytest.mark.parametrize(("zone", "region"), [
    ("us-east1-b", "us-east1"), ("us-east-1a", "us-east-1"),
    ("asia-northeast1-c", "asia-northeast1"), ("zone", ""), ("eastus-1", ""), ("", ""),
])
def test_region_of_zone(zone, region):
    assert region_of_zone(zone) == region


def test_duplicate_address_keeps_one_deterministically():
    a = endpoint_slice(endpoint("10.0.0.1", zone="us-east1-c"), name="a")
    b = endpoint_slice(endpoint("10.0.0.1", zone="us-east1-b"), name="b")
    assert endpoints_from_slices([a, b]) == endpoints_from_slices([b, a]) == (ep("10.0.0.1:8001"),)


def test_host_port_round_trips():
    (found,) = endpoints_from_slices([endpoint_slice(endpoint("fd00::1"), address_type="IPv6")])
    assert found.host_port == ("fd00::1", 8001)


def test_watch_selector():
    assert watch_selector() == "meshserve.io/model,meshserve.io/version"
