"""Prometheus metrics in the charts: `--metrics-listen`, the port named `metrics` on the
container and the Service, the NetworkPolicy rule admitting it only from
`metrics.scrapeFrom`, and the optional ServiceMonitor (its CRD schema: test_custom_resources.py;
the rendered port served by the running services: test_probes.py).
"""

import json

import pytest

from tests.charts.chartlib import (
    container,
    flag_values,
    kubernetes_errors,
    pod_labels,
    public_ports,
)

CHARTS_RUN = ["compute", "batcher", "router", "ingress", "control-plane"]
COMPONENTS = CHARTS_RUN
UMBRELLA = "meshserve"
TWO_MODELS = ("meshserve-two-models",)
WORKLOADS = {"Deployment", "StatefulSet"}
COMPONENT = "app.kubernetes.io/component"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {}}
METRICS_PORT = {"port": "metrics", "protocol": "TCP"}


def full(service: str) -> str:
    return "control-plane-full" if service == "control-plane" else "full"


def ports(objects: dict, kind: str) -> dict[str, dict]:
    if kind == "container":
        return {p["name"]: p for p in container(objects)["ports"]}
    return {p["name"]: p for p in objects["Service"]["spec"]["ports"]}


def metrics_rules(policy: dict) -> list[dict]:
    return [rule for rule in policy["ingress"] if METRICS_PORT in rule["ports"]]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


# --- the service charts ------------------------------------------------------------------------

@pytest.mark.parametrize("service", CHARTS_RUN)
def test_metrics_on_by_default(helm, service):
    objects = helm.render(service)
    args = container(objects)["args"]
    assert flag_values(args, "--metrics-listen") == ["0.0.0.0:9090"]
    assert "--metrics-port-file" not in {arg.split("=", 1)[0] for arg in args}
    assert ports(objects, "container")["metrics"] == {
        "name": "metrics", "containerPort": 9090, "protocol": "TCP"}
    assert ports(objects, "Service")["metrics"] == {
        "name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP",
        "appProtocol": "http"}
    # The gRPC port is untouched (and stays first: upstream flags name it).
    assert objects["Service"]["spec"]["ports"][0]["name"] == "grpc"


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_metrics_port_from_values(helm, service):
    objects = helm.render(service, (service,), ("--set", "metrics.port=9464"))
    assert flag_values(container(objects)["args"], "--metrics-listen") == ["0.0.0.0:9464"]
    assert ports(objects, "container")["metrics"]["containerPort"] == 9464
    assert ports(objects, "Service")["metrics"]["port"] == 9464
    [rule] = metrics_rules(objects["NetworkPolicy"]["spec"])
    assert rule["ports"] == [METRICS_PORT]  # by name: follows the container port


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_metrics_off(helm, service):
    objects = helm.render(service, (service,), ("--set", "metrics.enabled=false"))
    args = container(objects)["args"]
    assert not [arg for arg in args if arg.startswith("--metrics")]
    assert list(ports(objects, "container")) == [*public_ports(service), "health"]  # probes stay
    assert list(ports(objects, "Service")) == public_ports(service)
    policy = objects["NetworkPolicy"]["spec"]
    assert not metrics_rules(policy)
    assert len(policy["ingress"]) == 1
    assert "ServiceMonitor" not in objects


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_network_policy_admits_metrics_only_from_scrape_from(helm, service):
    objects = helm.render(service)
    policy = objects["NetworkPolicy"]["spec"]
    [rule] = metrics_rules(policy)
    assert rule == {"ports": [METRICS_PORT], "from": [MONITORING]}
    # No other rule opens the metrics port (the ingress's gRPC rule admits anyone).
    for other in policy["ingress"]:
        if other is not rule:
            assert other["ports"] == [{"port": name, "protocol": "TCP"}
                                      for name in public_ports(service)]


