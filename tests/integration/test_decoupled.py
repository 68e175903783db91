"""Decoupled Python models (`model_transaction_policy { decoupled: true }`) through the whole
mesh (`meshserve up --model-repository`), written against the documented
`triton_python_backend_utils` API as models for Triton would be, and called with the stock
tritonclient's stream: each answer reaches the client as the model sends it, from `execute`
or from the model's own threads after it returned, any number of them per request."""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy
import pytest

from tests.integration.conftest import https_to, meshserve, running_mesh
from tests.python_models import write_python_model

SCENARIOS = Path(__file__).with_name("decoupled_scenarios.py")

# Answers a request whose IN is n with n answers OUT = 10 n + k (k = 0 .. n-1), each from a
# thread of its own after execute returned, then the final flag alone.
REPEAT_PY = '''\
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        if not pb_utils.using_decoupled_model_transaction_policy(
                json.loads(args["model_config"])):
            raise pb_utils.TritonModelException("repeat answers through a response sender")

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            threading.Thread(target=self.answer, args=(request.get_response_sender(), n),
                             daemon=True).start()
        return None

    def answer(self, sender, n):
        for k in range(n):
            time.sleep(0.01)
            out = pb_utils.Tensor("OUT", np.array([[10 * n + k]], np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

# Answers IN = n twice from execute itself, OUT = 2 n and then 2 n + 1, the second with the
# final flag; each answer carries its step as a response parameter.
INLINE_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            sender = request.get_response_sender()
            for step in (0, 1):
                out = pb_utils.Tensor("OUT", np.array([[2 * n + step]], np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out],
                                                       parameters={"step": step}),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if step else 0)
        return None
'''

# A negative IN is answered with an error and the final flag; 99 makes execute raise.
FAILING_PY = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            if n == 99:
                raise ValueError("99 is refused")
            request.get_response_sender().send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "IN must not be negative", pb_utils.TritonError.INVALID_ARG)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Answers OUT = k every 10 ms, k = 0, 1, ..., until its request is cancelled (at most 3,000
# answers), then counts how the request ended: ticker_ends{how="cancelled" or "finished"}.
TICKER_PY = '''\
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        family = pb_utils.MetricFamily("ticker_ends", "How ticker's requests ended",
                                       pb_utils.MetricFamily.COUNTER)
        self.ends = {how: family.Metric(labels={"how": how}) for how in ("cancelled", "finished")}

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            k = 0
            while not sender.is_cancelled() and k < 3000:
                out = pb_utils.Tensor("OUT", np.array([[k]], np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                k += 1
                time.sleep(0.01)
            self.ends["cancelled" if request.is_cancelled() else "finished"].increment(1)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Not decoupled: answers OUT = IN once every request of its batch is cancelled (at most 30 s),
# counting how its batches ended: sleeper_ends{how="cancelled" or "finished"}.
SLEEPER_PY = '''\
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        family = pb_utils.MetricFamily("sleeper_ends", "How sleeper's batches ended",
                                       pb_utils.MetricFamily.COUNTER)
        self.ends = {how: family.Metric(labels={"how": how}) for how in ("cancelled", "finished")}

    def execute(self, requests):
        give_up = time.monotonic() + 30
        while not all(r.is_cancelled() for r in requests) and time.monotonic() < give_up:
            time.sleep(0.01)
        self.ends["cancelled" if requests[0].is_cancelled() else "finished"].increment(1)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()]) for r in requests]
'''
SLEEPER_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
'''

# The same, counting async_sleeper_ends{how="started"} as each batch starts too.
ASYNC_SLEEPER_PY = SLEEPER_PY.replace('"sleeper_ends"', '"async_sleeper_ends"').replace(
    '("cancelled", "finished")', '("cancelled", "finished", "started")').replace(
    "        give_up =", '        self.ends["started"].increment(1)\n        give_up =')

# Not decoupled: answers each text_input upper-cased, for HTTP's generate.
SHOUT_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            shouted = np.array([[t.decode().upper()] for t in texts.reshape(-1)], dtype=object)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("text_output", shouted)]))
        return responses
'''
SHOUT_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
'''

