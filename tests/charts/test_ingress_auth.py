"""The ingress chart with authentication: the token port, the policy and the JWKS mounted."""

import pytest

from tests.charts.chartlib import container, flag_values, help_flags, kubernetes_errors, pod_spec

AUTH = ("ingress", "ingress-auth")


def test_auth_flags_ports_and_mounts(helm):
    objects = helm.render("ingress", AUTH)
    main = container(objects)
    args = main["args"]
    assert flag_values(args, "--token-listen") == ["0.0.0.0:8002"]
    assert flag_values(args, "--policy") == ["/etc/meshserve/auth/policy/policy.yaml"]
    assert flag_values(args, "--jwks") == ["/etc/meshserve/auth/jwks/jwks.json"]
    assert flag_values(args, "--token-issuer") == ["meshserve"]
    assert flag_values(args, "--token-audience") == ["meshserve-ingress"]
    assert flag_values(args, "--audit-denied-sample") == ["0.01"]
    known, _ = help_flags("ingress")
    assert {arg.split("=", 1)[0] for arg in args if arg.startswith("--")} <= known
    assert {p["name"]: p["containerPort"] for p in main["ports"]}["token"] == 8002
    service_ports = {p["name"]: (p["port"], p["targetPort"])
                     for p in objects["Service"]["spec"]["ports"]}
    assert service_ports["token"] == (8002, "token")
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert mounts["auth-policy"] == {"name": "auth-policy", "readOnly": True,
                                     "mountPath": "/etc/meshserve/auth/policy"}
    assert volumes["auth-policy"]["configMap"] == {"name": "ingress-policy"}
    assert "subPath" not in mounts["auth-jwks"]  # updates must reach the pod
    assert volumes["auth-jwks"]["secret"]["secretName"] == "ingress-jwks"
    [rule] = [r for r in objects["NetworkPolicy"]["spec"]["ingress"]
              if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    assert {"port": "token", "protocol": "TCP"} in rule["ports"]
    for kind in ("Deployment", "Service", "NetworkPolicy"):
        assert kubernetes_errors(objects[kind], "1.30") == [], kind


def test_auth_with_a_jwks_url_mounts_no_secret(helm):
    objects = helm.render("ingress", AUTH, extra=(
        "--set", "auth.jwksSecret=", "--set", "auth.jwksUrl=https://issuer.example/jwks.json"))
    main = container(objects)
    assert flag_values(main["args"], "--jwks") == ["https://issuer.example/jwks.json"]
    assert "auth-jwks" not in {v["name"] for v in pod_spec(objects)["volumes"]}


def test_auth_disabled_by_default(helm):
    objects = helm.render("ingress")
    main = container(objects)
    assert not flag_values(main["args"], "--policy")
    assert [p["name"] for p in main["ports"]] == ["grpc", "http", "metrics", "health"]


@pytest.mark.parametrize(("unset", "message"), [
    ("auth.policyConfigMap", "auth.policyConfigMap is required when auth.enabled"),
    ("auth.jwksSecret", "auth.enabled needs auth.jwksSecret"),
])
def test_auth_needs_a_policy_and_keys(helm, unset, message):
    done = helm.template("ingress", *AUTH, extra=("--set", f"{unset}="))
    assert done.returncode != 0
    assert message in done.stderr


def test_auth_values_lint(helm):
    done = helm.lint("ingress", *AUTH)
    assert done.returncode == 0, done.stdout + done.stderr
