"""Security values of the charts: signed and encrypted artifacts on compute, the model
registry on the control plane, and --allow-callers on every service that has the flag.
Every key is mounted from a Secret as a whole volume (no subPath), never put on the command
line."""

import pytest

from tests.charts.chartlib import container, flag_values, help_flags, kubernetes_errors, pod_spec

ARTIFACTS = ("compute", "compute-artifacts")
REGISTRY = ("control-plane", "control-plane-registry")
UMBRELLA = ("meshserve-two-models", "meshserve-secured")
KUBERNETES = ["1.27", "1.30", "1.37"]


def flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args}


def mounts_and_volumes(spec: dict) -> tuple[dict, dict]:
    """The main container's volumeMounts and the pod's volumes, by name, of a pod spec."""
    [main] = spec["containers"]
    return ({m["name"]: m for m in main["volumeMounts"]}, {v["name"]: v for v in spec["volumes"]})


def assert_real_flags(service: str, args: list[str]) -> None:
    known, required = help_flags(service)
    assert flags(args) <= known, f"not flags of meshserve {service}: {flags(args) - known}"
    assert required <= flags(args)


# --- compute: signed and encrypted artifacts -----------------------------------------------

def test_compute_verifies_signatures_with_keys_from_secrets(helm):
    objects = helm.render("compute", ARTIFACTS)
    args = container(objects)["args"]
    assert flag_values(args, "--trusted-signers") == ["/etc/meshserve/artifacts/signers"]
    assert "--require-signed" in args
    assert flag_values(args, "--kek-file") == ["/etc/meshserve/artifacts/kek/kek.b64"]
    assert flag_values(args, "--allow-callers") == ["batcher,client/loadtest"]
    assert_real_flags("compute", args)
    mounts, volumes = mounts_and_volumes(pod_spec(objects))
    assert mounts["artifacts-signers"] == {"name": "artifacts-signers", "readOnly": True,
                                           "mountPath": "/etc/meshserve/artifacts/signers"}
    assert mounts["artifacts-kek"] == {"name": "artifacts-kek", "readOnly": True,
                                       "mountPath": "/etc/meshserve/artifacts/kek"}
    assert volumes["artifacts-signers"]["secret"] == {"secretName": "model-signers",
                                                      "defaultMode": 0o444}
    # The KEK is secret: readable by the pod's group (fsGroup) only.
    assert volumes["artifacts-kek"]["secret"] == {"secretName": "model-kek", "defaultMode": 0o440}
    for version in KUBERNETES:
        assert kubernetes_errors(objects["Deployment"], version) == [], version


def test_signing_is_off_by_default(helm):
    """Existing installs keep loading unsigned versions: no flag, no volume."""
    objects = helm.render("compute")
    args = container(objects)["args"]
    assert not flags(args) & {"--trusted-signers", "--require-signed", "--kek-file",
                              "--allow-callers"}
    mounts, volumes = mounts_and_volumes(pod_spec(objects))
    assert not {name for name in [*mounts, *volumes] if name.startswith("artifacts")}


def test_verification_without_requiring_signatures_and_a_kek_alone(helm):
    objects = helm.render("compute", ARTIFACTS, extra=(
        "--set", "artifacts.requireSigned=false", "--set", "artifacts.kekSecret="))
    args = container(objects)["args"]
    assert flag_values(args, "--trusted-signers") == ["/etc/meshserve/artifacts/signers"]
    assert not flags(args) & {"--require-signed", "--kek-file"}
    assert "artifacts-kek" not in mounts_and_volumes(pod_spec(objects))[1]
    objects = helm.render("compute", ARTIFACTS, extra=(
        "--set", "artifacts.requireSigned=false", "--set", "artifacts.trustedSignersSecret="))
    args = container(objects)["args"]
    assert flag_values(args, "--kek-file") == ["/etc/meshserve/artifacts/kek/kek.b64"]
    assert not flags(args) & {"--require-signed", "--trusted-signers"}


def test_require_signed_needs_trusted_signers(helm):
    done = helm.template("compute", *ARTIFACTS, extra=("--set", "artifacts.trustedSignersSecret="))
    assert done.returncode != 0
    assert "artifacts.requireSigned needs artifacts.trustedSignersSecret" in done.stderr


# --- control plane: the model registry ------------------------------------------------------

def test_registry_writes_the_shared_repository_with_keys_from_secrets(helm):
    objects = helm.render("control-plane", REGISTRY)
    args = container(objects)["args"]
    assert flag_values(args, "--model-repository") == ["/models"]
    assert flag_values(args, "--registry-dir") == ["/data/registry"]  # on the data volume
    assert flag_values(args, "--signing-key") == ["/etc/meshserve/registry/signing/signing.key"]
    assert flag_values(args, "--kek-file") == ["/etc/meshserve/registry/kek/kek"]
    assert flag_values(args, "--allow-callers") == ["router,ingress,batcher,client/operator"]
    assert_real_flags("control-plane", args)
    mounts, volumes = mounts_and_volumes(pod_spec(objects))
    # Read-write: the control plane writes pushed versions there.
    assert mounts["registry-models"] == {"name": "registry-models", "mountPath": "/models"}
    assert volumes["registry-models"]["persistentVolumeClaim"] == {
        "claimName": "meshserve-models-rw"}
    for name, secret in (("registry-signing", "registry-signing-key"),
                         ("registry-kek", "registry-kek")):
        assert mounts[name]["readOnly"] is True and "subPath" not in mounts[name]
        assert volumes[name]["secret"] == {"secretName": secret, "defaultMode": 0o440}
    for version in KUBERNETES:
        assert kubernetes_errors(objects["Deployment"], version) == [], version


