"""An immutable, versioned set of xDS resources, checked for consistency before it is served."""

import hashlib
from dataclasses import dataclass

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from google.protobuf import any_pb2

from meshserve.common.errors import FailedPrecondition
from meshserve.mesh.policy import MeshState
from meshserve.mesh.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTE, TYPES, resources


@dataclass(frozen=True)
class Snapshot:
    """Resources packed as `Any`, by type URL and name; `version` is a digest of them all."""

    version: str
    resources: dict[str, dict[str, any_pb2.Any]]

    @classmethod
    def of(cls, state: MeshState) -> "Snapshot":
        built = resources(state)
        check_consistent(built)
        packed: dict[str, dict[str, any_pb2.Any]] = {}
        digest = hashlib.sha256()
        for kind in TYPES:
            packed[kind] = {}
            for name in sorted(built[kind]):
                message = any_pb2.Any()
                message.Pack(built[kind][name])
                packed[kind][name] = message
                digest.update(kind.encode() + name.encode() +
                              built[kind][name].SerializeToString(deterministic=True))
        return cls(digest.hexdigest()[:16], packed)

    def named(self, kind: str, names: set[str]) -> list[any_pb2.Any]:
        """The resources of a kind a client asked for (all of them when it named none)."""
        table = self.resources.get(kind, {})
        if not names:
            return list(table.values())
        return [table[name] for name in sorted(names) if name in table]


def check_consistent(built: dict[str, dict[str, object]]) -> None:
    """Listeners name routes that exist, routes name clusters that exist, clusters have
    endpoints (possibly none): the same check go-control-plane runs on a snapshot."""
    for name, listener in built[LISTENER].items():
        manager = hcm.HttpConnectionManager()
        listener.api_listener.api_listener.Unpack(manager)
        if manager.rds.route_config_name not in built[ROUTE]:
            raise FailedPrecondition(f"listener '{name}' names missing route "
                                     f"'{manager.rds.route_config_name}'")
    for name, route in built[ROUTE].items():
        for host in route.virtual_hosts:
            for entry in host.routes:
                action = entry.route
                targets = ([action.cluster] if action.cluster else
                           [c.name for c in action.weighted_clusters.clusters])
                for target in targets:
                    if target not in built[CLUSTER]:
                        raise FailedPrecondition(f"route '{name}' names missing cluster "
                                                 f"'{target}'")
    for name in built[CLUSTER]:
        if name not in built[ENDPOINTS]:
            raise FailedPrecondition(f"cluster '{name}' has no load assignment")
