"""The stock tritonclient against `meshserve up`: metadata, config, index, correct outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).with_name("triton_scenarios.py")


@pytest.fixture(scope="module")
def report(mesh) -> dict:
    done = subprocess.run([sys.executable, str(SCENARIOS), mesh.endpoint, str(mesh.data_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_server_live_and_ready(report):
    assert report["live"] is True
    assert report["ready"] is True
    assert report["unknown_ready"] == [False, False]  # as Triton answers: not ready, no error


@pytest.mark.parametrize("name, dims", [("mlp", [-1, 256]), ("cnn", [-1, 3, 64, 64])])
def test_model_metadata(report, name, dims):
    meta = report["metadata"][name]
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [["INPUT__0", "FP32", dims]]
    assert meta["outputs"] == [["OUTPUT__0", "FP32", [-1, 10]]]


@pytest.mark.parametrize("name, dims", [("mlp", [256]), ("cnn", [3, 64, 64])])
def test_model_config(report, name, dims):
    assert report["config"][name] == {"name": name, "max_batch_size": 32,
                                      "inputs": ["INPUT__0"], "dims": [dims],
                                      "has_dynamic_batching": True}


def test_repository_index(report):
    demo = [entry for entry in report["index"] if entry[0] in ("cnn", "mlp")]
    assert demo == [[m, v, "READY"] for m in ("cnn", "mlp") for v in ("1", "2")]


@pytest.mark.parametrize("target", ["mlp@1", "mlp@2", "cnn@1", "cnn@2"])
def test_outputs_equal_a_local_forward_pass(report, target):
    assert report["diffs"][target] <= 1e-5
    assert report["served_version"][target] == target.split("@")[1]


def test_class_count_answers_the_top_classes_of_a_local_forward_pass(report):
    classes = report["classes"]
    assert classes["shape"] == [3, 3]
    assert classes["indexes"] == classes["expected"]
    assert classes["value_diff"] <= 1e-5


def test_200_concurrent_requests_are_correct_and_batched(report):
    concurrent = report["concurrent"]
    assert concurrent["answered"] == 200
    assert concurrent["correct"] == 200, concurrent["max_diff"]
    before, after = report["stats_before"], report["stats_after"]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 200
    assert after["success"] - before["success"] == 200
    assert 0 < executions < inferences  # requests shared batches


def test_each_streamed_answer_says_it_is_final(report):
    """A client that reads a stream until an answer is final (`triton_final_response`, as
    Triton marks each request's last answer) gets one answer per request, not a hang."""
    stream = report["stream"]
    assert stream["final"] == {"s0": True, "s1": True, "s2": True}
    assert stream["more"] == 0
    assert stream["max_diff"] <= 1e-5
