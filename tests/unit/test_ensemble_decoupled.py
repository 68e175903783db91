"""Ensembles with a decoupled step, run by the ingress's ensemble runner: each answer of the
step runs the steps after it, and each run is an answer of the ensemble (the mesh between
the steps, and a real decoupled model, are the integration test's)."""

import asyncio

import numpy
import pytest

from meshserve.common.errors import DeadlineExceeded, InvalidArgument, Unsupported
from meshserve.common.forwarding import CODE_NUMBER
from meshserve.ingress.ensembles import EnsembleRunner
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.groups_pb2 import ItemResult
from meshserve.tools.client import outputs_of
from tests.unit.test_ensemble_runner import (
    PLUS,
    Requests,
    plus_ensemble,
    plus_request,
    plus_step,
    repository_of,
)

# A decoupled model: IN = n answers n times, OUT = IN + k (k = 0 .. n-1).
COUNT = PLUS.replace('backend: "python"', 'backend: "python"\n'
                     "model_transaction_policy { decoupled: true }")


# How long `plus` takes for an IN: the runs of count's answers 3, 4, 5 end in the reverse
# order; from 7 on, longer than any test waits, but an IN of FAILS fails as soon as count
# has sent every answer.
DELAYS = {3: 0.15, 4: 0.1, 5: 0.05}
FAILS = 8


