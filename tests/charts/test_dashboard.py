"""The umbrella chart's Grafana dashboard ConfigMap (`dashboard.enabled`)."""

import json
from pathlib import Path

import pytest

from tests.charts.chartlib import kubernetes_errors

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "meshserve.json"
CHART_COPY = ROOT / "charts" / "meshserve" / "dashboards" / "meshserve.json"
ENABLED = ("--set", "dashboard.enabled=true", "--set", "dashboard.annotations.grafana_folder=ml")


def config_maps(helm, extra=()) -> list[dict]:
    return [d for d in helm.documents("meshserve", ("meshserve-two-models",), extra)
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mesh-dashboard"]


def test_chart_copy_is_the_dashboard():
    assert CHART_COPY.read_bytes() == DASHBOARD.read_bytes()


def test_off_by_default(helm):
    assert config_maps(helm) == []


def test_renders_the_dashboard_for_grafanas_sidecar(helm):
    [config_map] = config_maps(helm, ENABLED)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "serving"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ml"}
    assert json.loads(config_map["data"]["meshserve.json"]) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize("version", ["1.27", "1.37"])
def test_config_map_matches_the_kubernetes_schema(helm, version):
    [config_map] = config_maps(helm, (*ENABLED, "--kube-version", f"{version}.0"))
    assert kubernetes_errors(config_map, version) == []


def test_lint_strict_with_the_dashboard(helm):
    done = helm.lint("meshserve", "meshserve-two-models", extra=ENABLED)
    assert done.returncode == 0, done.stdout + done.stderr


def test_schema_refuses_unknown_dashboard_keys(helm):
    done = helm.template("meshserve", "meshserve-two-models",
                         extra=("--set", "dashboard.enabld=true"))
    assert done.returncode != 0
