"""A model's traffic policy as Istio objects, for clusters whose pods run Envoy sidecars. Pure.

`render` turns one `TrafficPolicy` into a `VirtualService` and its `DestinationRule`s, for the
batcher Services the Helm charts create: the umbrella chart (charts/meshserve) makes one per
model version, `<release>-<model slug>-<version>-batcher`, on port 7003. The VirtualService
answers for each of them, so a request to any version's Service follows the model's policy,
and each DestinationRule is one version's Service's. Given one `host` instead (a Service that
selects the batcher pods of every version, which no chart makes), every route goes to a subset
of that Service and one DestinationRule holds the subsets:

- one HTTP route per version that matches `x-model-version: <version>` exactly and sends the
  request to that version's Service, or subset (every version of the policy can be pinned,
  even one whose weight is 0);
- then the default route, which splits the rest by weight (versions of weight 0 left out);
- with a shadow, `mirror` + `mirrorPercentage` on every route, except a route whose requests
  all go to the shadow version already (its pinned route, say): none is mirrored to itself;
- with a region, locality load balancing that sends every request to that region's endpoints
  only (Istio needs the outlier detection that the DestinationRules always set for that).

Subsets select the batcher pods of one model version by their labels
(`app.kubernetes.io/component: batcher`, `meshserve.io/model`, `meshserve.io/version`).
Requests not pinned to a known version (no header, or a version the policy does not list)
take the default route.
"""

import copy
import hashlib
import re
from collections.abc import Iterable

import yaml

from meshserve.common.errors import InvalidArgument
from meshserve.common.version_pin import PIN_HEADER
from meshserve.mesh.policy import TrafficPolicy, check_region

API_VERSION = "networking.istio.io/v1"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_LABEL = "meshserve.io/model"
VERSION_LABEL = "meshserve.io/version"
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshserve"}
# The batchers' gRPC port in the charts (the batcher chart's `port`, the umbrella's
# `batcher.port`): what their Services serve.
BATCHER_PORT = 7003
# The umbrella chart's release in the README (`helm install mesh charts/meshserve`).
DEFAULT_RELEASE = "mesh"
# The charts' `clusterDomain` default: Service hosts are `<service>.<namespace>.svc.<domain>`.
DEFAULT_CLUSTER_DOMAIN = "cluster.local"

# Limits per Envoy (each sidecar calling the batchers), for the DestinationRule.
CONNECTION_POOL = {
    "tcp": {"maxConnections": 1024, "connectTimeout": "5s"},
    "http": {"http2MaxRequests": 1024, "http1MaxPendingRequests": 1024},
}
# Ejects an endpoint after 5 consecutive errors (gRPC UNAVAILABLE and friends count as 5xx),
# for 30 s at first; never more than half of a subset's endpoints at once.
OUTLIER_DETECTION = {
    "consecutive5xxErrors": 5,
    "interval": "10s",
    "baseEjectionTime": "30s",
    "maxEjectionPercent": 50,
}

_RELEASE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_HOST = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def model_slug(model: str) -> str:
    """A model name as the Helm charts put it in Service names (`meshserve.umbrella.modelSlug`):
    lowercased, every run of other characters than a-z, 0-9 and '-' made one '-', no '-' at
    either end."""
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


def batcher_service(model: str, version: str, release: str = DEFAULT_RELEASE) -> str:
    """The Service of one model version's batchers, as the charts name it: the umbrella's
    `<release>-<slug>-<version>-batcher`, cut to 63 characters, no '-' at the end; with
    release "", `<slug>-<version>-batcher`, the batcher chart's Service in a release of its
    own named `<slug>-<version>` (charts/README.md: `helm install mlp-1 charts/batcher`)."""
    slug = model_slug(model)
    if not slug:
        raise InvalidArgument(f"model name '{model}' has no letter or digit to make a Service "
                              "name of: name the batchers' Service host with --host")
    if release and not (_RELEASE.fullmatch(release) and len(release) <= 53):
        raise InvalidArgument(f"release '{release}' is not one the charts install (at most 53 "
                              "lower-case letters, digits or '-', starting with a letter and "
                              "ending with a letter or digit)")
    name = f"{release}-{slug}-{version}-batcher" if release else f"{slug}-{version}-batcher"
    return name[:63].rstrip("-")


