"""The umbrella chart `meshserve`: a whole mesh from one values file, checked offline.

Two values files: meshserve-two-models (a CPU cluster: mlp versions 1 and 2, cnn version 1,
cert-manager) and meshserve-gpu (a GPU per compute pod, existing Secrets, an init container
filling the model repository).
"""

import re

import pytest
import yaml

from tests.charts.chartlib import CHARTS, flag_values, help_flags, kubernetes_errors

CHART = "meshserve"
TWO_MODELS = ("meshserve-two-models",)
GPU_VALUES = ("meshserve-gpu",)
WORKLOADS = {"Deployment", "StatefulSet"}
IDENTITIES = ["control-plane", "router", "ingress", "batcher", "compute"]
COMPONENT = "app.kubernetes.io/component"
MODEL, VERSION = "meshserve.io/model", "meshserve.io/version"
GPU = "nvidia.com/gpu"
# Custom resources (test_custom_resources.py validates them against their CRD schemas).
CUSTOM_KINDS = {"Certificate", "ServiceMonitor"}
# Who may call whom (as in the service charts).
CALLERS = {"compute": {"batcher"}, "batcher": {"router", "control-plane"},
           "router": {"ingress"}, "ingress": None, "control-plane": {"router", "ingress"}}


def objects(helm, values=TWO_MODELS, extra=()) -> list[dict]:
    return list(helm.documents(CHART, values, extra))


def of_kind(documents, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def workloads(documents) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in WORKLOADS}


def main_container(workload: dict) -> dict:
    [main] = workload["spec"]["template"]["spec"]["containers"]
    return main


def labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, pod_labels: dict) -> bool:
    return selector.items() <= pod_labels.items()


@pytest.mark.parametrize("values", [TWO_MODELS, GPU_VALUES], ids=["two-models", "gpu"])
def test_lint_strict(helm, values):
    done = helm.lint(CHART, *values)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", ["1.27", "1.30", "1.37"])
@pytest.mark.parametrize("values", [TWO_MODELS, GPU_VALUES], ids=["two-models", "gpu"])
def test_objects_match_the_kubernetes_schemas(helm, values, version):
    documents = objects(helm, values, ("--kube-version", f"{version}.0"))
    errors = [error for document in documents if document["kind"] not in CUSTOM_KINDS
              for error in kubernetes_errors(document, version)]
    assert not errors, "\n".join(errors)


