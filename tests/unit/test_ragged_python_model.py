"""A Python model whose answers differ in shape from request to request (an object
detector's boxes), batched as Triton's dynamic batcher batches it: each request of a batch
gets its own answer, equal to the model's answer to that request alone."""


from meshserve.common.repository import ModelRepository
from meshserve.compute.backends import load_model
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools.client import outputs_of
from tests.python_models import write_python_model
from tests.ragged_models import BOXES_PY, boxes_config, count_request
from tests.unit.test_python_backend import through_batch


def boxes_model(tmp_path, config: str):
    write_python_model(tmp_path, "boxes", BOXES_PY, config)
    entry = ModelRepository.load(tmp_path).get("boxes")
    version_dir = entry.path / "1"
    return load_model(entry.config, version_dir / "model.py", version_dir, "auto", 1)


def alone(model, request: pb.ModelInferRequest) -> dict:
    """The model's answer to `request` on its own (CALL, which names the call's requests,
    left out)."""
    response, _ = model.run(request, "1")
    return shapes_and_values(response)


def shapes_and_values(response: pb.ModelInferResponse) -> dict:
    return {name: (list(array.shape), array.tolist())
            for name, array in outputs_of(response).items() if name != "CALL"}


def test_each_request_of_a_batch_gets_its_own_shape_as_alone(tmp_path):
    model = boxes_model(tmp_path, boxes_config())
    requests = [count_request("a", 3), count_request("b", 1, 2), count_request("c", 5),
                count_request("d", 0, outputs=["LABELS"])]
    results = through_batch(model, requests)
    assert [(r.code, r.message) for r in results] == [(0, "")] * 4
    for request, result in zip(requests, results):
        assert shapes_and_values(result.response) == alone(model, request)
    assert [list(o.shape) for o in results[1].response.outputs] == [[2, 2, 4], [2, 2], [2, 1]]
    assert outputs_of(results[0].response)["CALL"].tolist() == [[b'["a", "b", "c", "d"]']]
    assert [list(o.shape) for o in results[3].response.outputs] == [[1, 0]]


def test_a_reshaped_output_gives_each_request_its_dims(tmp_path):
    """BOXES declared [-1] to the client, made [-1, 4] by the model (`reshape`)."""
    model = boxes_model(tmp_path, boxes_config("dims: [ -1 ] reshape: { shape: [ -1, 4 ] }"))
    results = through_batch(model, [count_request("a", 2), count_request("b", 3, 1)])
    assert [list(r.response.outputs[0].shape) for r in results] == [[1, 8], [2, 12]]
    assert outputs_of(results[1].response)["BOXES"][1].tolist() == [
        100.0 * 1 + v for v in range(12, 24)]
