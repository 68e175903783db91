"""The control-plane chart's scheduled backups: a CronJob running `meshserve backup` on the
control plane's node, rendered, validated against Kubernetes' schemas, and its command run
for real against a store laid out as the chart mounts it."""

import subprocess
import sys

import pytest

from tests.charts.chartlib import flag_values, help_flags, kubernetes_errors, pod_spec
from tests.unit.test_backup import make_mesh

BACKUP = ("control-plane", "control-plane-backup")
FULL = ("control-plane", "control-plane-full")


def job_pod(objects: dict) -> dict:
    return objects["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]


def by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def test_no_backups_unless_enabled(helm):
    assert "CronJob" not in helm.render("control-plane")


def test_the_cronjob_backs_up_the_store_and_the_registry_to_a_volume(helm):
    objects = helm.render("control-plane", BACKUP)
    cronjob = objects["CronJob"]
    assert cronjob["metadata"]["name"] == "mesh-control-plane-backup"
    assert (cronjob["spec"]["schedule"], cronjob["spec"]["concurrencyPolicy"]) == (
        "0 * * * *", "Forbid")
    pod = job_pod(objects)
    spec = pod["spec"]
    [backup] = spec["containers"]
    assert backup["command"] == ["meshserve", "backup"]
    assert backup["args"] == [
        "--data-dir=/data", "--store=/data/mesh.db", "--out=/backups", "--keep=24",
        "--actor=cronjob/mesh-control-plane-backup",
        "--signing-key=/etc/meshserve/backup/signing/signing.key", "--model-repository=/models"]
    known, _ = help_flags("backup")
    assert {arg.split("=", 1)[0] for arg in backup["args"]} <= known
    # The same data volume as the control plane, on its node; never one of its Service's pods.
    deployment = pod_spec(objects)
    volumes = by_name(spec["volumes"])
    assert volumes["data"] == by_name(deployment["volumes"])["data"]
    assert volumes["archives"]["persistentVolumeClaim"] == {"claimName": "meshserve-backups"}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "meshserve-models-rw",
                                                          "readOnly": True}
    assert volumes["signing-key"]["secret"]["secretName"] == "registry-signing-key"
    [term] = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    selector = objects["Service"]["spec"]["selector"]
    assert term == {"topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector}}
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "control-plane-backup"
    assert not selector.items() <= labels.items()
    assert by_name(backup["volumeMounts"])["models"]["readOnly"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert backup["securityContext"]["readOnlyRootFilesystem"] is True
    for version in ("1.27", "1.37"):
        assert kubernetes_errors(cronjob, version) == []
    done = helm.lint(*BACKUP)
    assert done.returncode == 0, done.stdout + done.stderr


def test_keys_encrypted_and_an_object_store_copy_after_the_backup(helm):
    objects = helm.render("control-plane", FULL)
    spec = job_pod(objects)["spec"]
    [backup], [upload] = spec["initContainers"], spec["containers"]
    assert "--include-keys" in backup["args"]
    assert flag_values(backup["args"], "--kek-file") == ["/etc/meshserve/backup/kek/kek"]
    assert flag_values(backup["args"], "--keep") == ["96"]
    assert flag_values(backup["args"], "--signing-key") == [
        "/etc/meshserve/backup/signing/signing.key"]
    assert by_name(spec["volumes"])["kek"]["secret"]["secretName"] == "backup-kek"
    assert upload["image"] == "rclone/rclone:1.68"
    assert upload["args"] == ["sync", "/backups", "s3:meshserve-backups/control-plane"]
    assert by_name(upload["volumeMounts"])["archives"] == {
        "name": "archives", "mountPath": "/backups", "readOnly": True}
    env = by_name(upload["env"])
    assert env["BACKUP_DIR"]["value"] == "/backups"
    assert env["RCLONE_CONFIG_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
        "backup-bucket"
    assert objects["CronJob"]["spec"]["timeZone"] == "Etc/UTC"


@pytest.mark.parametrize(("extra", "message"), [
    (("--set", "backup.enabled=true", "--set", "backup.signingKeySecret=k"),
     "backup.target.existingClaim"),
    (("--set", "backup.enabled=true", "--set", "backup.target.existingClaim=b"),
     "a key to sign archives"),
    (("--set", "backup.keep=0"), "/backup/keep"),
], ids=["no-target", "no-signing-key", "keep-0"])
def test_what_the_chart_refuses(helm, extra, message):
    done = helm.template("control-plane", "control-plane", extra=extra)
    assert done.returncode != 0
    assert message in done.stderr


def test_the_rendered_command_backs_up_a_real_store(helm, tmp_path):
    """The job's exact arguments, with the volumes' mount paths pointed at local folders."""
    objects = helm.render("control-plane", BACKUP)
    [backup] = job_pod(objects)["spec"]["containers"]
    data, archives = tmp_path / "data", tmp_path / "backups"
    make_mesh(data)
    archives.mkdir()
    mounts = {"/data": str(data), "/backups": str(archives), "/models": str(data / "models"),
              "/etc/meshserve/backup/signing/signing.key": str(data / "keys" / "signing.key")}
    args = []
    for arg in backup["args"]:
        flag, _, value = arg.partition("=")
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                value = local + value[len(mount):]
        args.append(f"{flag}={value}")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "meshserve.tools.cli", *backup["command"][1:],
                               *args], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(archives.glob("meshserve-backup-*.tar"))) == 2
    restored = subprocess.run(
        [sys.executable, "-m", "meshserve.tools.cli", "restore", str(max(archives.iterdir())),
         f"--data-dir={tmp_path / 'restored'}", f"--trusted={data / 'keys' / 'trusted'}"],
        capture_output=True, text=True, timeout=120, check=False)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "audit log intact" in restored.stdout
