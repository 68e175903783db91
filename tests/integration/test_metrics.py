"""Prometheus metrics of every service of `meshserve up`, read over HTTP before and after
a known load: exact deltas."""

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_mesh import mlp_request, public_stub, with_input

N = 30
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(mesh, service: str, timeout: float = 10.0) -> str:
    port_file = mesh.data_dir / "run" / f"{service}.metrics-port"
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        assert time.monotonic() < deadline, f"{service} wrote no metrics port"
        time.sleep(0.05)
    return f"http://127.0.0.1:{int(port_file.read_text())}/metrics"


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= set(have))


def services(mesh) -> list[str]:
    return sorted(p.name.removesuffix(".port")
                  for p in (Path(mesh.data_dir) / "run").glob("*.port"))


def scrape_all(mesh) -> dict[str, Samples]:
    return {name: scrape(metrics_url(mesh, name))
            for name in ("ingress", "router", "batcher-mlp-1", "compute-mlp-1")}


async def test_metrics_count_a_known_load_exactly(mesh):
    before = scrape_all(mesh)
    channel, stub = await public_stub(mesh)
    async with channel:
        answers = await asyncio.gather(*(
            stub.ModelInfer(mlp_request(model_version="1", id=f"m-{i}"), timeout=30)
            for i in range(N)))
        assert {a.model_version for a in answers} == {"1"}
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(with_input(datatype="FP64"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape_all(mesh)

    def delta(service: str, name: str, **labels: str) -> float:
        return total(after[service], name, **labels) - total(before[service], name, **labels)

    mlp1 = {"model": "mlp", "version": "1"}
    assert delta("ingress", "nv_inference_request_success", **mlp1) == N
    assert delta("ingress", "nv_inference_request_failure", model="mlp",
                 reason="INVALID_ARGUMENT") == 2
    assert delta("ingress", "meshserve_request_duration_seconds_count", model="mlp") == N + 2
    assert delta("batcher-mlp-1", "nv_inference_count", **mlp1) == N
    batches = delta("batcher-mlp-1", "nv_inference_exec_count", **mlp1)
    assert 1 <= batches <= N
    assert delta("batcher-mlp-1", "meshserve_batch_size_count", **mlp1) == batches
    assert delta("batcher-mlp-1", "meshserve_batch_size_sum", **mlp1) == N
    assert delta("batcher-mlp-1", "meshserve_queue_seconds_count", **mlp1) == N
    assert delta("batcher-mlp-1", "nv_inference_request_duration_us", **mlp1) > 0
    assert delta("batcher-mlp-1", "nv_inference_compute_infer_duration_us", **mlp1) > 0
    assert total(after["batcher-mlp-1"], "nv_inference_pending_request_count", **mlp1) == 0
    assert delta("compute-mlp-1", "meshserve_compute_seconds_count", **mlp1) == batches
    assert delta("router", "meshserve_group_size_count", hop="router->batcher",
                 model="mlp") >= 1
    assert delta("router", "meshserve_group_size_sum", hop="router->batcher", model="mlp") == N


def test_every_service_serves_metrics_with_its_certificate_expiry(mesh):
    names = services(mesh)
    assert {"ingress", "router", "control-plane", "batcher-mlp-1", "compute-mlp-1"} <= set(names)
    for name in names:
        samples = scrape(metrics_url(mesh, name))
        expiry = [value for (sample, _), value in samples.items()
                  if sample == "meshserve_certificate_expiry_seconds"]
        assert len(expiry) == 1 and expiry[0] > time.time(), name
        exported = {sample for sample, _ in samples}
        # Its own registry: its process and collections, not the global registry's platform
        # collector (python_info).
        assert "python_info" not in exported, f"{name} exports the global registry's collectors"
        assert {"process_cpu_seconds_total", "python_gc_collections_total"} <= exported, name
    control = scrape(metrics_url(mesh, "control-plane"))
    assert [labels for (sample, labels) in control if sample == "meshserve_xds_snapshot_info"]
    assert ("meshserve_xds_nacks_total", ()) in control
    assert control[("meshserve_xds_snapshot_age_seconds", ())] >= 0
