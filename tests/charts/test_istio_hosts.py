"""`meshserve traffic render MODEL --istio` against what the charts create: every host its
objects route to is a Service that `helm template` renders, on the port that Service serves,
and that Service selects the batcher pods of the version routed to."""

import pytest
import yaml

from meshserve.mesh import istio
from meshserve.mesh.policy import Shadow, TrafficPolicy
from tests.charts.chartlib import CHARTS, value_args

COMPONENT = "app.kubernetes.io/component"
MODEL, VERSION = "meshserve.io/model", "meshserve.io/version"


def of_kind(documents, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def destinations(objects: list[dict]) -> list[tuple[str, str, int]]:
    """(host, version routed to, port) of every route and mirror, and each rule's host."""
    [virtual_service, *rules] = objects
    found = []
    for route in virtual_service["spec"]["http"]:
        for target in [r["destination"] for r in route["route"]] + [route.get("mirror")]:
            if target is not None:
                version = next(v for v, host in hosts_of(objects).items()
                               if host == target["host"])
                found.append((target["host"], version, target["port"]["number"]))
    assert [r["spec"]["host"] for r in rules] == list(hosts_of(objects).values())
    assert set(virtual_service["spec"]["hosts"]) == set(hosts_of(objects).values())
    return found


def hosts_of(objects: list[dict]) -> dict[str, str]:
    return {r["metadata"]["labels"][VERSION]: r["spec"]["host"] for r in objects[1:]}


def assert_served(objects: list[dict], documents, namespace: str, model: str) -> None:
    services = of_kind(documents, "Service")
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in documents
            if d["kind"] == "Deployment"]
    for host, version, port in destinations(objects):
        name, domain = host.split(".", 1)
        assert domain == f"{namespace}.svc.cluster.local", host
        assert name in services, (host, sorted(services))
        spec = services[name]["spec"]
        assert port in [p["port"] for p in spec["ports"] if p["name"] == "grpc"], spec["ports"]
        selected = [labels for labels in pods if spec["selector"].items() <= labels.items()]
        assert selected and all((labels[COMPONENT], labels[MODEL], labels[VERSION]) ==
                                ("batcher", model, version) for labels in selected), selected


@pytest.mark.parametrize(("model", "weights"), [
    ("mlp", {"1": 90, "2": 10}),
    ("cnn", {"1": 100}),
])
def test_the_umbrella_charts_batcher_services(helm, model, weights):
    """`helm template mesh charts/meshserve --namespace serving` with mlp 1 and 2, cnn 1."""
    documents = helm.documents("meshserve", ("meshserve-two-models",))
    policy = TrafficPolicy(model, weights, shadow=Shadow(max(weights, key=int), 5))
    objects = istio.render(policy, namespace="serving", release="mesh")
    assert_served(objects, documents, "serving", model)


def test_a_batcher_chart_released_per_version(helm):
    """charts/README: `helm install mlp-1 charts/batcher --set model.name=mlp ...`."""
    done = helm.run("template", "mlp-1", str(CHARTS / "batcher"), "--namespace", "serving",
                    *value_args(["batcher"]))
    assert done.returncode == 0, done.stderr
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    objects = istio.render(TrafficPolicy("mlp", {"1": 100}), namespace="serving", release="")
    assert_served(objects, documents, "serving", "mlp")
