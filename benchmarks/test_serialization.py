"""The per-hop protobuf cost: every hop parses what it receives and serializes what it sends."""

import pytest

from benchmarks.inputs import infer_request
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

ITEMS = 32


@pytest.mark.benchmark(group="serialization.request")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_serialize_request(benchmark, name):
    request = infer_request(name)
    data = benchmark(request.SerializeToString)
    assert len(data) > request.inputs[0].shape[-1] * 4


@pytest.mark.benchmark(group="serialization.request")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_parse_request(benchmark, name):
    request = infer_request(name)
    assert benchmark(ModelInferRequest.FromString, request.SerializeToString()) == request


def _group():
    return InferGroup(model_name="mlp", items=[
        GroupItem(request=infer_request("mlp", seed=n), request_id=f"ab12cd34-{n}",
                  timeout_us=250_000) for n in range(ITEMS)])


@pytest.mark.benchmark(group="serialization.group")
def test_serialize_group_mlp_32(benchmark):
    group = _group()
    assert benchmark(group.SerializeToString)


@pytest.mark.benchmark(group="serialization.group")
def test_parse_group_mlp_32(benchmark):
    group = _group()
    assert len(benchmark(InferGroup.FromString, group.SerializeToString()).items) == ITEMS
