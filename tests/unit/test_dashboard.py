"""The Grafana dashboard: well-formed, and every metric its PromQL names is one meshserve
exports (the names services/common/metrics.py registers)."""

import json
import re
from pathlib import Path

from meshserve.common.metrics import (
    BatcherMetrics,
    CacheMetrics,
    ComputeMetrics,
    IngressMetrics,
    Metrics,
    XdsCollector,
)

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "meshserve.json"

PROMQL_WORDS = {
    # functions
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "delta",
    "deriv", "exp", "floor", "histogram_quantile", "histogram_count", "histogram_sum",
    "holt_winters", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time",
    "ln", "log2", "log10", "max_over_time", "min_over_time", "predict_linear",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sqrt", "stddev_over_time", "sum_over_time", "time", "timestamp", "vector",
    # aggregations and keywords
    "sum", "avg", "min", "max", "count", "count_values", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "group", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "and", "or", "unless",
}


def exported_names() -> set[str]:
    """Every sample name the services' registries hold (one registry each, as each service
    has its own) once each recorder has recorded once."""
    at_ingress, at_batcher, at_compute, at_router = Metrics(), Metrics(), Metrics(), Metrics()
    ingress = IngressMetrics(at_ingress)
    ingress.request("m", "1", "OK", 0.1)
    ingress.request("m", "1", "UNAVAILABLE", 0.1)
    ingress.group.recorder("m")(1, "UNAVAILABLE")
    ingress.denied("rate_limited")
    ingress.shed("m", "", "saturated")
    batcher = BatcherMetrics(at_batcher, "m", "1", lambda: 0)
    batcher.batch(1, 1, 1000)
    ComputeMetrics(at_compute).recorder("m", "1", "cpu")(0.1, 0.05)
    XdsCollector.register(at_router, lambda: "v1", lambda: 0, lambda: 0.0)
    cache = CacheMetrics(at_batcher, "m", "1")
    cache.hit(1000)
    cache.miss(1000)
    failover = batcher.failover
    failover.shed("priority")
    failover.retry("ok")
    failover.replica_up("a", True)
    names = set()
    for metrics in (at_ingress, at_batcher, at_compute, at_router):
        for family in metrics.registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


def expressions(dashboard: dict) -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    return found


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                               # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1",
                  expr)                                                   # label lists
    expr = re.sub(r"\$\{?\w+\}?", "1", expr)                              # variables
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=[{\[)])", expr))
    return names - PROMQL_WORDS


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_input():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["slo"]["current"]["value"] == "0.999"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_covers_latency_budget_throughput_saturation_batching_and_canary():
    exprs = "\n".join(expressions(json.loads(DASHBOARD.read_text())))
    assert "histogram_quantile(0.99, sum by (model, le) (rate(meshserve_request_duration_" in exprs
    assert "(1 - $slo)" in exprs
    for name in ("nv_inference_request_success", "nv_inference_pending_request_count",
                 "meshserve_compute_seconds_sum", "meshserve_batch_size_sum",
                 "nv_inference_request_failure"):
        assert name in exprs
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert any("by version" in t for t in titles)


def test_every_metric_the_dashboard_queries_exists():
    exported = exported_names()
    assert {"meshserve_request_duration_seconds_bucket", "nv_inference_request_success",
            "meshserve_batch_size_count", "nv_inference_pending_request_count"} <= exported
    used = set()
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        used |= metric_names(expr)
    assert used, "no metric names found"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"


def test_the_name_extraction():
    assert metric_names('sum by (model, le) (rate(foo_bucket{model=~"$model"}[5m])) '
                        "/ ignoring(x) bar / baz{} + sum(qux) + $slo") == {
        "foo_bucket", "baz", "qux"}
