"""A model's traffic policy as Istio objects, for clusters whose pods run Envoy sidecars. Pure.

`render` turns one `TrafficPolicy` into a `VirtualService` and a `DestinationRule` for the
batcher Service `host`:

- one HTTP route per version that matches `x-model-version: <version>` exactly and sends the
  request to that version's subset (every version of the policy can be pinned, even one whose
  weight is 0);
- then the default route, which splits the rest by weight (versions of weight 0 left out);
- with a shadow, `mirror` + `mirrorPercentage` on every route, except a route whose requests
  all go to the shadow version already (its pinned route, say): none is mirrored to itself;
- with a region, locality load balancing that sends every request to that region's endpoints
  only (Istio needs the outlier detection that the DestinationRule always sets for that).

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

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_HOST = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def model_slug(model: str) -> str:
    """A model name as the Helm charts put it in Service names (`meshserve.umbrella.modelSlug`):
    lowercased, every run of other characters than a-z, 0-9 and '-' made one '-', no '-' at
    either end."""
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


def batcher_host(model: str, namespace: str = "default") -> str:
    """The default batcher Service host of `model`: `<slug>-batcher.<namespace>.svc…`."""
    check_namespace(namespace)
    slug = model_slug(model)
    if not slug:
        raise InvalidArgument(f"model name '{model}' has no letter or digit to make a Service "
                              "name of: name the batchers' Service host with --host")
    return f"{slug}-batcher.{namespace}.svc.cluster.local"


def check_namespace(namespace: str) -> str:
    if not (_DNS_LABEL.fullmatch(namespace) and len(namespace) <= 63):
        raise InvalidArgument(f"namespace '{namespace}' is not a DNS label (at most 63 "
                              "lower-case letters, digits or '-', starting and ending with a "
                              "letter or digit)")
    return namespace


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


def render(policy: TrafficPolicy, *, host: str, namespace: str = "default",
           port: int = 8001) -> list[dict]:
    """`[VirtualService, DestinationRule]` for `policy`, routing to the batcher Service `host`."""
    _check(policy, host=host, namespace=namespace, port=port)
    name = object_name(policy.model)

    def metadata() -> dict:
        return {"name": name, "namespace": namespace,
                "labels": {**MANAGED_BY, MODEL_LABEL: policy.model}}

    def destination(version: str) -> dict:
        return {"host": host, "subset": subset_name(version), "port": {"number": port}}

    shadow = policy.shadow

    def mirrored(route: dict) -> dict:
        # Not on a route whose requests all go to the shadow version already.
        targets = {r["destination"]["subset"] for r in route["route"]}
        if shadow is not None and targets != {subset_name(shadow.version)}:
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
        "spec": {"hosts": [host], "http": routes},
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
    destination_rule = {
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
    }
    # Nothing shared, between the objects or with module constants: callers may edit them.
    return [copy.deepcopy(virtual_service), copy.deepcopy(destination_rule)]


class _Dumper(yaml.SafeDumper):
    """Writes a value used twice in full each time: no `&id001` anchors in manifests."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(objects: Iterable[dict]) -> str:
    """Multi-document YAML (`---` before each document), keys in the order they were built."""
    return yaml.dump_all(list(objects), Dumper=_Dumper, sort_keys=False, explicit_start=True,
                         default_flow_style=False, allow_unicode=True)


def _check(policy: TrafficPolicy, *, host: str, namespace: str, port: int) -> None:
    if not (_LABEL_VALUE.fullmatch(policy.model) and 0 < len(policy.model) <= 63):
        raise InvalidArgument(f"model name '{policy.model}' is not a Kubernetes label value "
                              "(at most 63 letters, digits, '-', '_' or '.', starting and "
                              "ending with a letter or digit), so no subset can select it")
    check_namespace(namespace)
    if not (_HOST.fullmatch(host) and len(host) <= 253):
        raise InvalidArgument(f"host '{host}' is not a DNS name (for example "
                              "batcher.serving.svc.cluster.local)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"port {port!r} is not between 1 and 65535")
    if policy.region:
        check_region(policy.region)
