"""Custom resources the charts render, validated offline against their CRD schemas.

tests/js/validate.mjs dispatches on apiVersion/kind across @kubernetes-models/istio,
@kubernetes-models/cert-manager and @kubernetes-models/prometheus-operator (installed with
`npm ci` into tests/js/node_modules when missing or stale). Every cert-manager Certificate
and every Prometheus Operator ServiceMonitor of every chart is checked (with certManager and
serviceMonitor on).

Node.js and npm must be on PATH (tests/crd_schemas.py).
"""

import copy
import json

import pytest

from tests.crd_schemas import validator

# Each chart with the values that turn its custom resources on.
RENDERED = [("compute", ("compute", "full")), ("batcher", ("batcher", "full")),
            ("router", ("router", "full")), ("ingress", ("ingress", "full")),
            ("control-plane", ("control-plane", "control-plane-full")),
            ("meshserve", ("meshserve-two-models",))]
# What else a chart needs for them (the umbrella's worked example has no ServiceMonitor).
EXTRA = {"meshserve": ("--set", "serviceMonitor.enabled=true")}
CUSTOM_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/", "networking.istio.io/")


@pytest.fixture(scope="session")
def validate():
    return validator()


def custom_resources(helm, chart: str, values: tuple[str, ...]) -> list[dict]:
    return [d for d in helm.documents(chart, values, EXTRA.get(chart, ()))
            if d["apiVersion"].startswith(CUSTOM_GROUPS)]


@pytest.mark.parametrize(("chart", "values"), RENDERED, ids=[chart for chart, _ in RENDERED])
def test_rendered_custom_resources_match_their_crd_schemas(helm, validate, chart, values):
    objects = custom_resources(helm, chart, values)
    assert objects, f"{chart} rendered no custom resource with {values}"
    rc, result = validate(objects)
    assert (rc, result["ok"]) == (0, True), json.dumps(result, indent=2)
    kinds = {r["kind"] for r in result["results"]}
    assert kinds == {"Certificate", "ServiceMonitor"}


def test_umbrella_certificates_and_service_monitors_are_all_checked(helm, validate):
    objects = custom_resources(helm, "meshserve", ("meshserve-two-models",))
    rc, result = validate(objects)
    assert rc == 0
    names = {kind: sorted(r["name"] for r in result["results"] if r["kind"] == kind)
             for kind in ("Certificate", "ServiceMonitor")}
    components = ["control-plane", "router", "ingress", "compute", "batcher"]
    assert names["Certificate"] == sorted(f"mesh-{n}" for n in [*components, "operator"])
    # One per component: compute's and batcher's cover every model version.
    assert names["ServiceMonitor"] == sorted(f"mesh-{n}" for n in components)


def test_a_broken_service_monitor_is_reported(helm, validate):
    # A copy: the rendered objects are cached for the other tests.
    [monitor] = [copy.deepcopy(d) for d in custom_resources(helm, "router", ("router", "full"))
                 if d["kind"] == "ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["scheme"] = "gopher"
    monitor["spec"]["selector"] = "router"
    rc, result = validate([monitor])
    assert rc == 1 and result["ok"] is False
    errors = result["results"][0]["errors"]
    assert any(e.startswith("/spec/endpoints/0/scheme") for e in errors), errors
    assert any(e.startswith("/spec/selector") for e in errors), errors


def test_a_broken_certificate_is_reported(helm, validate):
    [certificate] = [copy.deepcopy(d)
                     for d in custom_resources(helm, "router", ("router", "full"))
                     if d["kind"] == "Certificate"]
    certificate["spec"]["usages"] = ["server auth", "teleportation"]
    certificate["spec"]["privateKey"]["size"] = "large"
    rc, result = validate([certificate])
    assert rc == 1 and result["ok"] is False
    errors = result["results"][0]["errors"]
    assert any("/spec/usages/1 must be equal to one of the allowed values" in e for e in errors)
    assert any("/spec/privateKey/size must be integer" in e for e in errors)


def test_dispatch_reaches_every_package(validate):
    """One object per package (an Istio DestinationRule, a cert-manager Issuer, a Prometheus
    Operator ServiceMonitor), and a kind none of them knows."""
    objects = [
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "batcher"}, "spec": {"host": "batcher"}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "ca"},
         "spec": {"ca": {"secretName": "meshserve-ca"}}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "mesh"},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/part-of": "meshserve"}},
                  "endpoints": [{"port": "metrics", "interval": "15s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "bad"}, "spec": {"selector": {}, "endpoints": "metrics"}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificat", "metadata": {"name": "x"}},
    ]
    rc, result = validate(objects)
    assert rc == 1
    assert [r["ok"] for r in result["results"]] == [True, True, True, False, False]
    assert any("/spec/endpoints must be array" in e for e in result["results"][3]["errors"])
    assert any("unknown apiVersion/kind" in e for e in result["results"][4]["errors"])
