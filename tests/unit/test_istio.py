"""Istio rendering: the dicts asserted field by field, then every object checked against the
Istio CRD schemas by tests/js/validate.mjs (npm `@kubernetes-models/istio`, installed with
`npm ci` into tests/js/node_modules once, when missing or stale).

Node.js and npm must be on PATH (tests/crd_schemas.py); a failing install or validator run
fails the tests with its output.
"""

import json

import pytest
import yaml

from meshserve.common.errors import InvalidArgument
from meshserve.common.version_pin import PIN_HEADER
from meshserve.mesh import istio
from meshserve.mesh.policy import Shadow, TrafficPolicy
from tests.crd_schemas import validator

HOST = "batcher.serving.svc.cluster.local"


def dest(version: str, port: int = 7003) -> dict:
    return {"host": HOST, "subset": f"v{version}", "port": {"number": port}}


def pin(version: str, mirror: str | None = None, percent: float = 0.0) -> dict:
    route = {"name": f"pin-v{version}",
             "match": [{"headers": {PIN_HEADER: {"exact": version}}}],
             "route": [{"destination": dest(version)}]}
    if mirror:
        route |= {"mirror": dest(mirror), "mirrorPercentage": {"value": percent}}
    return route


def split(weights: list[tuple[str, int]], mirror: str | None = None,
          percent: float = 0.0) -> dict:
    route = {"name": "split",
             "route": [{"destination": dest(v), "weight": w} for v, w in weights]}
    if mirror:
        route |= {"mirror": dest(mirror), "mirrorPercentage": {"value": percent}}
    return route


# name, policy, expected VirtualService http routes
ROUTE_CASES = [
    ("90/10", TrafficPolicy("mlp", {"1": 90, "2": 10}),
     [pin("1"), pin("2"), split([("1", 90), ("2", 10)])]),
    ("pinned to v2 (v1 weight 0 left out of the split, still pinnable)",
     TrafficPolicy("mlp", {"1": 0, "2": 100}),
     [pin("1"), pin("2"), split([("2", 100)])]),
    ("single version", TrafficPolicy("mlp", {"3": 100}), [pin("3"), split([("3", 100)])]),
    ("shadow 10% to v2, all traffic on v1",
     TrafficPolicy("mlp", {"1": 100, "2": 0}, shadow=Shadow("2", 10)),
     [pin("1", "2", 10.0), pin("2"), split([("1", 100)], "2", 10.0)]),
    ("shadow 2.5% to a weighted version",
     TrafficPolicy("mlp", {"1": 90, "2": 10}, shadow=Shadow("2", 2.5)),
     [pin("1", "2", 2.5), pin("2"), split([("1", 90), ("2", 10)], "2", 2.5)]),
    ("shadow to the only weighted version: only the other pinned route mirrors",
     TrafficPolicy("mlp", {"1": 0, "2": 100}, shadow=Shadow("2", 50)),
     [pin("1", "2", 50.0), pin("2"), split([("2", 100)])]),
    ("versions in numeric order", TrafficPolicy("mlp", {"10": 50, "9": 50}),
     [pin("9"), pin("10"), split([("9", 50), ("10", 50)])]),
]

POLICIES = [case[1] for case in ROUTE_CASES] + [
    TrafficPolicy("mlp", {"1": 60, "2": 40}, shadow=Shadow("1", 100), region="us-east1"),
    TrafficPolicy("My_Model.v2", {"1": 100}),
]


@pytest.mark.parametrize(("policy", "expected"), [c[1:] for c in ROUTE_CASES],
                         ids=[c[0] for c in ROUTE_CASES])
def test_virtual_service_routes(policy, expected):
    vs, _ = istio.render(policy, host=HOST, namespace="serving")
    assert vs["apiVersion"] == "networking.istio.io/v1"
    assert vs["kind"] == "VirtualService"
    assert vs["metadata"] == {"name": "meshserve-mlp", "namespace": "serving",
                              "labels": {"app.kubernetes.io/managed-by": "meshserve",
                                         "meshserve.io/model": "mlp"}}
    assert vs["spec"]["hosts"] == [HOST]
    assert vs["spec"]["http"] == expected


@pytest.mark.parametrize("policy", POLICIES[:2], ids=["90/10", "pinned"])
def test_weighted_destinations_sum_to_100(policy):
    vs, _ = istio.render(policy, host=HOST)
    default = vs["spec"]["http"][-1]
    assert "match" not in default
    assert sum(d["weight"] for d in default["route"]) == 100
    assert all(d["weight"] > 0 for d in default["route"])


