"""Values at the edges of what the charts accept: large integers (Helm reads YAML numbers as
float64), colliding ports, defaults dropped with null, a PodDisruptionBudget block given
without a field, the ingress's asynchronous store on a claim in the umbrella, two releases in
one namespace, release names and labels Kubernetes refuses, and the umbrella's backups."""

import re

import pytest
import yaml

from tests.charts.chartlib import (
    CHARTS,
    VALUES,
    container,
    flag_values,
    help_flags,
    kubernetes_errors,
)

UMBRELLA = "meshserve"
TWO_MODELS = ("meshserve-two-models",)
MINIMAL = ("--set", "certManager.enabled=true", "--set", "certManager.issuerRef.name=mesh-ca",
           "--set", "modelRepository.existingClaim=models")
WORKLOADS = {"Deployment", "StatefulSet"}
CUSTOM_KINDS = {"Certificate", "ServiceMonitor"}
COMPONENT, INSTANCE = "app.kubernetes.io/component", "app.kubernetes.io/instance"
VERSION = "meshserve.io/version"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def write_values(tmp_path, name: str, values: dict) -> tuple[str, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ("-f", str(path))


def render(helm, chart: str, *args: str, release: str = "mesh") -> list[dict]:
    done = helm.run("template", release, str(CHARTS / chart), "--namespace", "serving", *args)
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def refused(helm, chart: str, *args: str, release: str = "mesh") -> str:
    done = helm.run("template", release, str(CHARTS / chart), "--namespace", "serving", *args)
    assert done.returncode != 0, f"rendered: {args}"
    return done.stderr


def chart_values(*names: str) -> tuple[str, ...]:
    return tuple(arg for name in names for arg in ("-f", str(VALUES / f"{name}.yaml")))


def workloads(documents) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in WORKLOADS}


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def schema_errors(documents, version: str) -> list[str]:
    return [error for document in documents if document["kind"] not in CUSTOM_KINDS
            for error in kubernetes_errors(document, version)]


# --- integers of 1,000,000 and more print as integers, never 1e+06 ------------------------

def test_umbrella_prints_large_integer_versions_as_integers(helm, tmp_path):
    values = write_values(tmp_path, "big", {
        "models": [{"name": "mlp", "version": 1000000}, {"name": "cnn", "version": 20261206}],
        "revisionHistoryLimit": 10000000, "tmpSizeLimit": 2000000000})
    done = helm.run("template", "mesh", str(CHARTS / UMBRELLA), "--namespace", "serving",
                    *MINIMAL, *values)
    assert done.returncode == 0, done.stderr
    assert "e+" not in done.stdout
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    found = {}
    for name, workload in workloads(documents).items():
        labels = pod_labels(workload)
        if labels[COMPONENT] in ("compute", "batcher"):
            args = container({"Deployment": workload})["args"]
            found[name] = (labels[VERSION], flag_values(args, "--version"))
    assert found == {
        "mesh-mlp-1000000-compute": ("1000000", ["1000000"]),
        "mesh-mlp-1000000-batcher": ("1000000", ["1000000"]),
        "mesh-cnn-20261206-compute": ("20261206", ["20261206"]),
        "mesh-cnn-20261206-batcher": ("20261206", ["20261206"])}
    for document in documents:
        if document["kind"] == "Service":
            assert DNS_1035.match(document["metadata"]["name"]), document["metadata"]["name"]
    assert not schema_errors(documents, "1.37")


def test_umbrella_versions_have_at_most_nine_digits_as_integers_too(helm, tmp_path):
    values = write_values(tmp_path, "huge", {"models": [{"name": "mlp", "version": 1234567890}]})
    assert "/models/0/version" in refused(helm, UMBRELLA, *MINIMAL, *values)


