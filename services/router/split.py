"""The mesh's split of a model's traffic, as gRPC's own xDS client holds it.

The router keeps one long-lived stream per model version, opened through the mesh
(`xds:///<model>` with the version's pin header, so gRPC's xDS client picks the batcher:
endpoints from EDS, round robin, outlier detection). Which version an unpinned group goes to
is the route's weighted split, read here from gRPC's xDS client status (the same
RouteConfiguration gRPC applies, dumped in-process as a CSDS ClientStatusResponse: ~10 µs),
and picked per group. `routes_of(status)` parses and `Split.pick(draw)` chooses (pure);
`MeshSplits` re-reads the status when it may have changed.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.service.status.v3 import csds_pb2

ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


@dataclass(frozen=True)
class Split:
    """One model's route: the versions pins may name, the weighted split of the rest, and
    each version's batcher endpoints (addresses)."""

    versions: tuple[str, ...]  # pinnable, in the route's order
    weights: tuple[tuple[str, int], ...]  # (version, weight > 0) of the unpinned split
    endpoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bounds", tuple(itertools.accumulate(
            weight for _, weight in self.weights)))

    def pick(self, draw: Callable[[], float]) -> str | None:
        """A version by weight (`draw()` uniform in [0, 1)); None when nothing carries weight."""
        if not self._bounds:
            return None
        point = draw() * self._bounds[-1]
        return self.weights[bisect.bisect_right(self._bounds, point)][0]


def versions_of(status: csds_pb2.ClientStatusResponse) -> tuple:
    """What identifies the resources' content: their names and versions."""
    return tuple((resource.type_url, resource.name, resource.version_info)
                 for config in status.config for resource in config.generic_xds_configs)


def routes_of(status: csds_pb2.ClientStatusResponse) -> dict[str, Split]:
    """Every model's split in a CSDS ClientStatusResponse, by model (the listener's name).

    A route is read as the control plane writes it (mesh/resources.py): header routes that
    pin a version to its cluster, then one route with the weighted clusters."""
    listeners: dict[str, str] = {}  # route name -> model
    routes: dict[str, route_pb2.RouteConfiguration] = {}
    endpoints: dict[str, tuple[str, ...]] = {}  # cluster -> its endpoints' addresses
    for config in status.config:
        for resource in config.generic_xds_configs:
            if not resource.HasField("xds_config"):
                continue
            if resource.type_url == ROUTE:
                route = route_pb2.RouteConfiguration()
                resource.xds_config.Unpack(route)
                routes[route.name] = route
            elif resource.type_url == ENDPOINTS:
                assignment = endpoint_pb2.ClusterLoadAssignment()
                resource.xds_config.Unpack(assignment)
                endpoints[assignment.cluster_name] = tuple(sorted(
                    f"{e.endpoint.address.socket_address.address}:"
                    f"{e.endpoint.address.socket_address.port_value}"
                    for locality in assignment.endpoints for e in locality.lb_endpoints))
            elif resource.type_url == LISTENER:
                listener = listener_pb2.Listener()
                resource.xds_config.Unpack(listener)
                manager = hcm.HttpConnectionManager()
                listener.api_listener.api_listener.Unpack(manager)
                listeners[manager.rds.route_config_name] = listener.name
    return {model: split_of(routes[name], endpoints)
            for name, model in listeners.items() if name in routes}


def split_of(route: route_pb2.RouteConfiguration,
             endpoints: dict[str, tuple[str, ...]]) -> Split:
    versions: list[str] = []
    by_cluster: dict[str, str] = {}
    weights: list[tuple[str, int]] = []
    for host in route.virtual_hosts:
        for entry in host.routes:
            action = entry.route
            pins = [h.exact_match or h.string_match.exact for h in entry.match.headers]
            if pins and action.cluster:
                versions.append(pins[0])
                by_cluster[action.cluster] = pins[0]
            elif action.HasField("weighted_clusters"):
                weights = [(c.name, c.weight.value) for c in action.weighted_clusters.clusters
                           if c.weight.value > 0]
    return Split(versions=tuple(versions),
                 weights=tuple((by_cluster.get(name, name), weight) for name, weight in weights),
                 endpoints={version: endpoints.get(cluster, ())
                            for cluster, version in by_cluster.items()})


class MeshSplits:
    """The splits gRPC's xDS client holds now: its status is read again when older than
    `max_age` seconds and parsed again only when a resource's version changed."""

    def __init__(self, dump: Callable[[], bytes], clock: Callable[[], float],
                 max_age: float = 0.02) -> None:
        self._dump = dump
        self._clock = clock
        self._max_age = max_age
        self._read_at = float("-inf")
        self._versions: tuple = ()
        self.splits: dict[str, Split] = {}

    def get(self, model: str) -> Split | None:
        now = self._clock()
        if now - self._read_at >= self._max_age:
            self._read_at = now
            status = csds_pb2.ClientStatusResponse.FromString(self._dump())
            versions = versions_of(status)
            if versions != self._versions:
                self._versions = versions
                self.splits = routes_of(status)
        return self.splits.get(model)
