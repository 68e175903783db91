"""Custom resources the charts render, validated offline against their CRD schemas.

tests/js/validate.mjs dispatches on apiVersion/kind across @kubernetes-models/istio,
@kubernetes-models/cert-manager and @kubernetes-models/prometheus-operator (installed with
`npm ci` into tests/js/node_modules when missing or stale). Every cert-manager Certificate
of every chart is checked (with certManager on). The charts render no ServiceMonitor: the
services have no metrics port yet.

Without node or npm on PATH these tests are skipped (the reason says so).
"""

import fcntl
import json
import shutil
import subprocess

import pytest

from tests.charts.chartlib import ROOT

JS = ROOT / "tests" / "js"
INSTALL_TIMEOUT_S = 300
VALIDATE_TIMEOUT_S = 60
# Each chart with the values that turn its custom resources on.
RENDERED = [("compute", ("compute", "full")), ("batcher", ("batcher", "full")),
            ("router", ("router", "full")), ("ingress", ("ingress", "full")),
            ("control-plane", ("control-plane", "control-plane-full")),
            ("meshserve", ("meshserve-two-models",))]
CUSTOM_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/", "networking.istio.io/")


def installed(node_modules) -> bool:
    """node_modules holds a finished install of every version package.json pins."""
    wanted = json.loads((JS / "package.json").read_text())["dependencies"]
    if not (node_modules / ".package-lock.json").is_file():  # written when npm ci finishes
        return False
    for name, version in wanted.items():
        manifest = node_modules / name / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


@pytest.fixture(scope="session")
def validate():
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to validate custom resources (tests/js); "
                    "not on PATH")
    node_modules = JS / "node_modules"
    with open(JS / ".install.lock", "w") as lock:  # one install at a time (parallel runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed(node_modules):
            command = [npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund",
                       "--engine-strict=false", "--loglevel=error"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                      timeout=INSTALL_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`npm ci --prefix tests/js` ran past {INSTALL_TIMEOUT_S} s "
                            "(is the npm registry reachable?)")
            if done.returncode != 0 or not installed(node_modules):
                pytest.fail(f"`npm ci --prefix tests/js` exited {done.returncode}\n"
                            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def run(objects: list[dict]) -> tuple[int, dict]:
        try:
            done = subprocess.run([node, str(JS / "validate.mjs")], input=json.dumps(objects),
                                  capture_output=True, text=True, cwd=ROOT,
                                  timeout=VALIDATE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node tests/js/validate.mjs ran past {VALIDATE_TIMEOUT_S} s")
        try:
            return done.returncode, json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"node tests/js/validate.mjs exited {done.returncode} without a JSON "
                        f"result\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")

    return run


def custom_resources(helm, chart: str, values: tuple[str, ...]) -> list[dict]:
    return [d for d in helm.documents(chart, values)
            if d["apiVersion"].startswith(CUSTOM_GROUPS)]


@pytest.mark.parametrize(("chart", "values"), RENDERED, ids=[chart for chart, _ in RENDERED])
def test_rendered_custom_resources_match_their_crd_schemas(helm, validate, chart, values):
    objects = custom_resources(helm, chart, values)
    assert objects, f"{chart} rendered no custom resource with {values}"
    rc, result = validate(objects)
    assert (rc, result["ok"]) == (0, True), json.dumps(result, indent=2)
    kinds = {r["kind"] for r in result["results"]}
    assert kinds == {"Certificate"}  # no ServiceMonitor: the services have no metrics port


def test_umbrella_certificates_are_all_checked(helm, validate):
    objects = custom_resources(helm, "meshserve", ("meshserve-two-models",))
    rc, result = validate(objects)
    assert rc == 0
    assert sorted(r["name"] for r in result["results"]) == sorted(
        f"mesh-{name}" for name in
        ["control-plane", "router", "ingress", "compute", "batcher", "operator"])


def test_a_broken_certificate_is_reported(helm, validate):
    [certificate] = custom_resources(helm, "router", ("router", "full"))
    certificate["spec"]["usages"] = ["server auth", "teleportation"]
    certificate["spec"]["privateKey"]["size"] = "large"
    rc, result = validate([certificate])
    assert rc == 1 and result["ok"] is False
    errors = result["results"][0]["errors"]
    assert any("/spec/usages/1 must be equal to one of the allowed values" in e for e in errors)
    assert any("/spec/privateKey/size must be integer" in e for e in errors)


def test_dispatch_reaches_every_package(validate):
    """One object per package (an Istio DestinationRule, a cert-manager Issuer, a Prometheus
    Operator ServiceMonitor), and a kind none of them knows."""
    objects = [
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "batcher"}, "spec": {"host": "batcher"}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "ca"},
         "spec": {"ca": {"secretName": "meshserve-ca"}}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "mesh"},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/part-of": "meshserve"}},
                  "endpoints": [{"port": "metrics", "interval": "15s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "bad"}, "spec": {"selector": {}, "endpoints": "metrics"}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificat", "metadata": {"name": "x"}},
    ]
    rc, result = validate(objects)
    assert rc == 1
    assert [r["ok"] for r in result["results"]] == [True, True, True, False, False]
    assert any("/spec/endpoints must be array" in e for e in result["results"][3]["errors"])
    assert any("unknown apiVersion/kind" in e for e in result["results"][4]["errors"])