@pytest.mark.parametrize("service", ["compute", "batcher"])
def test_service_charts_print_large_integers_as_integers(helm, tmp_path, service):
    values = write_values(tmp_path, service, {
        "model": {"name": "mlp", "version": 20261206}, "drainSeconds": 1000000.5,
        "probes": {"startup": {"failureThreshold": 1000000}}})
    done = helm.run("template", "mesh", str(CHARTS / service), "--namespace", "serving",
                    *chart_values(service), *values)
    assert done.returncode == 0, done.stderr
    assert "e+" not in done.stdout
    objects = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
    main = container(objects)
    assert flag_values(main["args"], "--version") == ["20261206"]
    assert flag_values(main["args"], "--drain-seconds") == ["1000000.5"]
    assert pod_labels(objects["Deployment"])[VERSION] == "20261206"
    assert main["startupProbe"]["failureThreshold"] == 1000000
    if service == "batcher":
        assert objects["Service"]["metadata"]["labels"][VERSION] == "20261206"


# --- two listeners of one pod on one port are refused at render --------------------------

@pytest.mark.parametrize(("chart", "args", "message"), [
    (UMBRELLA, (*MINIMAL, "--set", "probes.port=9090"),
     "metrics.port (9090) and probes.port (9090) are the same port"),
    (UMBRELLA, (*MINIMAL, "--set", "probes.port=7002"),
     "router: port (7002) and probes.port (7002) are the same port"),
    ("router", (*chart_values("router"), "--set", "probes.port=7002"),
     "port (7002) and probes.port (7002) are the same port"),
    ("compute", (*chart_values("compute"), "--set", "metrics.port=7004"),
     "port (7004) and metrics.port (7004) are the same port"),
    ("ingress", (*chart_values("ingress"), "--set", "http.port=8081"),
     "http.port (8081) and probes.port (8081) are the same port"),
], ids=["umbrella-health-metrics", "umbrella-health-grpc", "router-health-grpc",
        "compute-grpc-metrics", "ingress-http-health"])
def test_colliding_ports_are_refused(helm, chart, args, message):
    assert message in refused(helm, chart, *args)


def test_a_port_freed_by_turning_metrics_off_may_be_reused(helm):
    documents = render(helm, "router", *chart_values("router"), "--set", "probes.port=9090",
                       "--set", "metrics.enabled=false")
    [deployment] = workloads(documents).values()
    ports = container({"Deployment": deployment})["ports"]
    assert {p["name"]: p["containerPort"] for p in ports} == {"grpc": 7002, "health": 9090}


# --- podSecurityContext / securityContext: null drop the defaults ------------------------

@pytest.mark.parametrize(("chart", "args"), [
    (UMBRELLA, TWO_MODELS), ("router", ("router",)),
    ("control-plane", ("control-plane", "control-plane-backup"))])
def test_null_security_contexts_drop_the_defaults(helm, chart, args):
    documents = render(helm, chart, *chart_values(*args), "--set", "podSecurityContext=null",
                       "--set", "securityContext=null", "--kube-version", "1.37.0")
    pods = [d["spec"]["template"]["spec"] for d in documents if d["kind"] in WORKLOADS]
    pods += [d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
             for d in documents if d["kind"] == "CronJob"]
    assert pods
    for pod in pods:
        assert "securityContext" not in pod
        for main in pod["containers"] + pod.get("initContainers", []):
            assert "securityContext" not in main, main["name"]
    assert not schema_errors(documents, "1.37")


@pytest.mark.parametrize(("chart", "args"), [(UMBRELLA, TWO_MODELS), ("router", ("router",))])
def test_a_null_shared_block_is_dropped_in_the_umbrella_as_in_a_service_chart(helm, chart, args):
    documents = render(helm, chart, *chart_values(*args), "--set", "metrics=null",
                       "--set", "serviceMonitor=null")
    for name, workload in workloads(documents).items():
        main = container({"Deployment": workload})
        assert not flag_values(main["args"], "--metrics-listen"), name
        assert "metrics" not in {p["name"] for p in main["ports"]}, name


# --- a PodDisruptionBudget block without a field gets maxUnavailable: 1 -----------------

def budgets(documents) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in documents
            if d["kind"] == "PodDisruptionBudget"}


