"""Ingress hot path: validation against the model config, and request parameters."""

import pytest

from benchmarks.inputs import infer_request
from meshserve.common.validation import validate
from meshserve.ingress.service import parameter
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest

ROUNDS = 200  # for benchmarks that need a fresh input per round (pedantic mode)


@pytest.mark.benchmark(group="ingress.validate")
def test_validate_mlp_raw(benchmark, mlp_config):
    request = infer_request("mlp")
    benchmark(validate, request, mlp_config)


@pytest.mark.benchmark(group="ingress.validate")
def test_validate_cnn_raw(benchmark, cnn_config):
    request = infer_request("cnn")
    benchmark(validate, request, cnn_config)


def _typed_rounds(benchmark, name, config):
    """Validate a typed-contents request, which rewrites it to raw: a fresh copy per round."""
    typed = infer_request(name, typed=True)

    def fresh():
        request = ModelInferRequest()
        request.CopyFrom(typed)
        return (request, config), {}

    benchmark.pedantic(validate, setup=fresh, rounds=ROUNDS, warmup_rounds=10)
    request, _ = fresh()[0]
    validate(request, config)
    assert len(request.raw_input_contents) == 1
    assert not request.inputs[0].HasField("contents")


@pytest.mark.benchmark(group="ingress.validate")
def test_validate_mlp_typed_to_raw(benchmark, mlp_config):
    _typed_rounds(benchmark, "mlp", mlp_config)


@pytest.mark.benchmark(group="ingress.validate")
def test_validate_cnn_typed_to_raw(benchmark, cnn_config):
    _typed_rounds(benchmark, "cnn", cnn_config)


def _priority_and_timeout(request):
    return parameter(request, "priority"), parameter(request, "timeout")


@pytest.mark.benchmark(group="ingress.parameter")
def test_parameter_priority_and_timeout(benchmark):
    request = infer_request("mlp")
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 250_000
    assert benchmark(_priority_and_timeout, request) == (2, 250_000)


@pytest.mark.benchmark(group="ingress.parameter")
def test_parameter_absent(benchmark):
    request = infer_request("mlp")
    assert benchmark(_priority_and_timeout, request) == (0, 0)