def test_destination_rule():
    policy = TrafficPolicy("mlp", {"1": 90, "2": 10})
    _, dr = istio.render(policy, host=HOST, namespace="serving", port=7003)
    assert dr["apiVersion"] == "networking.istio.io/v1"
    assert dr["kind"] == "DestinationRule"
    assert dr["metadata"]["name"] == "meshserve-mlp"
    assert dr["metadata"]["namespace"] == "serving"
    assert dr["spec"]["host"] == HOST
    assert dr["spec"]["subsets"] == [
        {"name": f"v{v}", "labels": {"app.kubernetes.io/component": "batcher",
                                     "meshserve.io/model": "mlp", "meshserve.io/version": v}}
        for v in ("1", "2")
    ]
    traffic = dr["spec"]["trafficPolicy"]
    assert traffic["tls"] == {"mode": "ISTIO_MUTUAL"}
    assert traffic["outlierDetection"]["consecutive5xxErrors"] > 0
    assert traffic["outlierDetection"]["baseEjectionTime"] == "30s"
    assert traffic["connectionPool"]["http"]["http2MaxRequests"] > 0
    assert traffic["connectionPool"]["tcp"]["maxConnections"] > 0
    assert "loadBalancer" not in traffic


def test_port_reaches_every_destination():
    vs, _ = istio.render(TrafficPolicy("mlp", {"1": 90, "2": 10}, shadow=Shadow("2", 5)),
                         host=HOST, port=7003)
    for route in vs["spec"]["http"]:
        for target in [r["destination"] for r in route["route"]] + [route.get("mirror")]:
            if target is not None:
                assert target["port"] == {"number": 7003}


def test_region_keeps_traffic_in_the_region():
    _, dr = istio.render(TrafficPolicy("mlp", {"1": 100}, region="eu-west4"), host=HOST)
    assert dr["spec"]["trafficPolicy"]["loadBalancer"] == {"localityLbSetting": {
        "enabled": True, "distribute": [{"from": "*", "to": {"eu-west4/*": 100}}]}}