def test_one_compute_and_one_batcher_per_model_version(helm):
    documents = objects(helm)
    found = {}
    for name, workload in workloads(documents).items():
        component = labels(workload)[COMPONENT]
        if component in ("compute", "batcher"):
            key = (labels(workload)[MODEL], labels(workload)[VERSION])
            found.setdefault(key, {})[component] = (workload["kind"], name)
    assert found == {
        ("mlp", "1"): {"compute": ("StatefulSet", "mesh-mlp-1-compute"),
                       "batcher": ("Deployment", "mesh-mlp-1-batcher")},
        ("mlp", "2"): {"compute": ("StatefulSet", "mesh-mlp-2-compute"),
                       "batcher": ("Deployment", "mesh-mlp-2-batcher")},
        ("cnn", "1"): {"compute": ("StatefulSet", "mesh-cnn-1-compute"),
                       "batcher": ("Deployment", "mesh-cnn-1-batcher")},
    }
    singletons = {labels(w)[COMPONENT]: w for w in workloads(documents).values()
                  if labels(w)[COMPONENT] not in ("compute", "batcher")}
    assert sorted(singletons) == ["control-plane", "ingress", "router"]
    control_plane = singletons["control-plane"]["spec"]
    assert control_plane["replicas"] == 1 and control_plane["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("values", [TWO_MODELS, GPU_VALUES], ids=["two-models", "gpu"])
def test_args_are_the_services_real_flags(helm, values):
    for name, workload in workloads(objects(helm, values)).items():
        main = main_container(workload)
        service = main["command"][1]
        rendered = {arg.split("=", 1)[0] for arg in main["args"]}
        known, required = help_flags(service)
        assert rendered <= known, (name, rendered - known)
        assert required <= rendered, (name, required - rendered)


def test_every_upstream_is_a_rendered_service(helm):
    """--control-plane (router: xDS; ingress: readiness and audit), --router and every
    --compute name something this release renders."""
    documents = objects(helm)
    services = of_kind(documents, "Service")
    statefulsets = of_kind(documents, "StatefulSet")
    for name, workload in workloads(documents).items():
        args = main_container(workload)["args"]
        for flag in ("--control-plane", "--router"):
            for target in flag_values(args, flag):
                host, port = target.rsplit(":", 1)
                service = services[host]
                assert int(port) == service["spec"]["ports"][0]["port"], (name, target)
                assert labels(workload)[COMPONENT] in {"--control-plane": ("router", "ingress"),
                                                       "--router": ("ingress",)}[flag]
        targets = flag_values(args, "--compute")
        if not targets:
            continue
        # One per compute replica: <statefulset>-<ordinal>.<headless service>.<ns>.svc...
        model = labels(workload)[MODEL], labels(workload)[VERSION]
        [compute] = [s for s in statefulsets.values()
                     if (labels(s)[MODEL], labels(s)[VERSION]) == model]
        headless = services[compute["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is True
        assert selects(headless["spec"]["selector"], labels(compute))
        sts, replicas = compute["metadata"]["name"], compute["spec"]["replicas"]
        assert targets == [
            f"{sts}-{i}.{headless['metadata']['name']}.serving.svc.cluster.local:7004"
            for i in range(replicas)], name
    assert len(flag_values(main_container(workloads(documents)["mesh-mlp-1-batcher"])["args"],
                           "--compute")) == 2


def test_each_service_selects_only_its_own_pods(helm):
    """One release, many model versions: no Service or PodDisruptionBudget may select pods of
    another workload."""
    documents = objects(helm)
    pods = {name: labels(w) for name, w in workloads(documents).items()}
    for kind, selector_of in [
            ("Service", lambda d: d["spec"]["selector"]),
            ("PodDisruptionBudget", lambda d: d["spec"]["selector"]["matchLabels"])]:
        for name, document in of_kind(documents, kind).items():
            matched = [pod for pod, pod_labels in pods.items()
                       if selects(selector_of(document), pod_labels)]
            assert len(matched) == 1, (kind, name, matched)
    for name, workload in workloads(documents).items():
        matched = [pod for pod, pod_labels in pods.items()
                   if selects(workload["spec"]["selector"]["matchLabels"], pod_labels)]
        assert matched == [name]


def test_only_batcher_services_register_with_the_control_plane(helm):
    """The control plane registers every EndpointSlice labelled with a model and a version;
    EndpointSlices copy their Service's labels."""
    from meshserve.mesh.endpointslices import MODEL_LABEL, VERSION_LABEL

    registered = set()
    for name, service in of_kind(objects(helm), "Service").items():
        metadata = service["metadata"]["labels"]
        if MODEL_LABEL in metadata or VERSION_LABEL in metadata:
            assert metadata[COMPONENT] == "batcher", name
            assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "metrics"]
            assert metadata[VERSION_LABEL].isdigit()
            registered.add((metadata[MODEL_LABEL], metadata[VERSION_LABEL]))
    assert registered == {("mlp", "1"), ("mlp", "2"), ("cnn", "1")}


def test_network_policies_admit_only_the_callers(helm):
    documents = objects(helm)
    pods = {name: labels(w) for name, w in workloads(documents).items()}
    for name, policy in of_kind(documents, "NetworkPolicy").items():
        spec = policy["spec"]
        [target] = [p for p, pod_labels in pods.items()
                    if selects(spec["podSelector"]["matchLabels"], pod_labels)]
        component = pods[target][COMPONENT]
        [rule] = [r for r in spec["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
        if CALLERS[component] is None:
            assert "from" not in rule
            continue
        admitted = {pods[p][COMPONENT] for peer in rule["from"] for p in pods
                    if selects(peer["podSelector"].get("matchLabels", {}), pods[p])
                    and "namespaceSelector" not in peer}
        assert admitted == CALLERS[component], (name, admitted)


def test_certificates_per_identity_and_what_pods_mount(helm):
    documents = objects(helm)
    certificates = of_kind(documents, "Certificate")
    by_secret = {c["spec"]["secretName"]: c for c in certificates.values()}
    for name, workload in workloads(documents).items():
        component = labels(workload)[COMPONENT]
        spec = workload["spec"]["template"]["spec"]
        [tls] = [v for v in spec["volumes"] if v["name"] == "tls"]
        certificate = by_secret[tls["secret"]["secretName"]]
        assert certificate["spec"]["commonName"] == component, name
        assert component in certificate["spec"]["dnsNames"]
        assert certificate["spec"]["uris"] == [f"spiffe://meshserve.local/{component}"]
    assert "infer.example.com" in certificates["mesh-ingress"]["spec"]["dnsNames"]
    operator = certificates["mesh-operator"]["spec"]
    assert operator["usages"] == ["client auth", "digital signature"]
    assert {c["spec"]["issuerRef"]["kind"] for c in certificates.values()} == {"ClusterIssuer"}


def test_existing_secrets_without_cert_manager(helm):
    documents = objects(helm, GPU_VALUES)
    assert not of_kind(documents, "Certificate")
    for workload in workloads(documents).values():
        component = labels(workload)[COMPONENT]
        [tls] = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert tls["secret"]["secretName"] == f"meshserve-{component}-tls"


def test_gpu_only_on_compute(helm):
    documents = objects(helm, GPU_VALUES)
    for name, workload in workloads(documents).items():
        spec = workload["spec"]["template"]["spec"]
        limits = main_container(workload)["resources"].get("limits", {})
        if labels(workload)[COMPONENT] == "compute":
            assert limits[GPU] == 1, name
            assert limits["memory"] == "16Gi"
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert flag_values(main_container(workload)["args"], "--device") == ["cuda"]
        else:
            assert GPU not in limits, name
            assert "tolerations" not in spec, name
        if labels(workload)[COMPONENT] in ("compute", "batcher", "ingress"):
            [init] = spec["initContainers"]
            assert init["image"] == "registry.example.com/meshserve-models:2026-11"
    cnn = workloads(documents)["mesh-cnn-2-batcher"]
    assert cnn["spec"]["replicas"] == 2
    assert flag_values(main_container(cnn)["args"], "--batches-per-replica") == ["2"]
    # The CPU cluster's values ask for no GPU at all.
    for workload in workloads(objects(helm)).values():
        assert GPU not in main_container(workload)["resources"].get("limits", {})


def test_probes_are_http_gets_on_the_health_port_everywhere(helm):
    for name, workload in workloads(objects(helm)).items():
        main = main_container(workload)
        [port] = [p["containerPort"] for p in main["ports"] if p["name"] == "health"]
        assert flag_values(main["args"], "--health-listen") == [f"0.0.0.0:{port}"], name
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                            ("livenessProbe", "/livez")):
            assert main[probe]["httpGet"] == {"path": path, "port": "health"}, (name, probe)
            assert "exec" not in main[probe], (name, probe)


def test_only_the_control_plane_gets_an_api_token(helm):
    documents = objects(helm)
    for name, workload in workloads(documents).items():
        token = workload["spec"]["template"]["spec"]["automountServiceAccountToken"]
        assert token is (labels(workload)[COMPONENT] == "control-plane"), name
    [role] = of_kind(documents, "Role").values()
    assert role["rules"][0]["resources"] == ["endpointslices"]
    [binding] = of_kind(documents, "RoleBinding").values()
    assert binding["subjects"][0]["name"] == "mesh-control-plane"
    accounts = of_kind(documents, "ServiceAccount")
    assert sorted(accounts) == sorted(f"mesh-{identity}" for identity in IDENTITIES)
    for workload in workloads(documents).values():
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] in accounts


# --- values the umbrella refuses -------------------------------------------------------------

@pytest.mark.parametrize(("extra", "message"), [
    (("--set", "models[0].weight=90"), "weight"),
    (("--set", "models[0].version=v1"), "/models/0/version"),
    (("--set", "controlPlane.replicas=2"), "replicas"),
    (("--set", "models[0].replicas=0"), "/models/0/replicas"),
    (("--set", "tls.secretNames.router=x", "--set", "certManager.enabled=false"),
     "existing Secrets holding tls.crt, tls.key and ca.crt: tls.secretNames.controlPlane, "
     "tls.secretNames.ingress, tls.secretNames.batcher, tls.secretNames.compute\n"),
    (("--set", "models[2].name=mlp", "--set", "models[2].version=2"), "listed twice"),
    (("--set", "models[0].name=Bad Name"), "/models/0/name"),
], ids=["weight", "version-not-digits", "control-plane-replicas", "no-replicas",
        "secrets-missing", "duplicate", "bad-name"])
def test_refused(helm, extra, message):
    done = helm.template(CHART, *TWO_MODELS, extra=extra)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_install_with_defaults_stops_with_one_message_naming_the_values(helm):
    """`helm install mesh charts/meshserve` with no values: one error, which names every value
    only the cluster can provide, and nothing else (no schema errors)."""
    done = helm.run("install", "mesh", str(CHARTS / CHART), "--dry-run=client")
    assert done.returncode != 0
    [error] = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert "meshserve needs values that only your cluster can provide" in error
    message = done.stderr[done.stderr.index(error):]
    for value in ("certManager.enabled=true", "certManager.issuerRef.name",
                  "tls.secretNames.controlPlane", "tls.secretNames.router",
                  "tls.secretNames.ingress", "tls.secretNames.batcher",
                  "tls.secretNames.compute", "modelRepository.existingClaim",
                  "modelRepository.init.command"):
        assert value in message, value
    assert "schema" not in done.stderr


MINIMAL = ("--set", "certManager.enabled=true", "--set", "certManager.issuerRef.name=mesh-ca",
           "--set", "modelRepository.existingClaim=models")


def test_install_with_only_what_the_cluster_provides(helm):
    """Those values alone (an issuer and a claim) lint strictly and render a mesh whose every
    built-in object is valid Kubernetes."""
    lint = helm.run("lint", "--strict", str(CHARTS / CHART), *MINIMAL)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    done = helm.run("template", "mesh", str(CHARTS / CHART), "--namespace", "serving",
                    "--kube-version", "1.37.0", *MINIMAL)
    assert done.returncode == 0, done.stderr
    documents = [document for document in yaml.safe_load_all(done.stdout) if document]
    assert sorted(labels(w)[COMPONENT] for w in workloads(documents).values()) == [
        "control-plane", "ingress", "router"]
    errors = [error for document in documents if document["kind"] not in CUSTOM_KINDS
              for error in kubernetes_errors(document, "1.37")]
    assert not errors, "\n".join(errors)
    done = helm.run("install", "mesh", str(CHARTS / CHART), "--dry-run=client", *MINIMAL)
    assert done.returncode == 0, done.stderr


def test_no_models_renders_the_control_plane_router_and_ingress(helm):
    documents = objects(helm, TWO_MODELS, ("--set-json", "models=[]"))
    assert sorted(labels(w)[COMPONENT] for w in workloads(documents).values()) == [
        "control-plane", "ingress", "router"]


def test_schema_mirrors_the_service_charts():
    """The umbrella's schema reuses the service charts' definitions of the shared values."""
    import json

    from tests.charts.chartlib import CHARTS

    umbrella = json.loads((CHARTS / CHART / "values.schema.json").read_text())["properties"]
    router = json.loads((CHARTS / "router" / "values.schema.json").read_text())["properties"]
    for key in ("image", "probes", "securityContext", "podSecurityContext", "logLevel",
                "drainSeconds", "preStopSleepSeconds", "metrics", "serviceMonitor"):
        assert umbrella[key] == router[key], key
    for section in ("controlPlane", "router", "ingress", "compute", "batcher"):
        for key in ("metrics", "serviceMonitor"):  # a section replaces the whole block
            assert umbrella[section]["properties"][key] == router[key], (section, key)
    chart = (CHARTS / CHART / "Chart.yaml").read_text()
    assert re.search(r"kubeVersion: \">=1\.27\.0-0\"", chart)