def batcher_host(model: str, version: str, namespace: str = "default",
                 release: str = DEFAULT_RELEASE,
                 cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """`batcher_service`'s host name: `<service>.<namespace>.svc.<cluster_domain>`."""
    check_namespace(namespace)
    check_cluster_domain(cluster_domain)
    return f"{batcher_service(model, version, release)}.{namespace}.svc.{cluster_domain}"


def check_namespace(namespace: str) -> str:
    if not (_DNS_LABEL.fullmatch(namespace) and len(namespace) <= 63):
        raise InvalidArgument(f"namespace '{namespace}' is not a DNS label (at most 63 "
                              "lower-case letters, digits or '-', starting and ending with a "
                              "letter or digit)")
    return namespace


def check_cluster_domain(domain: str, name: str = "cluster domain") -> str:
    """`domain` when it is a DNS domain Service hosts can end in (the kubelet's
    `clusterDomain`, the charts' `clusterDomain` value); `name` says what gave it."""
    if not (_HOST.fullmatch(domain) and len(domain) <= 253):
        raise InvalidArgument(f"{name} '{domain}' is not a DNS domain (dot-separated labels of "
                              "lower-case letters, digits or '-', each starting and ending "
                              "with a letter or digit, e.g. cluster.local)")
    return domain


def subset_name(version: str) -> str:
    return f"v{version}"


def object_name(model: str) -> str:
    """The name of a model's VirtualService and DestinationRule: `meshserve-<model>`.

    A model name that is not already a DNS label is lowercased, its other characters become
    `-`, and a hash of the real name is appended so that two models never share a name.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    if name != model or len(f"meshserve-{name}") > 63:
        digest = hashlib.sha256(model.encode()).hexdigest()[:8]
        name = f"{name[:40].rstrip('-')}-{digest}".lstrip("-")
    return f"meshserve-{name}"


def render(policy: TrafficPolicy, *, host: str = "", namespace: str = "default",
           port: int = BATCHER_PORT, release: str = DEFAULT_RELEASE,
           cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> list[dict]:
    """`[VirtualService, DestinationRule, ...]` for `policy`: to each version's batcher
    Service as the umbrella chart of `release` names it, in the cluster whose DNS domain is
    `cluster_domain`, with one DestinationRule each; or, given `host`, to subsets of that one
    Service, with one DestinationRule."""
    check_namespace(namespace)
    check_cluster_domain(cluster_domain)
    hosts = {version: host or batcher_host(policy.model, version, namespace, release,
                                           cluster_domain)
             for version in policy.versions}
    _check(policy, hosts=set(hosts.values()), namespace=namespace, port=port)
    name = object_name(policy.model)

    def metadata(name: str = name, **labels: str) -> dict:
        return {"name": name, "namespace": namespace,
                "labels": {**MANAGED_BY, MODEL_LABEL: policy.model, **labels}}

    def destination(version: str) -> dict:
        subset = {"subset": subset_name(version)} if host else {}
        return {"host": hosts[version], **subset, "port": {"number": port}}

    shadow = policy.shadow

    def mirrored(route: dict) -> dict:
        # Not on a route whose requests all go to the shadow version already.
        targets = [r["destination"] for r in route["route"]]
        if shadow is not None and targets != [destination(shadow.version)]:
            route["mirror"] = destination(shadow.version)
            route["mirrorPercentage"] = {"value": float(shadow.percent)}
        return route

    routes = [
        mirrored({
            "name": f"pin-{subset_name(version)}",
            "match": [{"headers": {PIN_HEADER: {"exact": version}}}],
            "route": [{"destination": destination(version)}],
        })
        for version in policy.versions
    ]
    weighted = [v for v in policy.versions if policy.weights[v] > 0] or policy.versions[:1]
    routes.append(mirrored({
        "name": "split",
        "route": [{"destination": destination(version), "weight": policy.weights[version]}
                  for version in weighted],
    }))
    virtual_service = {
        "apiVersion": API_VERSION,
        "kind": "VirtualService",
        "metadata": metadata(),
        "spec": {"hosts": list(dict.fromkeys(hosts.values())), "http": routes},
    }

    traffic_policy: dict = {
        "connectionPool": CONNECTION_POOL,
        "outlierDetection": OUTLIER_DETECTION,
        "tls": {"mode": "ISTIO_MUTUAL"},
    }
    if policy.region:
        # Every caller, wherever it runs, sends all of this model's requests to the region;
        # localities not listed get no traffic, even when the region has no healthy endpoint.
        traffic_policy["loadBalancer"] = {"localityLbSetting": {
            "enabled": True,
            "distribute": [{"from": "*", "to": {f"{policy.region}/*": 100}}],
        }}
    if host:
        destination_rules = [{
            "apiVersion": API_VERSION,
            "kind": "DestinationRule",
            "metadata": metadata(),
            "spec": {
                "host": host,
                "trafficPolicy": traffic_policy,
                "subsets": [
                    {"name": subset_name(version),
                     "labels": {COMPONENT_LABEL: "batcher", MODEL_LABEL: policy.model,
                                VERSION_LABEL: version}}
                    for version in policy.versions
                ],
            },
        }]
    else:  # one per version's Service, named as it is (Service names are unique)
        destination_rules = [{
            "apiVersion": API_VERSION,
            "kind": "DestinationRule",
            "metadata": metadata(hosts[version].split(".")[0], **{VERSION_LABEL: version}),
            "spec": {"host": hosts[version], "trafficPolicy": traffic_policy},
        } for version in policy.versions]
    # Nothing shared, between the objects or with module constants: callers may edit them.
    return [copy.deepcopy(virtual_service), *map(copy.deepcopy, destination_rules)]


class _Dumper(yaml.SafeDumper):
    """Writes a value used twice in full each time: no `&id001` anchors in manifests."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(objects: Iterable[dict]) -> str:
    """Multi-document YAML (`---` before each document), keys in the order they were built."""
    return yaml.dump_all(list(objects), Dumper=_Dumper, sort_keys=False, explicit_start=True,
                         default_flow_style=False, allow_unicode=True)


def _check(policy: TrafficPolicy, *, hosts: set[str], namespace: str, port: int) -> None:
    if not (_LABEL_VALUE.fullmatch(policy.model) and 0 < len(policy.model) <= 63):
        raise InvalidArgument(f"model name '{policy.model}' is not a Kubernetes label value "
                              "(at most 63 letters, digits, '-', '_' or '.', starting and "
                              "ending with a letter or digit), so no subset can select it")
    check_namespace(namespace)
    for host in sorted(hosts):
        if not (_HOST.fullmatch(host) and len(host) <= 253):
            raise InvalidArgument(f"host '{host}' is not a DNS name (for example "
                                  "batcher.serving.svc.cluster.local)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"port {port!r} is not between 1 and 65535")
    if policy.region:
        check_region(policy.region)