def test_umbrella_budget_given_as_enabled_alone(helm):
    documents = render(helm, UMBRELLA, *MINIMAL,
                       "--set", "controlPlane.podDisruptionBudget.enabled=true",
                       "--set", "router.podDisruptionBudget.enabled=true",
                       "--set-json",
                       'ingress.podDisruptionBudget={"enabled":true,"minAvailable":1}')
    specs = budgets(documents)
    assert specs["mesh-control-plane"]["maxUnavailable"] == 1
    assert specs["mesh-router"]["maxUnavailable"] == 1
    assert specs["mesh-ingress"]["minAvailable"] == 1
    assert "maxUnavailable" not in specs["mesh-ingress"]
    assert not schema_errors(documents, "1.37")


def test_service_chart_budget_without_a_field_and_with_zero(helm):
    [spec] = budgets(render(helm, "router", *chart_values("router"),
                            "--set", "podDisruptionBudget.maxUnavailable=null")).values()
    assert spec["maxUnavailable"] == 1
    [spec] = budgets(render(helm, "router", *chart_values("router"),
                            "--set", "podDisruptionBudget.maxUnavailable=0")).values()
    assert spec["maxUnavailable"] == 0


# --- the umbrella's ingress keeps its asynchronous store on a claim ---------------------

def test_umbrella_ingress_async_store_on_a_claim(helm):
    async_on = ("--set", "ingress.async.enabled=true", "--set", "ingress.async.existingClaim=jobs")
    documents = render(helm, UMBRELLA, *MINIMAL, *async_on, "--set", "ingress.replicas=1",
                       "--kube-version", "1.37.0")
    ingress = workloads(documents)["mesh-ingress"]
    assert ingress["spec"]["replicas"] == 1
    assert ingress["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in ingress["spec"]["template"]["spec"]["volumes"]}
    assert volumes["async"]["persistentVolumeClaim"] == {"claimName": "jobs"}
    assert not schema_errors(documents, "1.37")
    # Without it, the ingress keeps Kubernetes' rolling update.
    plain = workloads(render(helm, UMBRELLA, *MINIMAL))["mesh-ingress"]
    assert "strategy" not in plain["spec"]
    # Two replicas cannot share one SQLite store.
    assert "needs replicas: 1" in refused(helm, UMBRELLA, *MINIMAL, *async_on)


# --- two releases in one namespace stay apart --------------------------------------------

def grpc_peers(policy: dict) -> list[dict]:
    return [peer for rule in policy["spec"]["ingress"]
            if {"port": "grpc", "protocol": "TCP"} in rule["ports"]
            for peer in rule.get("from", []) if "namespaceSelector" not in peer]


def admits(peer: dict, labels: dict) -> bool:
    selector = peer["podSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
               if e["operator"] == "In")


def test_network_policies_admit_only_their_own_release(helm):
    mesh, other = (render(helm, UMBRELLA, *chart_values(*TWO_MODELS), release=name)
                   for name in ("mesh", "other"))
    theirs = [pod_labels(w) for w in workloads(other).values()]
    ours = [pod_labels(w) for w in workloads(mesh).values()]
    policies = [d for d in mesh if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 9
    for policy in policies:
        for peer in grpc_peers(policy):
            assert not any(admits(peer, labels) for labels in theirs), (
                policy["metadata"]["name"], peer)
            if COMPONENT in peer["podSelector"]["matchLabels"]:
                assert any(admits(peer, labels) for labels in ours), policy["metadata"]["name"]


def test_service_chart_callers_of_named_releases(helm):
    def peers(*args):
        [policy] = [d for d in render(helm, "compute", *chart_values("compute"), *args)
                    if d["kind"] == "NetworkPolicy"]
        return grpc_peers(policy)

    # Default: the service charts are separate releases, so any release's batchers.
    [peer] = peers()
    assert INSTANCE not in peer["podSelector"]["matchLabels"]
    [peer] = peers("--set", "networkPolicy.callerInstances={mlp-1}")
    assert peer["podSelector"]["matchLabels"][INSTANCE] == "mlp-1"
    [peer] = peers("--set", "networkPolicy.callerInstances={mlp-1,mlp-2}")
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": INSTANCE, "operator": "In", "values": ["mlp-1", "mlp-2"]}]
    assert admits(peer, {COMPONENT: "batcher", "app.kubernetes.io/part-of": "meshserve",
                         INSTANCE: "mlp-2"})


# --- names and labels Kubernetes would refuse are refused at render ---------------------

@pytest.mark.parametrize("release", ["my.rel", "1mesh"])
@pytest.mark.parametrize(("chart", "args"), [
    (UMBRELLA, MINIMAL), ("router", chart_values("router"))], ids=["umbrella", "router"])
def test_release_names_that_give_invalid_service_names_are_refused(helm, release, chart, args):
    stderr = refused(helm, chart, *args, release=release)
    assert f'release name "{release}" gives the Service name' in stderr
    assert "not a DNS-1035 label" in stderr


def test_service_chart_fullname_override_is_checked_too(helm):
    stderr = refused(helm, "router", *chart_values("router"), "--set", "fullnameOverride=Edge_1")
    assert '"Edge_1", which is not a DNS-1035 label' in stderr
    assert "fullnameOverride" in stderr


@pytest.mark.parametrize(("chart", "args"), [
    (UMBRELLA, MINIMAL), ("router", chart_values("router"))], ids=["umbrella", "router"])
@pytest.mark.parametrize(("labels", "path"), [
    ({"commonLabels": {"team": "a b"}}, "/commonLabels/team"),
    ({"commonLabels": {"team": "x" * 64}}, "/commonLabels/team"),
    ({"commonLabels": {"bad key": "x"}}, "/commonLabels"),
    ({"podLabels": {"tier": "-edge"}}, "/podLabels/tier"),
], ids=["space", "too-long", "bad-key", "pod-label"])
def test_invalid_label_values_are_refused(helm, tmp_path, chart, args, labels, path):
    if chart == UMBRELLA and "podLabels" in labels:
        labels, path = {"router": labels}, f"/router{path}"
    stderr = refused(helm, chart, *args, *write_values(tmp_path, "labels", labels))
    assert path in stderr


def test_valid_labels_render(helm):
    documents = render(helm, "router", *chart_values("router"), "--set-json",
                       'commonLabels={"example.com/team":"serving_a-1.b","empty":""}')
    [deployment] = workloads(documents).values()
    assert deployment["metadata"]["labels"]["example.com/team"] == "serving_a-1.b"


# --- the umbrella runs the control plane's scheduled backups ----------------------------

BACKUP = ("--set", "controlPlane.backup.enabled=true",
          "--set", "controlPlane.backup.target.existingClaim=meshserve-backups",
          "--set", "controlPlane.backup.signingKeySecret=backup-signing-key")


def test_umbrella_backup_cronjob(helm):
    assert not [d for d in render(helm, UMBRELLA, *MINIMAL) if d["kind"] == "CronJob"]
    for version in ("1.27", "1.37"):
        documents = render(helm, UMBRELLA, *MINIMAL, *BACKUP, "--kube-version", f"{version}.0")
        assert not schema_errors(documents, version), version
    [cronjob] = [d for d in documents if d["kind"] == "CronJob"]
    assert cronjob["metadata"]["name"] == "mesh-control-plane-backup"  # the README's runbook
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [backup] = pod["containers"]
    assert backup["command"] == ["meshserve", "backup"]
    known, _ = help_flags("backup")
    assert {arg.split("=", 1)[0] for arg in backup["args"]} <= known
    assert "--signing-key=/etc/meshserve/backup/signing/signing.key" in backup["args"]
    control_plane = workloads(documents)["mesh-control-plane"]["spec"]["template"]["spec"]
    data = [v for v in control_plane["volumes"] if v["name"] == "data"]
    assert [v for v in pod["volumes"] if v["name"] == "data"] == data
    archives = [v for v in pod["volumes"] if v["name"] == "archives"]
    assert archives == [{"name": "archives",
                         "persistentVolumeClaim": {"claimName": "meshserve-backups"}}]