# Not decoupled: calls `repeat` with IN (exec(decoupled=True), or awaited async_exec) and
# answers the sum of its OUTs, how many responses had outputs and how many were empty.
COLLECT_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            call = pb_utils.InferenceRequest(model_name="repeat", requested_output_names=["OUT"],
                                             inputs=[pb_utils.Tensor("IN", n)])
            answers = (call.exec(decoupled=True) if int(n.reshape(-1)[0]) % 2 else
                       await call.async_exec(decoupled=True))
            total = full = empty = 0
            for answer in answers:
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                if answer.output_tensors():
                    full += 1
                    total += int(pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy().sum())
                else:
                    empty += 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "OUT", np.array([[total, full, empty]], np.int32))]))
        return responses
'''
COLLECT_CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 3 ] } ]
'''

# Not decoupled: OUT = IN + 1, the step after a decoupled one in the ensembles below.
PLUS_ONE_PY = '''\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() + 1)])
            for r in requests]
'''


def plus_one_after(model: str) -> str:
    """An ensemble of `model` (decoupled) and plus_one: each of its answers, plus one."""
    return f'''\
platform: "ensemble"
max_batch_size: 4
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
ensemble_scheduling {{ step [
  {{ model_name: "{model}" model_version: -1 input_map {{ key: "IN" value: "IN" }}
    output_map {{ key: "OUT" value: "answer" }} }},
  {{ model_name: "plus_one" model_version: -1 input_map {{ key: "IN" value: "answer" }}
    output_map {{ key: "OUT" value: "OUT" }} }} ] }}
'''


