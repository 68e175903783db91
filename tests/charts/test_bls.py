"""Python models' calls to other models (Triton's BLS) in the charts: the compute chart's
bls.target (--bls-target, the mesh's ingress, gRPC with mutual TLS), the ingress chart's
networkPolicy.bls (compute pods admitted to the `grpc` port alone), and the umbrella's
compute.bls.enabled, which points every compute at the release's own ingress Service and
admits the release's compute pods there."""

import pytest
import yaml

from tests.charts.chartlib import (
    CHARTS,
    container,
    flag_values,
    help_flags,
    kubernetes_errors,
    pod_labels,
    value_args,
)

KUBERNETES = ["1.27", "1.37"]
TARGET = "mesh-ingress:8001"
GRPC = [{"port": "grpc", "protocol": "TCP"}]
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
UMBRELLA = ("meshserve-two-models",)
BLS_ON = ("--set", "compute.bls.enabled=true")


def flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args}


def assert_real_flags(service: str, args: list[str]) -> None:
    known, required = help_flags(service)
    assert flags(args) <= known, f"not flags of meshserve {service}: {flags(args) - known}"
    assert required <= flags(args), f"required flags missing: {required - flags(args)}"


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def refused(done, path: str) -> None:
    assert done.returncode != 0
    assert path in done.stderr, done.stderr


# --- the compute chart: bls.target -> --bls-target --------------------------------------------

def test_no_bls_target_by_default(helm):
    args = container(helm.render("compute"))["args"]
    assert "--bls-target" not in flags(args)
    args = container(helm.render("compute", ("compute",), ("--set", "bls.target=")))["args"]
    assert "--bls-target" not in flags(args)


def test_bls_target_renders_the_flag_exactly(helm):
    objects = helm.render("compute", ("compute",), ("--set", f"bls.target={TARGET}"))
    args = container(objects)["args"]
    assert [arg for arg in args if arg.startswith("--bls-target")] == [f"--bls-target={TARGET}"]
    assert_real_flags("compute", args)
    for version in KUBERNETES:
        assert kubernetes_errors(objects["Deployment"], version) == [], version


@pytest.mark.parametrize("value", [
    ("--set-string", "bls.target=no-port"),
    ("--set-json", "bls.target=8001"),
    ("--set-string", "bls.target=mesh-ingress:grpc"),
    ("--set-string", "bls.target=mesh ingress:8001"),
    ("--set-string", "bls.target=mesh-ingress:123456"),
    ("--set-json", 'bls={"target":"mesh-ingress:8001","identity":"ingress"}'),
], ids=["no-port", "number", "named-port", "space", "long-port", "unknown-key"])
def test_schema_refuses_a_malformed_target(helm, value):
    refused(helm.template("compute", "compute", extra=value), "/bls")


def test_compute_policy_leaves_egress_to_the_ingress_open(helm):
    """The compute's NetworkPolicy restricts only what reaches it: calls out, to the ingress
    among them, are not filtered, and setting the target admits nothing new."""
    off = helm.render("compute")["NetworkPolicy"]
    on = helm.render("compute", ("compute",), ("--set", f"bls.target={TARGET}"))["NetworkPolicy"]
    assert on == off
    assert on["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in on["spec"]


@pytest.mark.parametrize("values", [(), ("--set", f"bls.target={TARGET}")], ids=["off", "on"])
def test_compute_lint(helm, values):
    done = helm.lint("compute", "compute", extra=values)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the ingress chart: networkPolicy.bls -----------------------------------------------------

NARROWED = ("--set-json", 'networkPolicy.callers=["router"]')


def bls_rules(policy: dict) -> list[dict]:
    """The rules that admit compute pods."""
    return [rule for rule in policy["spec"]["ingress"]
            if any(peer.get("podSelector", {}).get("matchLabels", {}).get(COMPONENT) == "compute"
                   for peer in rule.get("from", []))]


def test_ingress_admits_no_compute_by_default(helm):
    for extra in [(), NARROWED]:
        policy = helm.render("ingress", ("ingress",), extra)["NetworkPolicy"]
        assert bls_rules(policy) == [], extra


def test_ingress_admits_computes_on_grpc_alone(helm):
    """Enabled, one rule of its own: compute pods, the `grpc` port only (not `http`), and the
    rules that were there are left as they were."""
    off = helm.render("ingress", ("ingress",), NARROWED)["NetworkPolicy"]
    on = helm.render("ingress", ("ingress",), (
        *NARROWED, "--set", "networkPolicy.bls.enabled=true"))["NetworkPolicy"]
    [rule] = bls_rules(on)
    assert [r for r in on["spec"]["ingress"] if r is not rule] == off["spec"]["ingress"]
    assert rule["ports"] == GRPC
    [peer] = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {COMPONENT: "compute",
                                                    "app.kubernetes.io/part-of": "meshserve"}}}
    admitted = {chart for chart in ("compute", "batcher", "router", "ingress", "control-plane")
                if selects(peer["podSelector"], pod_labels(helm.render(chart)))}
    assert admitted == {"compute"}