class Steps:
    """Answers each step as its model would: `count` as above (an IN of -1 answers once, and
    once the ensemble's answer from it is `delivered`, an error), `plus` with OUT = IN + 1
    (+ EXTRA), taking DELAYS and failing for FAILS; `given_up` keeps the IN of each `plus`
    call cancelled while it ran. They wait for each other by events, not by time."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.given_up: list[float] = []
        self.counted = asyncio.Event()  # count has sent every answer
        self.delivered = asyncio.Event()  # set by a test when the ensemble answered

    async def __call__(self, request, remaining, traceparent, partial=None):
        given = {t.name: numpy.frombuffer(raw, numpy.float32).reshape(t.shape)
                 for t, raw in zip(request.inputs, request.raw_input_contents)}
        first = float(given["IN"].flat[0])
        self.seen.append(f"{request.model_name}:{first:g}")
        if request.model_name == "count":
            assert partial is not None
            if first < 0:
                partial(ItemResult(response=answer(request, given["IN"]), more=True))
                await self.delivered.wait()  # the run of that answer has ended
                partial(ItemResult(code=CODE_NUMBER["INVALID_ARGUMENT"], more=True,
                                   message="model 'count' version 1: no negative counts"))
                return pb.ModelInferResponse(model_name="count")
            for k in range(int(first)):
                await asyncio.sleep(0.005)
                partial(ItemResult(response=answer(request, given["IN"] + k), more=True))
            self.counted.set()
            return pb.ModelInferResponse(model_name="count")  # the final flag alone
        try:
            if first == FAILS:
                await self.counted.wait()
                raise InvalidArgument(f"model 'plus' version 1: {FAILS:g} is not allowed")
            await asyncio.sleep(DELAYS.get(first, 10.0 if first >= 7 else 0.0))
        except asyncio.CancelledError:
            self.given_up.append(first)
            raise
        return answer(request, given["IN"] + 1 + given.get("EXTRA", 0))


def answer(request: pb.ModelInferRequest, out: numpy.ndarray) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name)
    response.outputs.add(name="OUT", datatype="FP32", shape=out.shape)
    response.raw_output_contents.append(out.astype(numpy.float32).tobytes())
    return response


@pytest.fixture
def runner(tmp_path):
    configs = {
        "count": COUNT, "plus": PLUS,
        "tokens": plus_ensemble(8, "4", "X", "Y", [plus_step("count", "X", "t"),
                                                    plus_step("plus", "t", "Y")]),
        # `plus` beside `count` runs once; its output reaches every run of the step after.
        "beside": plus_ensemble(8, "4", "X", "Y", [
            plus_step("count", "X", "t"), plus_step("plus", "X", "s"),
            plus_step("plus", "t", "Y", extra="s")]),
        "plain": plus_ensemble(8, "4", "X", "Y", [plus_step("plus", "X", "Y")]),
        # Each answer of the first count runs the second, and each answer of that, plus.
        "twice": plus_ensemble(8, "4", "X", "Y", [
            plus_step("count", "X", "t"), plus_step("count", "t", "u"),
            plus_step("plus", "u", "Y")]),
    }
    steps, counted = Steps(), Requests()
    runner = EnsembleRunner(repository_of(tmp_path, configs), steps, counted.record)
    runner.steps, runner.counted = steps, counted
    return runner


async def streamed(runner, model: str, x: float) -> tuple[list, pb.ModelInferResponse]:
    """The ensemble's answers before its last ([Y's first value, ...]), and its last."""
    heard: list[ItemResult] = []
    request = plus_request(model, numpy.full((1, 4), x))
    request.id = "r-1"
    last = await runner.infer(request, remaining=None, partial=heard.append)
    for result in heard:
        assert (result.response.model_name, result.response.model_version,
                result.response.id) == (model, "1", "r-1")
    return [outputs_of(r.response)["Y"].tolist()[0][0] for r in heard], last


async def test_each_answer_of_the_decoupled_step_runs_the_steps_after_it_in_its_order(runner):
    answers, last = await streamed(runner, "tokens", 3)
    assert answers == [4.0, 5.0, 6.0]  # 3 + k + 1, though the run of k = 2 ended first
    assert (last.model_name, last.model_version, last.id, len(last.outputs)) == (
        "tokens", "1", "r-1", 0)  # the final flag alone
    assert runner.steps.seen == ["count:3", "plus:3", "plus:4", "plus:5"]
    [stats] = runner.statistics("tokens")
    assert (stats.inference_stats.success.count, stats.inference_count) == (1, 1)
    assert runner.counted.seen == [("tokens", "1", "OK")]


async def test_a_decoupled_step_after_another_forks_each_run_again_in_order(runner):
    answers, last = await streamed(runner, "twice", 2)
    # count(2) answers 2, 3; count(2) then answers 2, 3 and count(3) 3, 4, 5; each plus one
    assert answers == [3.0, 4.0, 4.0, 5.0, 6.0]
    assert len(last.outputs) == 0
    assert sorted(runner.steps.seen) == ["count:2", "count:2", "count:3", "plus:2", "plus:3",
                                         "plus:3", "plus:4", "plus:5"]


async def test_a_step_beside_the_decoupled_one_runs_once_and_reaches_every_run(runner):
    answers, _ = await streamed(runner, "beside", 2)
    assert answers == [6.0, 7.0]  # (2 + k + 1) + (2 + 1)
    assert sorted(runner.steps.seen) == ["count:2", "plus:2", "plus:2", "plus:3"]


async def test_a_decoupled_step_that_answers_nothing_leaves_the_final_flag_alone(runner):
    answers, last = await streamed(runner, "tokens", 0)
    assert answers == [] and len(last.outputs) == 0
    assert runner.steps.seen == ["count:0"]


async def test_an_error_answer_fails_the_ensemble_after_what_was_answered(runner):
    heard: list[ItemResult] = []

    def delivered(result: ItemResult) -> None:
        heard.append(result)
        runner.steps.delivered.set()

    with pytest.raises(InvalidArgument) as raised:
        await runner.infer(plus_request("tokens", numpy.full((1, 4), -1.0)), remaining=None,
                           partial=delivered)
    assert raised.value.message == ("ensemble 'tokens' step 1 ('count'): model 'count' "
                                    "version 1: no negative counts")
    assert runner.counted.seen == [("tokens", "1", "INVALID_ARGUMENT")]
    assert [outputs_of(r.response)["Y"].tolist() for r in heard] == [[[0.0] * 4]]


async def test_a_failing_run_fails_the_ensemble_and_gives_the_other_runs_up(runner):
    heard: list[ItemResult] = []
    with pytest.raises(InvalidArgument) as raised:
        # count answers 7, 8, ... 13: the run of 8 fails while the others still run.
        await asyncio.wait_for(runner.infer(plus_request("tokens", numpy.full((1, 4), 7.0)),
                                            remaining=None, partial=heard.append), 5)
    assert raised.value.message == ("ensemble 'tokens' step 2 ('plus'): model 'plus' "
                                    "version 1: 8 is not allowed")
    assert sorted(runner.steps.given_up) == [7.0, 9.0, 10.0, 11.0, 12.0, 13.0]
    assert heard == []
    assert runner.counted.seen == [("tokens", "1", "INVALID_ARGUMENT")]


async def test_a_call_for_one_answer_is_refused_naming_the_stream(runner):
    with pytest.raises(Unsupported) as raised:
        await runner.infer(plus_request("tokens", numpy.full((1, 4), 1.0)), remaining=None)
    assert raised.value.message == (
        "model 'tokens' is decoupled (it may answer a request any number of times): call it "
        "with ModelStreamInfer, which carries each answer")
    assert runner.counted.seen == [("tokens", "1", "UNIMPLEMENTED")]
    assert runner.steps.seen == []


async def test_an_ensemble_without_a_decoupled_step_answers_a_stream_once_with_its_last(runner):
    answers, last = await streamed(runner, "plain", 1)
    assert answers == []
    assert outputs_of(last)["Y"].tolist() == [[2.0] * 4]



class Busy:
    """Answers `plus` (OUT = IN + 1) after `seconds`, and `count` as Steps does, keeping the
    most calls of each model in flight at once."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.in_flight: dict[str, int] = {}
        self.most: dict[str, int] = {}

    async def __call__(self, request, remaining, traceparent, partial=None):
        model = request.model_name
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.most[model] = max(self.most.get(model, 0), self.in_flight[model])
        try:
            given = numpy.frombuffer(request.raw_input_contents[0], numpy.float32).reshape(
                request.inputs[0].shape)
            if model == "count":
                for k in range(int(given.flat[0])):
                    partial(ItemResult(response=answer(request, given + k), more=True))
                return pb.ModelInferResponse(model_name="count")
            await asyncio.sleep(self.seconds)
            return answer(request, given + 1)
        finally:
            self.in_flight[model] -= 1


