"""`meshserve top --once --json` against a running mesh: its counts agree with the services'
own /metrics, and it shows the demo traffic policy."""

import asyncio
import json

import grpc
import pytest

from tests.integration.conftest import meshserve
from tests.integration.test_mesh import mlp_request, public_stub, with_input
from tests.integration.test_metrics import metrics_url, scrape, total

N = 20


async def test_top_reports_counts_rates_and_weights(mesh):
    ingress, batcher = metrics_url(mesh, "ingress"), metrics_url(mesh, "batcher-mlp-2")
    before = scrape(ingress)
    channel, stub = await public_stub(mesh)
    async with channel:
        answers = await asyncio.gather(*(
            stub.ModelInfer(mlp_request(model_version="2", id=f"top-{i}"), timeout=30)
            for i in range(N)))
    assert {a.model_version for a in answers} == {"2"}
    after, batched = scrape(ingress), scrape(batcher)
    mlp2 = {"model": "mlp", "version": "2"}
    assert (total(after, "nv_inference_request_success", **mlp2)
            - total(before, "nv_inference_request_success", **mlp2)) == N

    done = await asyncio.to_thread(meshserve, "top", "--once", "--json", "--interval", "0.5",
                                   f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["scrape_errors"] == {}
    assert document["control_plane_error"] is None
    assert document["weights"]["mlp"] == {"1": 90, "2": 10}
    v2 = document["models"]["mlp"]["versions"]["2"]
    # Nothing else sends to mlp version 2 meanwhile: the cumulative counts are exact.
    assert v2["success_total"] == total(after, "nv_inference_request_success", **mlp2)
    assert v2["requests_total"] == (v2["success_total"]
                                    + total(after, "nv_inference_request_failure", **mlp2))
    assert v2["failures_total"] == {
        dict(labels)["reason"]: value for (name, labels), value in after.items()
        if name == "nv_inference_request_failure" and set(mlp2.items()) <= set(labels)}
    assert v2["rows_total"] == total(batched, "nv_inference_count", **mlp2) >= N
    assert v2["batches_total"] == total(batched, "nv_inference_exec_count", **mlp2) >= 1
    assert v2["weight"] == 10
    for entry in document["models"]["mlp"]["versions"].values():
        assert entry["requests_per_second"] >= 0
        assert entry["queue_depth"] >= 0
        assert entry["compute_utilisation"] >= 0
    assert document["models"]["mlp"]["canary"] is None


async def test_top_counts_failures_of_requests_that_named_no_version(mesh):
    """An unpinned request refused at the ingress has no version: top shows it for its model,
    as the ingress's metrics count it."""
    channel, stub = await public_stub(mesh)
    async with channel:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(with_input(datatype="FP64"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    done = await asyncio.to_thread(meshserve, "top", "--once", "--json", "--interval", "0.5",
                                   f"--data-dir={mesh.data_dir}")
    assert done.returncode == 0, done.stderr
    counted = scrape(metrics_url(mesh, "ingress"))
    mlp = json.loads(done.stdout)["models"]["mlp"]
    invalid = total(counted, "nv_inference_request_failure", model="mlp",
                    reason="INVALID_ARGUMENT")
    assert invalid >= 3
    assert mlp["failures_total"]["INVALID_ARGUMENT"] == invalid
    assert mlp["requests_total"] == (total(counted, "nv_inference_request_success", model="mlp")
                                     + total(counted, "nv_inference_request_failure",
                                             model="mlp"))
