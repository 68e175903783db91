"""`meshserve up --model-repository PATH` serving TorchScript, ONNX, Python and ensemble
models side by side, with broken models refused at load while the rest serve."""

import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy
import onnxruntime
import pytest
import torch

from meshserve.common.datatypes import serialize_bytes
from meshserve.common.repository import ModelRepository
from meshserve.common.tls import channel_credentials
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.backends.python import config_json, import_model
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.client import client_tls, outputs_of
from meshserve.tools.demo_repository import write_demo_repository
from tests.integration.conftest import running_mesh
from tests.integration.test_mesh import public_stub
from tests.integration.test_traffic import set_weights
from tests.onnx_models import row_scalar_model
from tests.polling import until_sync
from tests.python_models import (
    ADD_SUB_CONFIG,
    ADD_SUB_PY,
    ECHO_CONFIG,
    ECHO_PY,
    GREET,
    RAISES_IN_INITIALIZE_PY,
    echo_request,
    write_python_model,
)

SCENARIOS = Path(__file__).with_name("backend_scenarios.py")

LOST = """
platform: "ensemble"
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ { model_name: "ghost"
  input_map { key: "IN" value: "X" } output_map { key: "OUT" value: "Y" } } ] }
"""


class OneOutput(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x + 1


TWO_OUTPUTS = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


class Words(torch.nn.Module):
    """A TorchScript model as Triton's PyTorch backend serves it: List[str] in and out,
    inputs named as forward's arguments (config.pbtxt lists them in the other order), results
    picked by `OUTPUT__<index>` (the last not declared), and INFERENCE_MODE off."""

    def forward(self, words: list[str], scale: torch.Tensor):
        lengths = torch.tensor([float(len(w)) for w in words]) * scale
        inference = torch.tensor([scale.clone().is_inference()])
        return [w.upper() for w in words], lengths, inference, scale * 0


WORDS = """
platform: "pytorch_libtorch"
input [ { name: "scale" data_type: TYPE_FP32 dims: [ 1 ] },
        { name: "words" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ -1 ] },
         { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "OUTPUT__2" data_type: TYPE_BOOL dims: [ 1 ] } ]
parameters { key: "INFERENCE_MODE" value: { string_value: "false" } }
"""


# An ensemble of one step: the echo model, which says what it saw of its request.
ECHOED = """
platform: "ensemble"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "ECHO" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling { step [ { model_name: "echo" model_version: -1
  input_map { key: "X" value: "X" }
  output_map { key: "Y" value: "Y" } output_map { key: "ECHO" value: "ECHO" } } ] }
"""

# A directory name a URI would read otherwise: the router's xDS target escapes it.
ODD_NAME = "add sub%20#2"


def write_repository(models: Path) -> None:
    """The demo (less the TorchScript mlp), a Triton-style Python model and an ensemble of
    it, an ONNX model whose config names its platform alone, and broken models: three
    refused when the repository loads, three by their computes, and a directory `0` that is
    no version."""
    write_demo_repository(models)
    for path in sorted((models / "mlp").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (models / "mlp").rmdir()
    write_python_model(models, "add_sub", ADD_SUB_PY, ADD_SUB_CONFIG)
    write_python_model(models, ODD_NAME, ADD_SUB_PY, ADD_SUB_CONFIG)
    write_python_model(models, "echo", ECHO_PY, ECHO_CONFIG)
    (models / "greet" / "1").mkdir(parents=True)
    (models / "greet" / "config.pbtxt").write_text(GREET)
    (models / "echoed" / "1").mkdir(parents=True)
    (models / "echoed" / "config.pbtxt").write_text(ECHOED)
    write_python_model(models, "broken_init", RAISES_IN_INITIALIZE_PY, ADD_SUB_CONFIG)
    (models / "square_onnx" / "1").mkdir(parents=True)
    (models / "square_onnx" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (models / "square_onnx" / "1" / "model.onnx").write_bytes(row_scalar_model())
    (models / "broken_onnx" / "1").mkdir(parents=True)
    (models / "broken_onnx" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (models / "broken_onnx" / "1" / "model.onnx").write_bytes(b"\x0a\x03not onnx at all")
    (models / "lost_ensemble" / "1").mkdir(parents=True)
    (models / "lost_ensemble" / "config.pbtxt").write_text(LOST)
    (models / "add_sub" / "0").mkdir()  # not a version: neither loaded nor signed
    (models / "add_sub" / "0" / "model.py").write_text(ADD_SUB_PY)
    (models / "no_file" / "1").mkdir(parents=True)  # a version without its model.pt
    (models / "no_file" / "config.pbtxt").write_text(TWO_OUTPUTS)
    (models / "short" / "1").mkdir(parents=True)  # one output of the two declared
    (models / "short" / "config.pbtxt").write_text(TWO_OUTPUTS)
    torch.jit.save(torch.jit.script(OneOutput()), str(models / "short" / "1" / "model.pt"))
    (models / "words" / "1").mkdir(parents=True)
    (models / "words" / "config.pbtxt").write_text(WORDS)
    torch.jit.save(torch.jit.script(Words()), str(models / "words" / "1" / "model.pt"))
    (models / "too_preferred" / "1").mkdir(parents=True)
    (models / "too_preferred" / "config.pbtxt").write_text(
        TWO_OUTPUTS + "dynamic_batching { preferred_batch_size: [ 2, 8 ] }\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    models = root / "repository"
    write_repository(models)
    with running_mesh(root / "data", extra_args=(f"--model-repository={models}",)) as mesh:
        mesh.models = models
        yield mesh


def index_says_why(mesh, name: str) -> bool:
    """Whether the repository index gives a reason for `name`'s version 1 (its compute's
    refusal reaches the ingress through its batcher and the control plane, soon after
    `up` has reported it)."""
    with grpc.secure_channel(mesh.endpoint,
                             channel_credentials(client_tls(mesh.data_dir))) as channel:
        reply = GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(),
                                                                  timeout=10)
    return any(m.name == name and m.version == "1" and m.reason for m in reply.models)


@pytest.fixture(scope="module")
def triton_report(served) -> dict:
    until_sync(lambda: index_says_why(served, "broken_init"), 30,
               "the compute's refusal of broken_init in the index", interval=0.2)
    done = subprocess.run([sys.executable, str(SCENARIOS), served.endpoint,
                           str(served.data_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def up_log(mesh) -> str:
    return (mesh.data_dir.parent / f"{mesh.data_dir.name}-up.log").read_text()


# ------------------------------------------------------------------ what clients see


def test_tritonclient_sees_every_model_in_the_index(triton_report, served):
    index = {(name, version): (state, reason) for name, version, state, reason
             in triton_report["index"]}
    for model in ("add_sub", ODD_NAME, "classify", "greet", "mlp_onnx", "preprocess",
                  "postprocess"):
        assert index[(model, "1")] == ("READY", ""), model
    assert index[("cnn", "1")] == index[("cnn", "2")] == ("READY", "")
    state, reason = index[("broken_init", "1")]  # its compute refused it, saying why
    assert state == "UNAVAILABLE"
    assert reason.startswith(
        f"refusing model 'broken_init' version 1: "
        f"{served.models / 'broken_init' / '1' / 'model.py'}: initialize raised "
        "TritonModelException: the weights file weights.bin is missing")
    onnx_state, onnx_reason = index[("broken_onnx", "")]
    assert onnx_state == "UNAVAILABLE"
    assert onnx_reason.startswith(f"model 'broken_onnx' version 1: "
                                  f"{served.models / 'broken_onnx' / '1' / 'model.onnx'}: "
                                  "not an ONNX model")
    assert index[("lost_ensemble", "")] == ("UNAVAILABLE", (
        f"model 'lost_ensemble': {served.models / 'lost_ensemble' / 'config.pbtxt'}: step 1 "
        "('ghost'): model 'ghost' is not in the repository"))


def test_tritonclient_sees_metadata_and_completed_configs(triton_report):
    meta, config = triton_report["metadata"], triton_report["config"]
    assert meta["mlp_onnx"] == {"platform": "onnxruntime_onnx", "versions": ["1"],
                                "inputs": [["INPUT__0", "FP32", [-1, 256]]],
                                "outputs": [["OUTPUT__0", "FP32", [-1, 10]]]}
    # config.pbtxt declares no tensors: ModelConfig shows them, read from the graph.
    assert config["mlp_onnx"]["input"] == [{"name": "INPUT__0", "data_type": "TYPE_FP32",
                                            "dims": ["256"]}]
    assert config["mlp_onnx"]["default_model_filename"] == "model.onnx"
    assert config["add_sub"]["backend"] == "python"
    assert meta["classify"]["platform"] == "ensemble"
    assert meta["classify"]["inputs"] == [["IMAGE", "UINT8", [-1, 64, 64, 3]]]
    assert meta["classify"]["outputs"] == [["LABELS", "BYTES", [-1, 3]],
                                           ["SCORES", "FP32", [-1, 3]]]
    steps = config["classify"]["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocess", "cnn", "postprocess"]
    assert steps[1]["input_map"] == {"INPUT__0": "pixels"}
    assert triton_report["classify"]["scores_shape"] == [2, 3]
    assert triton_report["classify"]["version"] == "1"


def test_a_graph_of_one_scalar_a_row_is_served_as_triton_serves_it(triton_report, served):
    """X [batch] -> Y = X * X, config.pbtxt naming its platform alone: completed as Triton
    completes it (dims [ 1 ] reshape { shape: [ ] }, max_batch_size 4, the dynamic batcher),
    and every answer a tritonclient gets, the first and those after it, is onnxruntime's."""
    config = triton_report["config"]["square_onnx"]
    assert (config["max_batch_size"], config["dynamic_batching"]) == (4, {})
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": ["1"],
                                "reshape": {}}]
    assert triton_report["metadata"]["square_onnx"]["inputs"] == [["X", "FP32", [-1, 1]]]
    session = onnxruntime.InferenceSession(
        str(served.models / "square_onnx" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"])
    for rows, answer in zip(([[1.5], [-2.0]], [[3.0]], [[0.5], [4.0], [-1.0]]),
                            triton_report["square_onnx"]):
        [expected] = session.run(None, {"X": numpy.array(rows, numpy.float32).reshape(-1)})
        assert answer == [[len(rows), 1], expected.reshape(-1, 1).tolist()]


def test_a_torchscript_model_triton_serves_is_served_as_torch_runs_it(triton_report, served):
    """What the tritonclient got from `words` is the file's own answer, run with torch as
    Triton's backend runs it: arguments by name, results by index, no inference mode."""
    module = torch.jit.load(str(served.models / "words" / "1" / "model.pt")).eval()
    words = ["tensor", "ünï", ""]
    with torch.no_grad():
        upper, lengths, inference, _ = module(words, torch.tensor([0.5]))
    assert triton_report["words"] == {"OUTPUT__0": [w.encode().decode("latin-1") for w in upper],
                                      "OUTPUT__1": lengths.tolist(),
                                      "OUTPUT__2": inference.tolist()}
    assert inference.tolist() == [False]


# ------------------------------------------------------------------ answers


def infer_request(model: str, **tensors) -> pb.ModelInferRequest:
    datatypes = {numpy.dtype(numpy.float32): "FP32", numpy.dtype(numpy.uint8): "UINT8"}
    request = pb.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        if array.dtype == object:
            request.inputs.add(name=name, datatype="BYTES", shape=array.shape)
            request.raw_input_contents.append(serialize_bytes(array.reshape(-1).tolist()))
        else:
            request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
    return request


async def infer(mesh, request: pb.ModelInferRequest) -> dict[str, numpy.ndarray]:
    channel, stub = await public_stub(mesh)
    async with channel:
        return outputs_of(await stub.ModelInfer(request, timeout=30))


async def test_onnx_answers_equal_onnxruntime_run_directly(served):
    x = numpy.random.default_rng(1).standard_normal((3, 256)).astype(numpy.float32)
    got = await infer(served, infer_request("mlp_onnx", INPUT__0=x))
    session = onnxruntime.InferenceSession(
        str(served.models / "mlp_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    [expected] = session.run(["OUTPUT__0"], {"INPUT__0": x})
    assert numpy.allclose(got["OUTPUT__0"], expected, atol=1e-6)


def in_process(models: Path, name: str):
    """A Python model of the repository, loaded and initialized in this process."""
    entry = ModelRepository.load(models).get(name)
    source = (entry.path / "1" / "model.py").read_text()
    model = import_model(source, entry.path / "1" / "model.py").TritonPythonModel()
    if hasattr(model, "initialize"):
        model.initialize({"model_config": config_json(entry.config), "model_version": "1"})
    return model


def execute(model, **arrays) -> dict[str, numpy.ndarray]:
    [response] = model.execute([pb_utils.InferenceRequest(
        inputs=[pb_utils.Tensor(name, array) for name, array in arrays.items()])])
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


@pytest.mark.parametrize("model", ["add_sub", ODD_NAME])
async def test_an_unmodified_triton_python_model_serves_through_the_mesh(served, model):
    a = numpy.arange(8, dtype=numpy.float32).reshape(2, 4)
    names = numpy.array([[b"ada"], [b"grace"]], dtype=object)
    got = await infer(served, infer_request(model, A=a, B=a, NAME=names))
    expected = execute(in_process(served.models, model), A=a, B=a, NAME=names)
    assert got["SUM"].tobytes() == expected["SUM"].tobytes()
    assert got["GREETING"].tolist() == expected["GREETING"].tolist() == [[b"hello ada"],
                                                                        [b"hello grace"]]


def classify_by_hand(models: Path, images: numpy.ndarray, cnn_version: str):
    """preprocess -> cnn -> postprocess, each run here: the Python models in process, cnn
    with torch from its TorchScript file."""
    pixels = execute(in_process(models, "preprocess"), IMAGE=images)["PIXELS"]
    cnn = torch.jit.load(str(models / "cnn" / cnn_version / "model.pt")).eval()
    with torch.inference_mode():
        logits = cnn(torch.from_numpy(pixels)).numpy()
    return execute(in_process(models, "postprocess"), LOGITS=logits)


async def statistics(stub, model: str, version: str = "") -> tuple[int, int]:
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version),
                                       timeout=10)
    return reply.model_stats[0].inference_count, reply.model_stats[0].execution_count


async def test_an_ensemble_answers_what_its_steps_by_hand_do_and_batches_each_step(served):
    images = numpy.random.default_rng(2).integers(0, 256, (32, 1, 64, 64, 3), numpy.uint8)
    steps = (("preprocess", "1"), ("cnn", "1"), ("postprocess", "1"), ("classify", "1"))
    channel, stub = await public_stub(served)
    async with channel:
        before = {s: await statistics(stub, *s) for s in steps}
        answers = await asyncio.gather(*(
            stub.ModelInfer(infer_request("classify", IMAGE=image), timeout=60)
            for image in images))
        after = {s: await statistics(stub, *s) for s in steps}
    expected = classify_by_hand(served.models, images[:, 0], "1")
    for i, answer in enumerate(answers):
        assert answer.model_name == "classify" and answer.model_version == "1"
        got = outputs_of(answer)
        assert got["LABELS"].tolist() == [expected["LABELS"][i].tolist()]
        assert numpy.allclose(got["SCORES"], expected["SCORES"][i], atol=1e-5)
    for step in steps:
        rows = after[step][0] - before[step][0]
        batches = after[step][1] - before[step][1]
        assert rows == 32, step
        if step[0] != "classify":
            assert batches < 32, (step, batches)  # requests shared batches at this step


async def test_an_error_names_the_failing_step_and_fails_only_its_request(served):
    big = numpy.full((1, 4), 5000, numpy.float32)
    negative = -numpy.ones((1, 4), numpy.float32)
    name = numpy.array([[b"x"]], dtype=object)
    channel, stub = await public_stub(served)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request("greet", A=big, B=big, NAME=name), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert raised.value.details() == (
            "ensemble 'greet' step 1 ('add_sub' version 1): model 'add_sub' version 1: "
            "execute raised ValueError: A is too large")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request("greet", A=negative, B=big, NAME=name),
                                  timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "step 1 ('add_sub' version 1)" in raised.value.details()
        assert "A must not be negative" in raised.value.details()
        ok = await stub.ModelInfer(infer_request("greet", A=-negative, B=-negative, NAME=name),
                                   timeout=30)
        assert outputs_of(ok)["SUM"].tolist() == [[2.0] * 4]
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="greet"),
                                            timeout=10)).model_stats[0]
        assert stats.inference_stats.fail.count >= 2 and stats.inference_stats.success.count >= 1


def echo_rows(rid: str, rows: int, outputs=(), **parameters) -> pb.ModelInferRequest:
    """A request of the echo model: X holds `rows` rows of its id's character code."""
    return echo_request(rid, numpy.full((rows, 2), ord(rid)), outputs, **parameters)


async def batched_together(mesh, requests: list[pb.ModelInferRequest]):
    """The requests sent at once (4 rows: one full batch of the echo model, which otherwise
    waits 20 s for more), their answers or errors, and the echo model's inferences and
    executions meanwhile."""
    channel, stub = await public_stub(mesh)
    async with channel:
        before = await statistics(stub, "echo")
        answers = await asyncio.gather(*(stub.ModelInfer(r, timeout=30) for r in requests),
                                       return_exceptions=True)
        after = await statistics(stub, "echo")
    return answers, (after[0] - before[0], after[1] - before[1])


def echoed(answer: pb.ModelInferResponse) -> list[dict]:
    return [json.loads(row[0]) for row in outputs_of(answer)["ECHO"].tolist()]


async def test_each_request_of_a_python_batch_sees_its_own_parameters_and_id(served):
    requests = [echo_rows("a", 1, tag="first", timeout=30_000_000),
                echo_rows("b", 2, outputs=["ECHO"], scale=0.5),
                echo_rows("c", 1, flag=True)]
    answers, (inferences, executions) = await batched_together(served, requests)
    assert (inferences, executions) == (4, 1)  # one batch, one execute call
    assert [a.id for a in answers] == ["a", "b", "c"]
    a, b, c = (echoed(answer) for answer in answers)
    assert len({e["call"] for e in a + b + c}) == 1
    assert a == [{"id": "a", "parameters": {"tag": "first", "timeout": 30_000_000},
                  "requested": ["Y", "ECHO"], "rows": 1, "timeout": 30_000_000, "requests": 3,
                  "call": a[0]["call"]}]
    assert b == [{"id": "b", "parameters": {"scale": 0.5}, "requested": ["ECHO"], "rows": 2,
                  "timeout": 0, "requests": 3, "call": a[0]["call"]}] * 2
    assert c[0]["parameters"] == {"flag": True} and c[0]["id"] == "c"
    assert outputs_of(answers[0])["Y"].tolist() == [[2 * ord("a")] * 2]
    assert [o.name for o in answers[1].outputs] == ["ECHO"]
    assert outputs_of(answers[2])["Y"].tolist() == [[2 * ord("c")] * 2]


async def test_an_ensembles_request_id_and_parameters_reach_its_python_step(served):
    """As Triton sets them on each step's request: the client's own parameters too, not only
    priority and timeout (the step saw {"timeout": 30000000} alone)."""
    request = echo_rows("e", 4, tag="pipeline", lowercase=True, timeout=30_000_000)
    request.model_name = "echoed"
    [answer], (inferences, executions) = await batched_together(served, [request])
    assert (answer.model_name, answer.id, inferences, executions) == ("echoed", "e", 4, 1)
    assert [(e["id"], e["parameters"], e["timeout"]) for e in echoed(answer)] == [
        ("e", {"tag": "pipeline", "lowercase": True, "timeout": 30_000_000}, 30_000_000)] * 4


async def test_a_triton_error_for_one_request_of_a_batch_fails_only_that_request(served):
    requests = [echo_rows("a", 1), echo_rows("b", 2, fail=True), echo_rows("c", 1)]
    answers, (inferences, executions) = await batched_together(served, requests)
    assert (inferences, executions) == (4, 1)
    failed = answers[1]
    assert isinstance(failed, grpc.aio.AioRpcError), failed
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.details() == "model 'echo' version 1: request b asked to fail"
    for answer, rid in ((answers[0], "a"), (answers[2], "c")):
        assert isinstance(answer, pb.ModelInferResponse), answer
        assert answer.id == rid
        assert outputs_of(answer)["Y"].tolist() == [[2 * ord(rid)] * 2]
        assert [(e["id"], e["requests"]) for e in echoed(answer)] == [(rid, 3)]


async def test_a_triton_error_unavailable_for_a_request_alone_is_its_answer_not_the_replicas(
        served):
    """A request alone in its batch answered TritonError(UNAVAILABLE) by the model gets that
    answer, once: it ran once, and the compute replica is not taken for unavailable (the
    batcher sent it again and answered "compute replica ... unavailable", counting it against
    the replica, which two in a row took out of rotation)."""
    for _ in range(2):
        [failed], (inferences, executions) = await batched_together(
            served, [echo_rows("u", 4, fail="UNAVAILABLE")])
        assert isinstance(failed, grpc.aio.AioRpcError), failed
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.details() == "model 'echo' version 1: request u asked to fail"
        assert (inferences, executions) == (4, 1)
    [answer], _ = await batched_together(served, [echo_rows("v", 4)])
    assert outputs_of(answer)["Y"].tolist() == [[2 * ord("v")] * 2] * 4


async def test_refused_models_say_why_while_the_rest_serve(served):
    log = up_log(served)
    assert "REFUSED compute-broken_init-1: refusing model 'broken_init' version 1: " \
           f"{served.models / 'broken_init' / '1' / 'model.py'}: initialize raised " \
           "TritonModelException: the weights file weights.bin is missing" in log
    assert "REFUSED model 'broken_onnx' version 1: " in log
    assert "REFUSED model 'lost_ensemble': " in log
    assert "REFUSED compute-no_file-1: refusing model 'no_file' version 1: no model file " \
           f"{served.models / 'no_file' / '1' / 'model.pt'}" in log
    assert "REFUSED compute-short-1: refusing model 'short' version 1: " \
           f"{served.models / 'short' / '1' / 'model.pt'}: warm-up failed: model 'short' " \
           "version 1: the model returned 1 outputs; config.pbtxt declares 2" in log
    assert "REFUSED model 'too_preferred': " \
           f"{served.models / 'too_preferred' / 'config.pbtxt'}: dynamic_batching " \
           "preferred_batch_size 8 must be between 1 and max_batch_size 4" in log
    assert not (served.models / "add_sub" / "0" / "manifest.json").exists()
    assert "compute-classify" not in log and "batcher-classify" not in log
    # The hint names the first model, whose name a shell would otherwise split and cut.
    [hint] = [line for line in log.splitlines() if line.startswith("  meshserve infer ")]
    assert shlex.split(hint, comments=True)[:3] == ["meshserve", "infer", ODD_NAME]
    channel, stub = await public_stub(served)
    async with channel:
        x = numpy.zeros((1, 4), numpy.float32)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request("lost_ensemble", X=x), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'lost_ensemble' is not served: refused at load: " in raised.value.details()
        name = numpy.array([[b"x"]], dtype=object)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request("broken_init", A=x, B=x, NAME=name), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_traffic_policy_applies_to_an_ensembles_steps(served):
    images = numpy.random.default_rng(4).integers(0, 256, (1, 64, 64, 3), numpy.uint8)
    by_version = {v: classify_by_hand(served.models, images, v)["SCORES"] for v in ("1", "2")}
    assert not numpy.allclose(by_version["1"], by_version["2"])
    await set_weights(served, "cnn", {"1": 0, "2": 100})
    try:
        deadline = time.monotonic() + 30
        while True:
            got = (await infer(served, infer_request("classify", IMAGE=images)))["SCORES"]
            if numpy.allclose(got, by_version["2"], atol=1e-5) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert numpy.allclose(got, by_version["2"], atol=1e-5)
    finally:
        await set_weights(served, "cnn", {"1": 100, "2": 0})