def test_ingress_admits_computes_of_named_releases(helm):
    one = helm.render("ingress", ("ingress",), (
        "--set", "networkPolicy.bls.enabled=true",
        "--set-json", 'networkPolicy.bls.callerInstances=["models"]'))["NetworkPolicy"]
    [[peer]] = [rule["from"] for rule in bls_rules(one)]
    assert peer["podSelector"]["matchLabels"][INSTANCE] == "models"
    two = helm.render("ingress", ("ingress",), (
        "--set", "networkPolicy.bls.enabled=true",
        "--set-json", 'networkPolicy.bls.callerInstances=["a","b"]',
        "--set-json", 'networkPolicy.callerNamespaceSelector={"matchLabels":{"team":"ml"}}'))
    [[peer]] = [rule["from"] for rule in bls_rules(two["NetworkPolicy"])]
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": INSTANCE, "operator": "In", "values": ["a", "b"]}]
    assert peer["namespaceSelector"] == {"matchLabels": {"team": "ml"}}
    for version in KUBERNETES:
        assert kubernetes_errors(two["NetworkPolicy"], version) == [], version


@pytest.mark.parametrize("value", [
    ("--set-string", "networkPolicy.bls.enabled=yes"),
    ("--set-json", 'networkPolicy.bls.callerInstances=["Bad_Release"]'),
    ("--set-json", 'networkPolicy.bls={"enabled":true,"port":8001}'),
], ids=["not-boolean", "bad-release", "unknown-key"])
def test_ingress_schema_refuses_bad_bls_values(helm, value):
    refused(helm.template("ingress", "ingress", extra=value), "/networkPolicy/bls")


def test_ingress_lint(helm):
    done = helm.lint("ingress", "ingress", extra=("--set", "networkPolicy.bls.enabled=true"))
    assert done.returncode == 0, done.stdout + done.stderr


# --- the umbrella: compute.bls.enabled ---------------------------------------------------------