def test_objects_are_not_shared():
    vs, dr = istio.render(TrafficPolicy("mlp", {"1": 100}), host=HOST)
    vs["metadata"]["labels"]["x"] = "y"
    dr["spec"]["trafficPolicy"]["tls"]["mode"] = "DISABLE"
    assert "x" not in dr["metadata"]["labels"]
    assert istio.render(TrafficPolicy("mlp", {"1": 100}),
                        host=HOST)[1]["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"


@pytest.mark.parametrize(("model", "name"), [
    ("mlp", "meshserve-mlp"),
    ("resnet-50", "meshserve-resnet-50"),
])
def test_object_name_keeps_dns_names(model, name):
    assert istio.object_name(model) == name


def test_object_name_of_other_names_is_valid_and_unique():
    models = ["My_Model", "my-model", "my_model", "MY.MODEL", "a" * 63, "a" * 62 + "A"]
    names = [istio.object_name(m) for m in models]
    assert len(set(names)) == len(names)
    for name in names:
        assert len(name) <= 63
        assert name.startswith("meshserve-")
        assert name == name.lower() and name[-1].isalnum()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"host": "bad_host"}, "host"),
    ({"host": "Batcher.serving"}, "host"),
    ({"host": HOST, "namespace": "Serving"}, "namespace"),
    ({"host": HOST, "port": 0}, "port"),
    ({"host": HOST, "port": 70000}, "port"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        istio.render(TrafficPolicy("mlp", {"1": 100}), **kwargs)


@pytest.mark.parametrize(("policy", "message"), [
    (TrafficPolicy("bad model", {"1": 100}), "label value"),
    (TrafficPolicy("m" * 64, {"1": 100}), "label value"),
    (TrafficPolicy("mlp", {"1": 100}, region="us/east"), "region"),
])
def test_bad_policies(policy, message):
    with pytest.raises(InvalidArgument, match=message):
        istio.render(policy, host=HOST)


def test_to_yaml_round_trips():
    objects = istio.render(TrafficPolicy("mlp", {"1": 90, "2": 10}, shadow=Shadow("2", 5)),
                           host=HOST)
    text = istio.to_yaml(objects)
    assert text.startswith("---\n")
    assert text.count("\n---\n") == 1
    assert list(yaml.safe_load_all(text)) == objects
    # Order as built: apiVersion first, so the documents read like hand-written manifests.
    assert text.splitlines()[1] == "apiVersion: networking.istio.io/v1"


def test_to_yaml_writes_no_aliases():
    shared = {"app": "x"}
    text = istio.to_yaml([{"a": shared, "b": shared}])
    assert "&" not in text and "*" not in text
    assert list(yaml.safe_load_all(text)) == [{"a": shared, "b": shared}]


def test_by_default_each_version_goes_to_its_own_batcher_service_on_the_charts_port():
    """The umbrella chart's Services, one per version: `<release>-<slug>-<version>-batcher`
    on 7003 (tests/charts/test_istio_hosts.py checks the names against `helm template`)."""
    vs, *rules = istio.render(TrafficPolicy("mlp", {"1": 90, "2": 10}, shadow=Shadow("2", 5)),
                              namespace="serving")
    hosts = {v: f"mesh-mlp-{v}-batcher.serving.svc.cluster.local" for v in ("1", "2")}
    assert vs["spec"]["hosts"] == [hosts["1"], hosts["2"]]
    to = {v: {"host": hosts[v], "port": {"number": 7003}} for v in hosts}
    mirror = {"mirror": to["2"], "mirrorPercentage": {"value": 5.0}}
    assert vs["spec"]["http"] == [
        {"name": "pin-v1", "match": [{"headers": {PIN_HEADER: {"exact": "1"}}}],
         "route": [{"destination": to["1"]}], **mirror},
        {"name": "pin-v2", "match": [{"headers": {PIN_HEADER: {"exact": "2"}}}],
         "route": [{"destination": to["2"]}]},
        {"name": "split", "route": [{"destination": to["1"], "weight": 90},
                                    {"destination": to["2"], "weight": 10}], **mirror}]
    assert [(r["metadata"]["name"], r["metadata"]["labels"]["meshserve.io/version"],
             r["spec"]["host"], "subsets" in r["spec"]) for r in rules] == [
        ("mesh-mlp-1-batcher", "1", hosts["1"], False),
        ("mesh-mlp-2-batcher", "2", hosts["2"], False)]
    assert all(r["spec"]["trafficPolicy"]["tls"] == {"mode": "ISTIO_MUTUAL"} for r in rules)


@pytest.mark.parametrize(("model", "version", "release", "service"), [
    ("mlp", "1", "mesh", "mesh-mlp-1-batcher"),
    ("mlp_onnx", "2", "prod", "prod-mlp-onnx-2-batcher"),
    ("My.Model", "20261206", "mesh", "mesh-my-model-20261206-batcher"),
    ("mlp", "1", "", "mlp-1-batcher"),  # charts/README: `helm install mlp-1 charts/batcher`
    ("m" * 70, "1", "mesh", ("mesh-" + "m" * 70)[:63]),  # cut to 63, as the chart cuts it
    ("m" * 55 + "_", "1", "mesh", ("mesh-" + "m" * 55 + "-1")[:63].rstrip("-")),
])
def test_batcher_service_names_as_the_charts_do(model, version, release, service):
    assert istio.batcher_service(model, version, release) == service


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"release": "My.Release"}, "release 'My.Release' is not one the charts install"),
    ({"release": "1mesh"}, "release '1mesh'"),
    ({"namespace": "Bad_NS"}, "namespace 'Bad_NS' is not a DNS label"),
])
def test_per_version_refusals(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        istio.render(TrafficPolicy("mlp", {"1": 100}), **kwargs)


# ---- schema validation with @kubernetes-models/istio -----------------------------------------


@pytest.fixture(scope="session")
def validate():
    return validator()


@pytest.mark.parametrize("policy", POLICIES)
def test_rendered_objects_match_the_istio_schemas(validate, policy):
    objects = istio.render(policy, host=HOST, namespace="serving")
    rc, result = validate(objects)
    assert (rc, result["ok"]) == (0, True), json.dumps(result, indent=2)
    assert [(r["kind"], r["ok"]) for r in result["results"]] == [
        ("VirtualService", True), ("DestinationRule", True)]


@pytest.mark.parametrize("policy", POLICIES)
def test_per_version_objects_match_the_istio_schemas(validate, policy):
    objects = istio.render(policy, namespace="serving")
    rc, result = validate(objects)
    assert (rc, result["ok"]) == (0, True), json.dumps(result, indent=2)
    assert [(r["kind"], r["ok"]) for r in result["results"]] == [
        ("VirtualService", True), *[("DestinationRule", True)] * len(policy.weights)]


def test_yaml_documents_match_the_istio_schemas(validate):
    text = istio.to_yaml(istio.render(POLICIES[-2], host=HOST))
    rc, result = validate(list(yaml.safe_load_all(text)))
    assert rc == 0, json.dumps(result, indent=2)


def _broken(edit):
    objects = istio.render(TrafficPolicy("mlp", {"1": 90, "2": 10}), host=HOST)
    edit(objects)
    return objects


def _set_weight(objects):
    objects[0]["spec"]["http"][-1]["route"][0]["weight"] = "ninety"


def _set_tls(objects):
    objects[1]["spec"]["trafficPolicy"]["tls"]["mode"] = "MUTUAL_PLEASE"


def _drop_host(objects):
    del objects[1]["spec"]["host"]


def _set_kind(objects):
    objects[0]["kind"] = "VirtualServiceTypo"


def _set_name(objects):
    objects[1]["metadata"]["name"] = "Not_A_Name"


@pytest.mark.parametrize(("edit", "index", "error"), [
    (_set_weight, 0, "/spec/http/2/route/0/weight must be integer"),
    (_set_tls, 1, "/spec/trafficPolicy/tls/mode must be equal to one of the allowed values"),
    (_drop_host, 1, "/spec must have required property host"),
    (_set_kind, 0, "unknown apiVersion/kind"),
    (_set_name, 1, "/metadata/name"),
], ids=["weight-ninety", "tls-mode", "no-host", "unknown-kind", "bad-name"])
def test_validator_rejects_broken_objects(validate, edit, index, error):
    rc, result = validate(_broken(edit))
    assert rc == 1 and result["ok"] is False
    assert [r["ok"] for r in result["results"]] == [index != 0, index != 1]
    assert any(error in e for e in result["results"][index]["errors"]), result


def test_validator_rejects_input_that_is_not_an_array(validate):
    rc, result = validate({"apiVersion": "networking.istio.io/v1"})  # type: ignore[arg-type]
    assert rc == 2 and result["ok"] is False