CONFIG = '''\
backend: "python"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
model_transaction_policy { decoupled: true }
dynamic_batching { }
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoupled")
    models = root / "models"
    for name, source in (("repeat", REPEAT_PY), ("inline", INLINE_PY),
                         ("failing", FAILING_PY), ("ticker", TICKER_PY)):
        write_python_model(models, name, source, CONFIG)
    write_python_model(models, "shout", SHOUT_PY, SHOUT_CONFIG)
    write_python_model(models, "collect", COLLECT_PY, COLLECT_CONFIG)
    write_python_model(models, "collect_counting", COLLECT_PY.replace(
        'model_name="repeat"', 'model_name="counting"'), COLLECT_CONFIG)
    write_python_model(models, "sleeper", SLEEPER_PY, SLEEPER_CONFIG)
    # A ticker of its own behind an ensemble, so that each ticker's count of cancelled
    # requests is its own tests'.
    write_python_model(models, "relay_ticker", TICKER_PY.replace('"ticker_ends"',
                                                                 '"relay_ticker_ends"'), CONFIG)
    write_python_model(models, "plus_one", PLUS_ONE_PY, SLEEPER_CONFIG)
    write_python_model(models, "async_sleeper", ASYNC_SLEEPER_PY, SLEEPER_CONFIG)
    for name, step in (("counting", "repeat"), ("ticking", "relay_ticker")):
        (models / name / "1").mkdir(parents=True)
        (models / name / "config.pbtxt").write_text(plus_one_after(step))
    (models / "counting_held" / "1").mkdir(parents=True)  # one request in flight a step
    (models / "counting_held" / "config.pbtxt").write_text(plus_one_after("repeat").replace(
        "ensemble_scheduling { step", "ensemble_scheduling { max_inflight_requests: 1 step"))
    with running_mesh(root / "data", extra_args=(f"--model-repository={models}",)) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def report(served) -> dict:
    done = subprocess.run([sys.executable, str(SCENARIOS), served.endpoint,
                           str(served.data_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def by_request(answers: list) -> dict:
    """Each request's answers in the order they came: [OUT, final flag]."""
    found: dict = {}
    for request_id, out, final, error in answers:
        assert error is None, error
        found.setdefault(request_id, []).append([out, final])
    return found


def test_each_answer_comes_as_the_model_sends_it_from_its_own_threads(report):
    # IN 3, 1, 0 and 2: 3 + 1 + 0 + 2 answers, in order for each request, none final (the
    # final flag came alone and no request asked for an empty final answer), nothing more.
    assert by_request(report["repeat"]) == {
        "r0": [[[30], False], [[31], False], [[32], False]],
        "r1": [[[10], False]],
        "r3": [[[20], False], [[21], False]],
    }


def test_the_final_flag_alone_is_sent_when_the_request_asks(report):
    assert by_request(report["repeat_empty_final"]) == {
        "r0": [[[20], False], [[21], False], [None, True]],
        "r1": [[None, True]],
    }


def test_answers_sent_from_execute_with_the_final_flag_on_the_last(report):
    assert by_request(report["inline"]) == {"r0": [[[10], False], [[11], True]]}


def test_an_error_answer_and_a_raising_execute_reach_the_stream(report):
    [[request_id, _, _, error]] = report["error_answer"]
    assert error == ("INVALID_ARGUMENT: model 'failing' version 1: IN must not be negative"
                     ), error
    [[_, _, _, raised]] = report["execute_raised"]
    assert raised == ("INTERNAL: model 'failing' version 1: execute raised ValueError: 99 is "
                      "refused"), raised


def test_each_request_is_counted_once(report):
    # repeat: 4 + 2 requests; inline: 1, however many answers each had
    assert report["successes"] == {"repeat": 6, "inline": 1}


def ends(served, model: str) -> dict[str, float]:
    """The `<model>_ends` counters its compute serves with its own metrics, by how."""
    port = int((served.data_dir / "run" / f"compute-{model}-1.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(f"{model}_ends")}


def ended(served, model: str, cancelled: float) -> dict[str, float]:
    """`ends` once the model counted `cancelled` cancelled requests (polled for at most
    20 s)."""
    deadline = time.monotonic() + 20
    while (found := ends(served, model)).get("cancelled", 0) < cancelled and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    return found


def test_a_request_cancelled_by_its_client_is_cancelled_in_the_model(report, served):
    # The client read three answers of a request that would answer 3,000 times (30 s), then
    # cancelled its stream: the cancellation crosses every hop to the model's request.
    assert report["cancelled"] == [[0], [1], [2]]
    assert ended(served, "ticker", 1) == {"cancelled": 1.0, "finished": 0.0}


def test_an_event_stream_its_client_closes_is_cancelled_in_the_model(report, served):
    # HTTP's generate_stream: the client reads three events and closes the connection.
    before = ended(served, "ticker", 1)["cancelled"]  # the stream the report cancelled
    with https_to(served) as connection:
        connection.request("POST", "/v2/models/ticker/generate_stream", json.dumps({"IN": 1}),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200
        events = [answer.readline() for _ in range(6)]  # "data: {...}" and a blank line
    assert [json.loads(e.removeprefix(b"data: "))["OUT"] for e in events[::2]] == [0, 1, 2]
    assert ended(served, "ticker", before + 1) == {"cancelled": before + 1, "finished": 0.0}


def test_a_request_past_its_deadline_is_cancelled_in_a_model_that_is_not_decoupled(served,
                                                                                   tmp_path):
    x = tmp_path / "in.npy"
    numpy.save(x, numpy.array([[7]], numpy.int32))
    done = meshserve("infer", "sleeper", f"--input={x}", "--timeout=1",
                     f"--target={served.endpoint}", f"--data-dir={served.data_dir}")
    assert done.returncode == 1 and "DEADLINE_EXCEEDED" in done.stdout, done.stdout + done.stderr
    assert ended(served, "sleeper", 1) == {"cancelled": 1.0, "finished": 0.0}


def test_a_call_for_one_answer_is_refused_naming_the_stream(report, served):
    status, message = report["unary"]
    assert status == "StatusCode.UNIMPLEMENTED"
    assert message == ("model 'repeat' is decoupled (it may answer a request any number of "
                       "times): call it with ModelStreamInfer, which carries each answer")
    status, _, body = post(served, "/v2/models/repeat/infer", {"inputs": [
        {"name": "IN", "shape": [1, 1], "datatype": "INT32", "data": [1]}]})
    assert (status, json.loads(body)) == (400, {"error": message})


def post(served, path: str, document: dict, certificate: bool = True) -> tuple[int, str, bytes]:
    """POST `document` over HTTPS (with the client certificate): status, content type, body."""
    with https_to(served, certificate) as connection:
        connection.request("POST", path, json.dumps(document),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.getheader("content-type"), answer.read()


def test_generate_answers_a_text_model_with_one_json_object(served):
    status, kind, body = post(served, "/v2/models/shout/generate",
                              {"id": "g1", "text_input": "hello"})
    assert (status, kind) == (200, "application/json"), body
    assert json.loads(body) == {"id": "g1", "model_name": "shout", "model_version": "1",
                                "text_output": "HELLO"}


def test_generate_stream_sends_each_answer_as_an_event_as_it_comes(served):
    status, kind, body = post(served, "/v2/models/repeat/generate_stream", {"IN": 2})
    assert (status, kind) == (200, "text/event-stream; charset=utf-8"), body
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    assert [json.loads(e.removeprefix("data: ")) for e in events[:-1]] == [
        {"model_name": "repeat", "model_version": "1", "OUT": 20},
        {"model_name": "repeat", "model_version": "1", "OUT": 21}]


@pytest.mark.parametrize("model", ["shout", "nosuch"])
def test_generate_refuses_a_caller_without_credentials_before_it_looks_up_the_model(served,
                                                                                  model):
    status, _, _ = post(served, f"/v2/models/{model}/generate", {"text_input": "a"},
                        certificate=False)
    assert status == 401  # the same for a model the repository lacks: nothing learnt of it


def test_generate_refuses_a_model_that_answers_more_than_once(served):
    status, _, body = post(served, "/v2/models/inline/generate", {"IN": 1})
    assert (status, json.loads(body)) == (500, {"error": (
        "generate expects model 'inline' to answer once; it answered 2 times: "
        "generate_stream carries each answer")})


def test_generate_stream_failing_at_once_is_an_error_status(served):
    status, kind, body = post(served, "/v2/models/failing/generate_stream", {"IN": -1})
    assert (status, kind, json.loads(body)) == (400, "application/json", {
        "error": "model 'failing' version 1: IN must not be negative"})


@pytest.mark.parametrize("n", [3, 2])  # odd: exec(decoupled=True); even: async_exec
def test_a_model_iterates_over_a_decoupled_models_answers(served, n):
    status, _, body = post(served, "/v2/models/collect/generate", {"IN": n})
    assert status == 200, body
    # repeat answers 10 n + k for k < n, then its final flag alone: an empty last response
    assert json.loads(body)["OUT"] == [sum(10 * n + k for k in range(n)), n, 1]


@pytest.mark.parametrize("n", [3, 2])
def test_a_model_iterates_over_the_answers_of_an_ensemble_with_a_decoupled_step(served, n):
    status, _, body = post(served, "/v2/models/collect_counting/generate", {"IN": n})
    assert status == 200, body
    # counting answers 10 n + k + 1 for k < n (repeat's answers through plus_one), then its
    # final flag alone
    assert json.loads(body)["OUT"] == [sum(10 * n + k + 1 for k in range(n)), n, 1]


def test_the_cli_prints_each_answer_as_it_comes(served, tmp_path):
    x = tmp_path / "in.npy"
    numpy.save(x, numpy.array([[2]], numpy.int32))
    done = meshserve("infer", "repeat", "--stream", f"--input={x}", f"--target={served.endpoint}",
                     f"--data-dir={served.data_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" answered in ")[0] for line in lines[::3]] == [
        "model repeat version 1", "model repeat version 1"]
    assert lines[1::3] == ["OUT int32 [1, 1]"] * 2 and lines[2::3] == ["[[20]]", "[[21]]"]
    numpy.save(x, numpy.array([[-1]], numpy.int32))
    done = meshserve("infer", "failing", "--stream", f"--input={x}",
                     f"--target={served.endpoint}", f"--data-dir={served.data_dir}")
    assert done.returncode == 1
    assert done.stdout.split(": ", 1)[1].strip() == (
        "INVALID_ARGUMENT: model 'failing' version 1: IN must not be negative"), done.stdout


def first_answers(served) -> tuple[float, float]:
    """The count and sum (ms) of the ingress's first-answer histogram for `repeat`."""
    port = int((served.data_dir / "run" / "ingress.metrics-port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "nv_inference_first_response_histogram_ms_count{model=\"shout\"" not in text
    found = {}
    for line in text.splitlines():
        for what in ("count", "sum"):
            if line.startswith(f"nv_inference_first_response_histogram_ms_{what}"
                               '{model="repeat",version="1"}'):
                found[what] = float(line.rsplit(" ", 1)[1])
    return found.get("count", 0.0), found.get("sum", 0.0)


def test_the_first_answers_time_is_measured(served, tmp_path):
    x = tmp_path / "in.npy"
    numpy.save(x, numpy.array([[2]], numpy.int32))
    count, total = first_answers(served)
    started = time.monotonic()
    done = meshserve("infer", "repeat", "--stream", f"--input={x}", f"--target={served.endpoint}",
                     f"--data-dir={served.data_dir}")
    took_ms = (time.monotonic() - started) * 1e3
    assert done.returncode == 0, done.stdout + done.stderr
    after, after_total = first_answers(served)
    assert after == count + 1
    # the first of two answers 10 ms apart: at least 10 ms, within the whole call
    assert 10 <= after_total - total < took_ms


def test_an_ensemble_with_a_decoupled_step_answers_once_for_each_of_its_answers(report):
    # IN 3, 0 and 2: repeat answers 30, 31, 32 and 20, 21, each through plus_one as it comes,
    # in order; the final flag after the last run came alone (sent when asked for).
    assert by_request(report["ensemble"]) == {
        "r0": [[[31], False], [[32], False], [[33], False]],
        "r2": [[[21], False], [[22], False]],
    }
    assert by_request(report["ensemble_empty_final"]) == {
        "r0": [[[11], False], [None, True]],
    }
    # the same through an ensemble whose steps have one place each: two requests at once
    # take turns at each step, and every answer comes, in order
    assert by_request(report["ensemble_held"]) == {
        "r0": [[[31], False], [[32], False], [[33], False]],
        "r1": [[[21], False], [[22], False]],
    }
    assert report["ensemble_config_decoupled"] is True
    assert report["ensemble_successes"] == 4
    status, message = report["ensemble_unary"]
    assert status == "StatusCode.UNIMPLEMENTED"
    assert message == ("model 'counting' is decoupled (it may answer a request any number "
                       "of times): call it with ModelStreamInfer, which carries each answer")


def test_generate_stream_carries_each_answer_of_an_ensemble_with_a_decoupled_step(served):
    status, _, body = post(served, "/v2/models/counting/generate_stream", {"IN": 2})
    assert status == 200, body
    assert [json.loads(e.removeprefix("data: ")) for e in body.decode().split("\n\n")[:-1]] == [
        {"model_name": "counting", "model_version": "1", "OUT": 21},
        {"model_name": "counting", "model_version": "1", "OUT": 22}]


def test_a_stream_cancelled_while_an_ensemble_runs_cancels_its_decoupled_step(report, served):
    assert report["ensemble_cancelled"] == [[1], [2], [3]]
    assert ended(served, "relay_ticker", 1) == {"cancelled": 1.0, "finished": 0.0}


def test_an_asynchronous_request_cancelled_while_it_runs_is_cancelled_in_the_model(served):
    status, _, body = post(served, "/v2/models/async_sleeper/infer/async", {"inputs": [
        {"name": "IN", "shape": [1, 1], "datatype": "INT32", "data": [5]}]})
    assert status == 202, body
    submitted = json.loads(body)["id"]
    deadline = time.monotonic() + 20
    while ends(served, "async_sleeper").get("started", 0) < 1:  # the model runs it
        assert time.monotonic() < deadline, "the asynchronous request did not start"
        time.sleep(0.05)
    status, _, body = post(served, f"/v2/async/{submitted}/cancel", {})
    assert (status, json.loads(body)) == (200, {"id": submitted, "state": "CANCELLED"})
    assert ended(served, "async_sleeper", 1) == {"cancelled": 1.0, "finished": 0.0,
                                                 "started": 1.0}
