"""The control-plane chart with the admin API's access policy mounted from a ConfigMap."""

from tests.charts.chartlib import container, flag_values, help_flags, kubernetes_errors, pod_spec

POLICY = ("--set", "policy.configMap=admin-policy")


def test_policy_flag_mount_and_volume(helm):
    objects = helm.render("control-plane", extra=POLICY)
    main = container(objects)
    assert flag_values(main["args"], "--policy") == ["/etc/meshserve/admin-policy/policy.yaml"]
    known, _ = help_flags("control-plane")
    assert {arg.split("=", 1)[0] for arg in main["args"] if arg.startswith("--")} <= known
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["admin-policy"] == {"name": "admin-policy", "readOnly": True,
                                      "mountPath": "/etc/meshserve/admin-policy"}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["admin-policy"]["configMap"] == {"name": "admin-policy"}
    assert kubernetes_errors(objects["Deployment"], "1.30") == []


def test_a_custom_key_and_path(helm):
    objects = helm.render("control-plane", extra=(
        *POLICY, "--set", "policy.key=rules.yaml", "--set", "policy.mountPath=/etc/p/"))
    main = container(objects)
    assert flag_values(main["args"], "--policy") == ["/etc/p/rules.yaml"]


def test_no_policy_by_default(helm):
    objects = helm.render("control-plane")
    main = container(objects)
    assert not flag_values(main["args"], "--policy")
    assert "admin-policy" not in {v["name"] for v in pod_spec(objects)["volumes"]}


def test_schema_refuses_a_bad_configmap_name(helm):
    done = helm.template("control-plane", "control-plane",
                         extra=("--set", "policy.configMap=Not_A_Name"))
    assert done.returncode != 0
    assert "at '/policy/configMap': 'Not_A_Name' does not match pattern" in done.stderr