def test_scrape_from_is_configurable(helm):
    prometheus = {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    # Both: one peer, both selectors must match.
    objects = helm.render("router", ("router",), (
        "--set-json", f"metrics.scrapeFrom.podSelector={json.dumps(prometheus)}"))
    [rule] = metrics_rules(objects["NetworkPolicy"]["spec"])
    assert rule["from"] == [{"namespaceSelector": MONITORING["namespaceSelector"],
                             "podSelector": prometheus}]
    # null drops the default namespace selector: Prometheus' pods of this namespace only.
    objects = helm.render("router", ("router",), (
        "--set-json", f"metrics.scrapeFrom.podSelector={json.dumps(prometheus)}",
        "--set-json", "metrics.scrapeFrom.namespaceSelector=null"))
    [rule] = metrics_rules(objects["NetworkPolicy"]["spec"])
    assert rule["from"] == [{"podSelector": prometheus}]


def test_scrape_from_needs_a_selector(helm):
    """No selector at all would make a rule without peers, which admits any source: refused."""
    done = helm.template("router", "router", extra=(
        "--set-json", "metrics.scrapeFrom.namespaceSelector=null",
        "--set-json", "metrics.scrapeFrom.podSelector=null"))
    assert done.returncode != 0
    assert "scrapeFrom" in done.stderr, done.stderr


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_service_monitor_only_when_enabled(helm, service):
    assert "ServiceMonitor" not in helm.render(service)
    enabled = helm.render(service, (service,), ("--set", "serviceMonitor.enabled=true"))
    monitor = enabled["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}]


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_service_monitor_selects_the_service_and_its_metrics_port(helm, service):
    objects = helm.render(service, (service, full(service)))
    monitor, svc = objects["ServiceMonitor"], objects["Service"]
    spec = monitor["spec"]
    assert selects(spec["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert spec["namespaceSelector"] == {"matchNames": ["serving"]}
    [endpoint] = spec["endpoints"]
    service_ports = ports(objects, "Service")
    assert endpoint["port"] in service_ports
    # ... and that Service port reaches the container's metrics port.
    target = service_ports[endpoint["port"]]["targetPort"]
    assert target in ports(objects, "container")
    assert endpoint["path"] == "/metrics"
    expected = {"interval": "15s", "labels": {}} if service == "control-plane" else {
        "interval": "30s", "labels": {"release": "kube-prometheus-stack"}}
    assert endpoint["interval"] == expected["interval"]
    assert expected["labels"].items() <= monitor["metadata"]["labels"].items()
    # Model-version services: their pods' labels become target labels.
    model_labels = ["meshserve.io/model", "meshserve.io/version"]
    if service in ("compute", "batcher"):
        assert spec["podTargetLabels"] == model_labels
        assert set(model_labels) <= set(pod_labels(objects))
    else:
        assert "podTargetLabels" not in spec


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_an_exposed_service_keeps_metrics_inside_the_cluster(helm, service_type):
    """A LoadBalancer or NodePort Service would publish the metrics port: it gets a ClusterIP
    Service of its own, which the ServiceMonitor finds by the same labels."""
    docs = list(helm.documents("ingress", ("ingress",), (
        "--set", f"service.type={service_type}", "--set", "serviceMonitor.enabled=true")))
    services = of_kind(docs, "Service")
    assert sorted(services) == ["mesh-ingress", "mesh-ingress-metrics"]
    public, metrics = services["mesh-ingress"], services["mesh-ingress-metrics"]
    assert public["spec"]["type"] == service_type
    assert [p["name"] for p in public["spec"]["ports"]] == public_ports("ingress")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics",
                                         "protocol": "TCP", "appProtocol": "http"}]
    [deployment] = of_kind(docs, "Deployment").values()
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(metrics["spec"]["selector"], pods)
    [monitor] = of_kind(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selects(selector, metrics["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert [s["metadata"]["name"] for s in services.values()
            if selects(selector, s["metadata"]["labels"])
            and endpoint["port"] in [p["name"] for p in s["spec"]["ports"]]] == [
        "mesh-ingress-metrics"]
    errors = [e for d in docs if d["kind"] == "Service" for e in kubernetes_errors(d, "1.37")]
    assert not errors, errors


@pytest.mark.parametrize("service", CHARTS_RUN)
def test_schema_refuses_a_service_monitor_without_metrics(helm, service):
    done = helm.template(service, service, extra=(
        "--set", "serviceMonitor.enabled=true", "--set", "metrics.enabled=false"))
    assert done.returncode != 0
    assert "at '/metrics/enabled': value must be true" in done.stderr, done.stderr
    assert "at '/serviceMonitor/enabled': value must be false" in done.stderr, done.stderr
    done = helm.lint(service, service, extra=(
        "--set", "serviceMonitor.enabled=true", "--set", "metrics.enabled=false"))
    assert done.returncode != 0
    # Metrics off without a ServiceMonitor is fine.
    done = helm.lint(service, service, extra=("--set", "metrics.enabled=false"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("setting", "field"), [
    ("metrics.port=0", "/metrics/port"), ("metrics.port=70000", "/metrics/port"),
    ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
    ("metrics.scrape=all", "scrape"),
])
def test_schema_refuses_bad_metrics_values(helm, setting, field):
    done = helm.template("batcher", "batcher", extra=("--set", setting))
    assert done.returncode != 0
    assert field in done.stderr, done.stderr


# --- the umbrella chart ------------------------------------------------------------------------

def documents(helm, extra=()) -> list[dict]:
    return list(helm.documents(UMBRELLA, TWO_MODELS, extra))


def workloads(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS}


def of_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_umbrella_every_workload_serves_metrics(helm):
    docs = documents(helm)
    for name, workload in workloads(docs).items():
        [main] = workload["spec"]["template"]["spec"]["containers"]
        assert flag_values(main["args"], "--metrics-listen") == ["0.0.0.0:9090"], name
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in main["ports"]
    services = of_kind(docs, "Service")
    for name, service in services.items():
        names = [p["name"] for p in service["spec"]["ports"]]
        if name == "mesh-ingress":  # a LoadBalancer: its metrics port has a Service of its own
            assert service["spec"]["type"] == "LoadBalancer"
            assert names == public_ports("ingress")
        elif name == "mesh-ingress-metrics":
            assert service["spec"]["type"] == "ClusterIP"
            assert names == ["metrics"]
        else:
            assert names == ["grpc", "metrics"], name
    for name, policy in of_kind(docs, "NetworkPolicy").items():
        [rule] = metrics_rules(policy["spec"])
        assert rule["from"] == [MONITORING], name
    assert not of_kind(docs, "ServiceMonitor")


def test_umbrella_service_monitors_select_each_components_services(helm):
    docs = documents(helm, ("--set", "serviceMonitor.enabled=true"))
    monitors = of_kind(docs, "ServiceMonitor")
    assert sorted(monitors) == sorted(f"mesh-{component}" for component in COMPONENTS)
    services = of_kind(docs, "Service")
    for name, monitor in monitors.items():
        component = name.removeprefix("mesh-")
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services.values() if selects(selector, s["metadata"]["labels"])]
        # Every Service of the component (compute and batcher: one per model version), only.
        expected = [s for s in services.values()
                    if s["metadata"]["labels"][COMPONENT] == component]
        assert selected == expected and selected, name
        if component in ("compute", "batcher"):
            assert len(selected) == 3  # mlp 1, mlp 2, cnn 1
        [endpoint] = monitor["spec"]["endpoints"]
        scraped = [s["metadata"]["name"] for s in selected
                   if endpoint["port"] in [p["name"] for p in s["spec"]["ports"]]]
        # Every workload of the component is scraped through exactly one Service.
        assert len(scraped) == len([w for w in workloads(docs).values()
                                    if w["metadata"]["labels"][COMPONENT] == component])
        if component == "ingress":
            assert scraped == ["mesh-ingress-metrics"]
        else:
            assert scraped == [s["metadata"]["name"] for s in selected]


def test_umbrella_component_section_replaces_metrics(helm):
    router_metrics = {"enabled": True, "port": 9464,
                      "scrapeFrom": {"podSelector": {"matchLabels": {"app": "prometheus"}}}}
    docs = documents(helm, ("--set-json", f"router.metrics={json.dumps(router_metrics)}",
                            "--set-json", 'ingress.metrics={"enabled": false, "port": 9090, '
                                          '"scrapeFrom": {"podSelector": {}}}'))
    by_component = {w["spec"]["template"]["metadata"]["labels"][COMPONENT]: w
                    for w in workloads(docs).values()}
    router = by_component["router"]["spec"]["template"]["spec"]["containers"][0]
    assert flag_values(router["args"], "--metrics-listen") == ["0.0.0.0:9464"]
    ingress = by_component["ingress"]["spec"]["template"]["spec"]["containers"][0]
    assert not flag_values(ingress["args"], "--metrics-listen")
    policies = of_kind(docs, "NetworkPolicy")
    [rule] = metrics_rules(policies["mesh-router"]["spec"])
    assert rule["from"] == [router_metrics["scrapeFrom"]]
    assert not metrics_rules(policies["mesh-ingress"]["spec"])


@pytest.mark.parametrize(("extra", "messages"), [
    (("--set", "serviceMonitor.enabled=true", "--set", "metrics.enabled=false"),
     ["at '/metrics/enabled': value must be true",
      "at '/serviceMonitor/enabled': value must be false"]),
    (("--set-json", 'batcher.serviceMonitor={"enabled": true, "interval": "15s"}',
      "--set-json", 'batcher.metrics={"enabled": false, "port": 9090, '
                    '"scrapeFrom": {"podSelector": {}}}'),
     ["at '/batcher/metrics/enabled': value must be true",
      "at '/batcher/serviceMonitor/enabled': value must be false"]),
    # Across levels (metrics off for all, a section's ServiceMonitor on): the template says so.
    (("--set", "metrics.enabled=false",
      "--set-json", 'router.serviceMonitor={"enabled": true, "interval": "15s"}'),
     ["serviceMonitor.enabled needs metrics.enabled (router)"]),
], ids=["shared", "section", "across-levels"])
def test_umbrella_refuses_a_service_monitor_without_metrics(helm, extra, messages):
    done = helm.template(UMBRELLA, *TWO_MODELS, extra=extra)
    assert done.returncode != 0
    for message in messages:
        assert message in done.stderr, done.stderr
