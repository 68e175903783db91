"""The metrics module: one registry per instance, Triton's names, bounded labelled children."""

import asyncio
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshserve.common.metrics import (
    LATENCY_BUCKETS,
    PROTOCOL,
    SIZE_BUCKETS,
    BatcherMetrics,
    ComputeMetrics,
    GroupMetrics,
    IngressMetrics,
    LoopHistogram,
    Metrics,
    XdsCollector,
    serve_metrics,
    split_address,
)
from meshserve.tools.certs import init_certs


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


MLP1 = (("model", "mlp"), ("version", "1"))
MLP1_GRPC = (("model", "mlp"), ("protocol", "grpc"), ("version", "1"))


def test_each_instance_has_its_own_registry():
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    assert REGISTRY not in (first.registry, second.registry)
    a, b = IngressMetrics(first), IngressMetrics(second)  # same names, no clash
    a.request("mlp", "1", "OK", 0.01)
    a.request("mlp", "1", "OK", 0.02)
    b.request("mlp", "1", "NOT_FOUND", 0.01)
    assert samples(first)[("nv_inference_request_success", MLP1_GRPC)] == 2
    assert ("nv_inference_request_success", MLP1_GRPC) not in samples(second)
    reason = tuple(sorted((*MLP1_GRPC, ("reason", "NOT_FOUND"))))
    failure = ("nv_inference_request_failure", reason)
    assert samples(second)[failure] == 1
    assert failure not in samples(first)
    assert samples(first)[("meshserve_request_duration_seconds_count",
                           (("model", "mlp"), ("protocol", "grpc")))] == 2


async def test_ingress_requests_are_labelled_with_their_protocol():
    metrics = Metrics()
    ingress = IngressMetrics(metrics)

    async def over_http() -> None:
        PROTOCOL.set("http")  # in this task only, as the HTTP front door does
        ingress.request("mlp", "1", "OK", 0.01)

    await asyncio.create_task(over_http())
    ingress.request("mlp", "1", "OK", 0.01)
    got = samples(metrics)
    for protocol in ("grpc", "http"):
        labels = tuple(sorted((*MLP1, ("protocol", protocol))))
        assert got[("nv_inference_request_success", labels)] == 1


def test_triton_counters_keep_triton_names():
    metrics = Metrics()
    queued = [1, 2]
    batcher = BatcherMetrics(metrics, "mlp", "1", pending=lambda: len(queued))
    batcher.batch(rows=5, requests=2, infer_ns=3_000)
    batcher.request(True, total_ns=10_000, queue_ns=4_000)
    batcher.request(False, total_ns=10_000, queue_ns=None)
    got = samples(metrics)
    assert got[("nv_inference_count", MLP1)] == 5
    assert got[("nv_inference_exec_count", MLP1)] == 1
    assert got[("nv_inference_compute_infer_duration_us", MLP1)] == 6  # per request, like Triton
    assert got[("nv_inference_request_duration_us", MLP1)] == 10
    assert got[("nv_inference_queue_duration_us", MLP1)] == 4
    assert got[("nv_inference_pending_request_count", MLP1)] == 2
    assert got[("meshserve_batch_size_sum", MLP1)] == 5
    assert got[("meshserve_queue_seconds_count", MLP1)] == 1
    assert not any(name.startswith("nv_") and name.endswith("_total") for name, _ in got)


def test_group_and_compute_recorders():
    metrics = Metrics()
    record = GroupMetrics(metrics, "router->batcher").recorder("mlp")
    record(3, "OK")
    record(2, "UNAVAILABLE")
    record_batch = ComputeMetrics(metrics).recorder("mlp", "1", "cpu")
    record_batch(0.002, 0.0015)
    record_batch(0.004, 0.0025)
    XdsCollector.register(metrics, lambda: "v7", lambda: 1, lambda: 12.5)
    got = samples(metrics)
    hop = (("hop", "router->batcher"), ("model", "mlp"))
    assert got[("meshserve_group_size_count", hop)] == 2
    assert got[("meshserve_group_size_sum", hop)] == 5
    failed = tuple(sorted((*hop, ("code", "UNAVAILABLE"))))
    assert got[("meshserve_group_call_failures_total", failed)] == 1
    assert got[("meshserve_compute_seconds_count", (("device", "cpu"), *MLP1))] == 2
    assert got[("meshserve_compute_model_cpu_seconds_total", (("device", "cpu"), *MLP1))] == 0.004
    assert got[("meshserve_xds_snapshot_info", (("version", "v7"),))] == 1
    assert got[("meshserve_xds_nacks_total", ())] == 1
    assert got[("meshserve_xds_snapshot_age_seconds", ())] == 12.5


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, SIZE_BUCKETS, (0.1, 1.0)])
def test_a_loop_histogram_reads_as_prometheus_clients_histogram(buckets):
    """The same observations, the same exposition (prometheus_client's `_created` aside):
    values on a bound, between bounds, past the last and below the first."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "doc", ["model"], buckets=buckets, registry=theirs)
    loop = LoopHistogram("h", "doc", ["model"], buckets, ours)
    values = [*buckets[:-1], 0.0, 0.0003, 0.012, 0.7, 3.5, 20, 700, 1e6, -1.0]
    for index, value in enumerate(values):
        model = ("mlp", "cnn")[index % 2]
        reference.labels(model).observe(value)
        loop.labels(model).observe(value)
    expected = [line for line in generate_latest(theirs).decode().splitlines()
                if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == expected
    with pytest.raises(ValueError, match="takes labels"):
        loop.labels("mlp", "1")


def test_certificate_expiry_names_the_identity(tmp_path):
    init_certs(tmp_path)
    metrics = Metrics()
    metrics.certificate_expiry(tmp_path / "router.crt")
    [(labels, value)] = [(labels, value) for (name, labels), value in samples(metrics).items()
                         if name == "meshserve_certificate_expiry_seconds"]
    assert labels == (("identity", "router"),)
    assert value > time.time()


def test_serve_metrics_on_a_free_port():
    metrics = Metrics()
    IngressMetrics(metrics).request("mlp", "1", "OK", 0.01)
    server = serve_metrics(metrics.registry, "127.0.0.1:0")
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as reply:
            text = reply.read().decode()
        assert 'nv_inference_request_success{model="mlp",protocol="grpc",version="1"} 1.0' in text
    finally:
        server.close()


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)), ("[::1]:0", ("::1", 0)),
    ("0.0.0.0:8002", ("0.0.0.0", 8002))])
def test_split_address(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["9090", "host:", ":9090", "host:port"])
def test_split_address_refuses_what_is_not_host_port(address):
    with pytest.raises(ValueError):
        split_address(address)