def test_registry_without_a_key_secret_keeps_its_key_on_the_data_volume(helm):
    """Never in the model repository, which every compute pod reads."""
    objects = helm.render("control-plane", REGISTRY, extra=(
        "--set", "registry.signingKeySecret=", "--set", "registry.kekSecret="))
    args = container(objects)["args"]
    assert flag_values(args, "--signing-key") == ["/data/keys/signing.key"]
    assert not flag_values(args, "--kek-file")
    mounts, volumes = mounts_and_volumes(pod_spec(objects))
    assert not {"registry-signing", "registry-kek"} & {*mounts, *volumes}


def test_registry_is_off_by_default(helm):
    objects = helm.render("control-plane")
    args = container(objects)["args"]
    assert not flags(args) & {"--model-repository", "--registry-dir", "--signing-key",
                              "--kek-file"}
    assert "registry-models" not in mounts_and_volumes(pod_spec(objects))[1]


def test_registry_needs_a_claim(helm):
    done = helm.template("control-plane", *REGISTRY,
                         extra=("--set", "registry.modelRepositoryClaim="))
    assert done.returncode != 0
    assert "registry.modelRepositoryClaim is required when registry.enabled" in done.stderr


# --- --allow-callers -------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["compute", "batcher", "router", "control-plane"])
def test_allow_callers_overrides_the_default(helm, service):
    assert not flag_values(container(helm.render(service))["args"], "--allow-callers")
    objects = helm.render(service, (service,), extra=(
        "--set-json", 'allowCallers=["router","client/*"]'))
    args = container(objects)["args"]
    assert flag_values(args, "--allow-callers") == ["router,client/*"]
    assert_real_flags(service, args)


def test_ingress_has_no_allow_callers(helm):
    """The ingress authorizes with its policy (auth), not --allow-callers."""
    done = helm.template("ingress", "ingress", extra=("--set-json", 'allowCallers=["x"]'))
    assert done.returncode != 0
    assert "allowCallers" in done.stderr


def test_schema_refuses_a_caller_list_with_commas(helm):
    done = helm.template("router", "router", extra=("--set-json", 'allowCallers=["a,b"]'))
    assert done.returncode != 0
    assert "/allowCallers/0" in done.stderr


# --- lint --------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [ARTIFACTS, REGISTRY], ids=["compute", "control-plane"])
def test_values_lint(helm, values):
    done = helm.lint(values[0], *values)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the umbrella chart -----------------------------------------------------------------------

def umbrella_workloads(helm, extra=()) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in helm.documents("meshserve", UMBRELLA, extra)
            if d["kind"] in ("Deployment", "StatefulSet")}


def test_umbrella_registry_writes_what_every_compute_reads(helm):
    workloads = umbrella_workloads(helm)
    control_plane = workloads["mesh-control-plane"]
    args = control_plane["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag_values(args, "--model-repository") == ["/models"]
    assert flag_values(args, "--registry-dir") == ["/data/registry"]
    mounts, volumes = mounts_and_volumes(control_plane["spec"]["template"]["spec"])
    claim = volumes["registry-models"]["persistentVolumeClaim"]
    assert claim == {"claimName": "meshserve-models-rw"}  # modelRepository.existingClaim
    computes = {name: w for name, w in workloads.items() if w["kind"] == "StatefulSet"}
    assert sorted(computes) == ["mesh-cnn-1-compute", "mesh-mlp-1-compute"]
    for workload in workloads.values():
        [main] = workload["spec"]["template"]["spec"]["containers"]
        assert_real_flags(main["command"][1], main["args"])
    for name, compute in computes.items():
        mounts, volumes = mounts_and_volumes(compute["spec"]["template"]["spec"])
        assert volumes["models"]["persistentVolumeClaim"] == {**claim, "readOnly": True}, name
        assert mounts["models"]["readOnly"] is True
        args = compute["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--require-signed" in args
        assert flag_values(args, "--trusted-signers") == ["/etc/meshserve/artifacts/signers"]
        assert volumes["artifacts-signers"]["secret"]["secretName"] == "model-signers"
        assert flag_values(args, "--allow-callers") == ["batcher"]


def test_umbrella_registry_needs_a_shared_claim(helm):
    """An init container's emptyDir is per pod: pushed versions would reach no compute."""
    done = helm.template("meshserve", "meshserve-gpu", extra=(
        "--set", "controlPlane.registry.enabled=true"))
    assert done.returncode != 0
    assert "controlPlane.registry.enabled needs modelRepository.existingClaim" in done.stderr


@pytest.mark.parametrize("version", KUBERNETES)
def test_umbrella_objects_match_the_kubernetes_schemas(helm, version):
    documents = helm.documents("meshserve", UMBRELLA, ("--kube-version", f"{version}.0"))
    errors = [error for document in documents
              if document["kind"] not in {"Certificate", "ServiceMonitor"}
              for error in kubernetes_errors(document, version)]
    assert not errors, "\n".join(errors)


def test_umbrella_lint(helm):
    done = helm.lint("meshserve", *UMBRELLA)
    assert done.returncode == 0, done.stdout + done.stderr