def held_to(most: int, config: str) -> str:
    return config.replace("ensemble_scheduling { ",
                          f"ensemble_scheduling {{ max_inflight_requests: {most} ")


@pytest.fixture
def held(tmp_path):
    configs = {
        "count": COUNT, "plus": PLUS,
        "chain": held_to(2, plus_ensemble(8, "4", "X", "Y", [plus_step("plus", "X", "Y")])),
        "tokens": held_to(1, plus_ensemble(8, "4", "X", "Y", [
            plus_step("count", "X", "t"), plus_step("plus", "t", "Y")])),
    }
    steps = Busy()
    runner = EnsembleRunner(repository_of(tmp_path, configs), steps)
    runner.steps = steps
    return runner


async def test_max_inflight_requests_bounds_each_steps_requests_across_requests(held):
    answers = await asyncio.gather(*(
        held.infer(plus_request("chain", numpy.full((1, 4), float(n))), remaining=None)
        for n in range(6)))
    assert [outputs_of(a)["Y"].tolist()[0][0] for a in answers] == [1, 2, 3, 4, 5, 6]
    assert held.steps.most == {"plus": 2}


async def test_a_decoupled_steps_runs_are_held_to_the_places_of_the_steps_after_it(held):
    heard: list[ItemResult] = []
    await held.infer(plus_request("tokens", numpy.full((1, 4), 5.0)), remaining=None,
                     partial=heard.append)
    assert [outputs_of(r.response)["Y"].tolist()[0][0] for r in heard] == [6, 7, 8, 9, 10]
    assert held.steps.most == {"count": 1, "plus": 1}


async def test_a_step_that_waits_past_the_deadline_for_a_place_is_refused_so(held):
    held.steps.seconds = 1.0
    slow = [asyncio.create_task(held.infer(plus_request("chain", numpy.zeros((1, 4))),
                                           remaining=None)) for _ in range(2)]
    deadline = asyncio.get_running_loop().time() + 5
    while held.steps.in_flight.get("plus", 0) < 2:  # both places taken
        assert asyncio.get_running_loop().time() < deadline, "the places were not taken"
        await asyncio.sleep(0.005)
    with pytest.raises(DeadlineExceeded) as raised:
        await held.infer(plus_request("chain", numpy.zeros((1, 4))), remaining=0.1)
    assert raised.value.message == (
        "ensemble 'chain' step 1 ('plus'): deadline exceeded waiting for one of the step's 2 "
        "places (ensemble_scheduling max_inflight_requests)")
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
