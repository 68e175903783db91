"""Compute's tensor conversion: raw request bytes to tensors, tensors to response bytes, and
the whole decode → predict → encode contract of the demo mlp (TorchScript, CPU)."""

import pytest
import torch

from benchmarks.inputs import demo_model_config, infer_request
from meshserve.compute.model import TorchScriptModel

ROWS = 32
THREADS = 1  # compute's default (`--threads 1`): batches run on one intra-op thread

# torch.frombuffer warns once that the request's bytes are read-only (compute does the same).
pytestmark = pytest.mark.filterwarnings("ignore:.*buffer is not writable")


@pytest.fixture(scope="module")
def mlp_model(demo_repository):
    """Version 1 of the demo mlp, loaded and warmed up as compute does it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = TorchScriptModel(demo_repository / "mlp" / "1" / "model.pt",
                                 demo_model_config("mlp"), torch.device("cpu"))
        for request in model.warmup_requests():
            model.run(request, "1")
        yield model
    finally:
        torch.set_num_threads(threads)


@pytest.mark.benchmark(group="compute.convert")
def test_decode_mlp_32(benchmark, mlp_model):
    [tensor] = benchmark(mlp_model.decode, infer_request("mlp", rows=ROWS))
    assert tensor.shape == (ROWS, 256)


@pytest.mark.benchmark(group="compute.convert")
def test_encode_mlp_32(benchmark, mlp_model):
    request = infer_request("mlp", rows=ROWS)
    outputs = mlp_model.predict(mlp_model.decode(request))
    response = benchmark(mlp_model.encode, outputs, request, "1")
    assert list(response.outputs[0].shape) == [ROWS, 10]
    assert len(response.raw_output_contents[0]) == ROWS * 10 * 4


@pytest.mark.benchmark(group="compute.run")
@pytest.mark.parametrize("rows", [1, ROWS])
def test_run_mlp(benchmark, mlp_model, rows):
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    response, _ = benchmark(mlp_model.run, infer_request("mlp", rows=rows), "1")
    assert list(response.outputs[0].shape) == [rows, 10]
