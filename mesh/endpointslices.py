"""Kubernetes EndpointSlices → meshserve endpoints. Pure: model objects of the `kubernetes`
client in, `Endpoint` values out; listing and watching the API is the caller's business
(`watch_selector()` is the label selector to list and watch with).

What counts:

- a slice labelled `meshserve.io/model` and `meshserve.io/version` (a number, as policies name
  versions), with a port named `port_name`; other slices are ignored;
- each endpoint of it that is ready (`conditions.ready` true, or unknown: Kubernetes reads a
  missing condition as ready) and not terminating;
- each address of such an endpoint: `addr:port`, IPv6 addresses in brackets (`[fd00::1]:8001`).

Where an endpoint runs: `zone` is `endpoint.zone`; `region` is, first found, the node's
`topology.kubernetes.io/region` label (copied into `deprecatedTopology` by clusters that still
do), the slice's `meshserve.io/region` label, or the zone less its zone letter
(`us-east1-b` → `us-east1`, `us-east-1a` → `us-east-1`); else `Endpoint`'s default. Topology
hints (`hints.forZones`) say where an endpoint should be used from, not where it runs, so they
are not read.
"""

import ipaddress
import re
from collections.abc import Iterable

from kubernetes.client import V1Endpoint, V1EndpointSlice

from meshserve.mesh.policy import Endpoint

MODEL_LABEL = "meshserve.io/model"
VERSION_LABEL = "meshserve.io/version"
REGION_LABEL = "meshserve.io/region"
NODE_REGION_LABEL = "topology.kubernetes.io/region"
NODE_ZONE_LABEL = "topology.kubernetes.io/zone"

# A zone is its region (ending in a digit) plus a letter, with or without a dash (GCP, AWS).
_ZONE = re.compile(r"(?P<region>.*[0-9])-?[a-z]")


def watch_selector() -> str:
    """The label selector that lists (and watches) the slices this module reads."""
    return f"{MODEL_LABEL},{VERSION_LABEL}"


def endpoints_from_slices(slices: Iterable[V1EndpointSlice], *,
                          port_name: str = "grpc") -> tuple[Endpoint, ...]:
    """The ready endpoints of every meshserve slice, sorted, one per model/version/address."""
    found: list[Endpoint] = []
    for endpoint_slice in slices:
        labels = (endpoint_slice.metadata.labels if endpoint_slice.metadata else None) or {}
        model, version = labels.get(MODEL_LABEL), labels.get(VERSION_LABEL)
        port = _port(endpoint_slice, port_name)
        if not model or not version or not version.isdigit() or port is None:
            continue
        for endpoint in endpoint_slice.endpoints or ():
            if not _ready(endpoint):
                continue
            topology = endpoint.deprecated_topology or {}
            zone = endpoint.zone or topology.get(NODE_ZONE_LABEL) or ""
            region = (topology.get(NODE_REGION_LABEL) or labels.get(REGION_LABEL)
                      or region_of_zone(zone))
            where = {"region": region, "zone": zone} if region else {"zone": zone}
            for address in endpoint.addresses or ():
                found.append(Endpoint(model=model, version=version,
                                      address=_host_port(address, port), **where))
    unique: dict[tuple[str, str, str], Endpoint] = {}
    for endpoint in sorted(found, key=_order):
        unique.setdefault((endpoint.model, endpoint.version, endpoint.address), endpoint)
    return tuple(unique.values())


def region_of_zone(zone: str) -> str:
    """`us-east1-b` → `us-east1`, `us-east-1a` → `us-east-1`; "" for any other zone."""
    match = _ZONE.fullmatch(zone)
    return match["region"] if match else ""


def _port(endpoint_slice: V1EndpointSlice, name: str) -> int | None:
    for port in endpoint_slice.ports or ():
        if (port.name or "") == name and port.port is not None:
            return int(port.port)
    return None


def _ready(endpoint: V1Endpoint) -> bool:
    conditions = endpoint.conditions
    if conditions is None:
        return True
    return conditions.ready is not False and conditions.terminating is not True


def _host_port(address: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:  # an FQDN slice
        return f"{address}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def _order(endpoint: Endpoint) -> tuple:
    return (endpoint.model, int(endpoint.version), endpoint.version, endpoint.address,
            endpoint.region, endpoint.zone)