def documents(helm, extra=()) -> list[dict]:
    return list(helm.documents("meshserve", UMBRELLA, extra))


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in objects if d["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {**of_kind(objects, "Deployment"), **of_kind(objects, "StatefulSet")}


def main_args(workload: dict) -> list[str]:
    [main] = workload["spec"]["template"]["spec"]["containers"]
    return main["args"]


def labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def computes(objects: list[dict]) -> dict[str, dict]:
    return {name: w for name, w in workloads(objects).items()
            if labels(w)[COMPONENT] == "compute"}


def test_umbrella_without_bls_gives_no_target(helm):
    objects = documents(helm)
    for name, workload in workloads(objects).items():
        assert "--bls-target" not in flags(main_args(workload)), name
    assert bls_rules(of_kind(objects, "NetworkPolicy")["mesh-ingress"]) == []


def test_umbrella_one_value_points_every_compute_at_its_ingress(helm):
    """compute.bls.enabled alone: every compute calls this release's ingress Service on the
    port its Service exposes for gRPC, whose pods carry the certificate of `ingress`; nothing
    else gets the flag."""
    objects = documents(helm, BLS_ON)
    found = computes(objects)
    assert sorted(found) == ["mesh-cnn-1-compute", "mesh-mlp-1-compute", "mesh-mlp-2-compute"]
    for name, compute in found.items():
        assert flag_values(main_args(compute), "--bls-target") == [TARGET], name
        assert_real_flags("compute", main_args(compute))
    for name, workload in workloads(objects).items():
        if name not in found:
            assert "--bls-target" not in flags(main_args(workload)), name
    host, port = TARGET.rsplit(":", 1)
    service = of_kind(objects, "Service")[host]
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == int(port) and grpc["targetPort"] == "grpc"
    [served] = [w for w in workloads(objects).values()
                if selects({"matchLabels": service["spec"]["selector"]}, labels(w))]
    assert labels(served)[COMPONENT] == "ingress"
    certificates = of_kind(objects, "Certificate")
    assert "ingress" in certificates["mesh-ingress"]["spec"]["dnsNames"]
    assert certificates["mesh-compute"]["spec"]["commonName"] == "compute"


def test_umbrella_target_follows_the_ingress_service_port(helm):
    objects = documents(helm, (*BLS_ON, "--set", "ingress.service.port=443"))
    assert {flag_values(main_args(c), "--bls-target")[0] for c in computes(objects).values()} \
        == {"mesh-ingress:443"}
    [grpc] = [p for p in of_kind(objects, "Service")["mesh-ingress"]["spec"]["ports"]
              if p["name"] == "grpc"]
    assert grpc["port"] == 443
    objects = documents(helm, (*BLS_ON, "--set", "ingress.port=9443"))
    assert {flag_values(main_args(c), "--bls-target")[0] for c in computes(objects).values()} \
        == {"mesh-ingress:9443"}


def test_umbrella_target_may_be_given(helm):
    objects = documents(helm, (*BLS_ON, "--set", "compute.bls.target=edge.mesh.svc:8001"))
    for name, compute in computes(objects).items():
        assert flag_values(main_args(compute), "--bls-target") == ["edge.mesh.svc:8001"], name


def test_umbrella_network_policies_admit_computes_to_the_ingress_grpc_alone(helm):
    """Enabled, the only change to every NetworkPolicy of the release is one rule on the
    ingress's: this release's compute pods, the `grpc` port."""
    off = of_kind(documents(helm), "NetworkPolicy")
    objects = documents(helm, BLS_ON)
    on = of_kind(objects, "NetworkPolicy")
    assert sorted(on) == sorted(off)
    for name in on:
        if name != "mesh-ingress":
            assert on[name] == off[name], name
    ingress = on["mesh-ingress"]
    [rule] = bls_rules(ingress)
    assert [r for r in ingress["spec"]["ingress"] if r is not rule] == \
        off["mesh-ingress"]["spec"]["ingress"]
    assert rule["ports"] == GRPC
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace: the release's own
    assert peer["podSelector"]["matchLabels"][INSTANCE] == "mesh"
    admitted = {name for name, w in workloads(objects).items()
                if selects(peer["podSelector"], labels(w))}
    assert admitted == set(computes(objects))
    for version in KUBERNETES:
        assert kubernetes_errors(ingress, version) == [], version


def test_umbrella_admits_only_its_own_computes(helm):
    """Two releases in one namespace: each ingress admits its own release's computes, which
    call it, and not the other's."""
    mesh = documents(helm, BLS_ON)
    done = helm.run("template", "other", str(CHARTS / "meshserve"), "--namespace", "serving",
                    *value_args(UMBRELLA), *BLS_ON)
    assert done.returncode == 0, done.stderr
    other = [document for document in yaml.safe_load_all(done.stdout) if document]
    for name, compute in computes(other).items():
        assert flag_values(main_args(compute), "--bls-target") == ["other-ingress:8001"], name
    [rule] = bls_rules(of_kind(other, "NetworkPolicy")["other-ingress"])
    [peer] = rule["from"]
    assert all(selects(peer["podSelector"], labels(w)) for w in computes(other).values())
    assert not any(selects(peer["podSelector"], labels(w)) for w in computes(mesh).values())


@pytest.mark.parametrize(("extra", "message"), [
    (("--set", "compute.bls.target=edge:8001"), "compute.bls.target needs compute.bls.enabled"),
    ((*BLS_ON, "--set-string", "compute.bls.target=no-port"), "/compute/bls/target"),
    ((*BLS_ON, "--set-json", "compute.bls.target=8001"), "/compute/bls/target"),
    (("--set-string", "compute.bls.enabled=yes"), "/compute/bls/enabled"),
    (("--set", "models[0].compute.bls.enabled=true"), "bls"),
], ids=["target-alone", "no-port", "number", "not-boolean", "per-model"])
def test_umbrella_refuses(helm, extra, message):
    done = helm.template("meshserve", *UMBRELLA, extra=extra)
    refused(done, message)


def test_umbrella_lint(helm):
    done = helm.lint("meshserve", *UMBRELLA, extra=BLS_ON)
    assert done.returncode == 0, done.stdout + done.stderr
