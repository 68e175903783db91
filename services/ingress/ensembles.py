"""Ensembles, run by the ingress: one client request becomes each step's request in turn.

Each step is an ordinary request for a model version served by the mesh (validated, routed
by the router under its model's traffic policy, batched by its batcher, run by its compute),
made through the ingress's own `infer`; intermediate tensors stay inside the mesh and only
the ensemble's outputs go back to the client. Steps of one wave of the plan (see
`meshserve.common.ensemble_plan`) run at once; as in Triton, a step whose outputs none of
the requested ones needs does not run, each step's request carries the ensemble request's
id and parameters, and a tensor that is not there (an optional ensemble input the request
leaves out) is left out of the steps that read it. An error names the failing step. The
ensemble itself is counted here (ModelStatistics) and told to `record` (the ingress's
request metrics and access log); each step is counted by its own batcher as usual.

An ensemble with a decoupled step (a model that answers a request any number of times, a
token stream say) is decoupled itself, and called on a stream: each answer of that step runs
the steps after it on its own, and each run that reaches the end is an answer of the
ensemble, passed on as it comes; the last answer is the final flag alone, once every run
has ended. An error answer, or a failing step in any run, fails the ensemble request (what
was answered before stays answered) and gives up its other runs.

With `ensemble_scheduling { max_inflight_requests: N }`, as in Triton, each step has N
places: at most N of its requests are in flight at once across all the ensemble's requests,
and a step waits for a place (within the request's deadline) before it is sent. A decoupled
step holds its place until its last answer; the runs its answers start wait for places of
their own, so the steps after it are held to N however fast it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from meshserve.common.ensemble_plan import Plan, Step, carried_shape
from meshserve.common.errors import (
    DeadlineExceeded,
    ServingError,
    called_for_one_answer,
    from_code,
)
from meshserve.common.forwarding import CODE_NAME, left_code
from meshserve.common.repository import ModelEntry, ModelRepository
from meshserve.common.statistics import Statistics
from meshserve.common.validation import validate
from meshserve.ingress import classification
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.groups_pb2 import ItemResult

# Told of each answer before the last: a decoupled model's (or ensemble's).
Partial = Callable[[ItemResult], None]
# The ingress's infer: (request, seconds left or None, client traceparent, partial=None or
# told of a decoupled model's answers before its last) -> response (the last answer).
InferStep = Callable[..., Awaitable[pb.ModelInferResponse]]
# Whether a model version is ready: (model, version or "") -> bool.
ReadyCheck = Callable[[str, str], Awaitable[bool]]


class _Tensor:
    """`batched`: made with a batch dimension (by a model with max_batch_size > 0)."""

    __slots__ = ("datatype", "shape", "raw", "batched")

    def __init__(self, datatype: str, shape, raw: bytes, batched: bool) -> None:
        self.datatype = datatype
        self.shape = list(shape)
        self.raw = raw
        self.batched = batched


# Given the tensors of a run of the plan that has ended.
End = Callable[[dict[str, _Tensor]], Awaitable[None]]

# Told of each answered ensemble request: (model, version, gRPC status name, when it arrived
# by the runner's clock).
Record = Callable[[str, str, str, float], None]


class EnsembleRunner:
    """`record`, when given, hears of each answered ensemble request."""

    def __init__(self, repository: ModelRepository, infer_step: InferStep,
                 record: Record | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._repository = repository
        self._entries: dict[str, ModelEntry] = repository.ensembles()
        self._infer = infer_step
        self._recorded = record
        self._clock = clock
        self._statistics = {(name, version): Statistics(name=name, version=version)
                            for name, entry in self._entries.items()
                            for version in entry.versions}
        # Each step's places when its ensemble sets max_inflight_requests (by ensemble and
        # step number): step requests in flight at once, across the ensemble's requests.
        self._places = {(name, step.number): asyncio.Semaphore(most)
                        for name, entry in self._entries.items()
                        if (most := entry.config.ensemble_scheduling.max_inflight_requests)
                        for step in entry.plan.steps}

    def __contains__(self, model: object) -> bool:
        return model in self._entries

    async def infer(self, request: pb.ModelInferRequest, remaining: float | None,
                    traceparent: str = "", admit: Callable[[], None] | None = None,
                    partial: Partial | None = None) -> pb.ModelInferResponse:
        """`partial` hears of a decoupled ensemble's answers before its last (the one
        returned); without it, a request for a decoupled ensemble is refused."""
        name = request.model_name
        arrived = self._clock()
        try:
            version = self._repository.version(name, request.model_version)
        except ServingError as error:  # counted, as a request to any model's unknown version
            self._count(name, "", arrived, error.code)
            raise
        statistics = self._statistics[(name, version)]
        deadline = None if remaining is None else arrived + remaining
        try:
            if admit is not None:
                admit()
            entry = self._entries[name]
            if entry.config.model_transaction_policy.decoupled and partial is None:
                raise called_for_one_answer(name)
            validate(request, entry.config)
            response = await self._run(entry, version, request, deadline, traceparent, partial)
        except Exception as error:
            self._record(statistics, name, version, arrived, error)
            raise
        except asyncio.CancelledError:  # the caller left: its deadline passed, or it cancelled
            self._count(name, version, arrived, left_code(deadline, self._clock()))
            raise
        statistics.inference_count += _rows(request, entry.config.max_batch_size)
        statistics.execution_count += 1
        statistics.last_inference_ms = time.time_ns() // 1_000_000
        self._record(statistics, name, version, arrived, None)
        return response

    def _record(self, statistics: Statistics, name: str, version: str, arrived: float,
                error: Exception | None) -> None:
        statistics.record_request(error is None, int((self._clock() - arrived) * 1e9), None)
        self._count(name, version, arrived, "OK" if error is None else (
            error.code if isinstance(error, ServingError) else "INTERNAL"))

    def _count(self, name: str, version: str, arrived: float, code: str) -> None:
        if self._recorded is not None:
            self._recorded(name, version, code, arrived)

    async def _run(self, entry: ModelEntry, version: str, request: pb.ModelInferRequest,
                   deadline: float | None, traceparent: str,
                   partial: Partial | None) -> pb.ModelInferResponse:
        """The ensemble's last answer; on a stream, every answer of a decoupled ensemble's
        runs goes to `partial` as it comes, and the last is the final flag alone."""
        plan: Plan = entry.plan
        tensors = {t.name: _Tensor(t.datatype, t.shape, raw, plan.batching)
                   for t, raw in zip(request.inputs, request.raw_input_contents)}
        wanted = {o.name for o in request.outputs}
        classes = classification.requested(request, entry) if wanted else None

        def answer(tensors: dict[str, _Tensor]) -> pb.ModelInferResponse:
            response = _response(entry, version, request, tensors, wanted)
            if classes:
                classification.classify(response, classes, entry)
            return response

        waves = plan.waves_for(wanted)
        if not any(step.decoupled for wave in waves for step in wave):  # one run, one answer
            ended: list[dict[str, _Tensor]] = []

            async def keep(tensors: dict[str, _Tensor]) -> None:
                ended.append(tensors)

            await self._flow(entry.name, waves, request, tensors, deadline, traceparent, keep)
            return answer(ended[0])

        async def send(tensors: dict[str, _Tensor]) -> None:
            partial(ItemResult(response=answer(tensors)))

        await self._flow(entry.name, waves, request, tensors, deadline, traceparent, send)
        return pb.ModelInferResponse(model_name=entry.name, model_version=version,
                                     id=request.id)

    async def _flow(self, ensemble: str, waves: tuple[tuple[Step, ...], ...],
                    request: pb.ModelInferRequest, tensors: dict[str, _Tensor],
                    deadline: float | None, traceparent: str, end: End) -> None:
        """Runs `waves` in turn on `tensors`, then gives them to `end`; at a wave with a
        decoupled step, each of that step's answers runs the waves after it on its own."""
        for index, wave in enumerate(waves):
            fork = next((step for step in wave if step.decoupled), None)
            if fork is not None:
                await self._fork(ensemble, fork, wave, waves[index + 1:], request, tensors,
                                 deadline, traceparent, end)
                return
            answers = await asyncio.gather(*(
                self._step(ensemble, step, request, tensors, deadline, traceparent)
                for step in wave))
            for step, answer in zip(wave, answers):
                _take(step, answer, tensors)
        await end(tensors)

    async def _fork(self, ensemble: str, fork: Step, wave: tuple[Step, ...],
                    after: tuple[tuple[Step, ...], ...], request: pb.ModelInferRequest,
                    tensors: dict[str, _Tensor], deadline: float | None, traceparent: str,
                    end: End) -> None:
        """`wave` with its decoupled step `fork`: each answer of `fork` (with the outputs of
        the wave's other steps, once they are in) runs the waves `after` on a copy of its
        own, at once; what the runs give `end` comes in the order of `fork`'s answers. Returns
        once every run has ended; the first failure gives the others up."""
        others = tuple(step for step in wave if step is not fork)
        turn = asyncio.get_running_loop().create_future()
        turn.set_result(None)  # the first run's turn to end

        async def besides() -> list[pb.ModelInferResponse]:
            return await asyncio.gather(*(
                self._step(ensemble, step, request, tensors, deadline, traceparent)
                for step in others))

        async def run(result: ItemResult, before: asyncio.Future,
                      done: asyncio.Future) -> None:
            try:
                if result.code:
                    raise _named(ensemble, fork, from_code(
                        CODE_NAME.get(result.code, "UNKNOWN"), result.message))
                branch = dict(tensors)
                for step, answer in zip(others, await beside):
                    _take(step, answer, branch)
                _take(fork, result.response, branch)

                async def in_turn(ended: dict[str, _Tensor]) -> None:
                    await before
                    await end(ended)

                await self._flow(ensemble, after, request, branch, deadline, traceparent,
                                 in_turn)
            finally:
                done.set_result(None)

        try:
            async with asyncio.TaskGroup() as runs:
                beside = runs.create_task(besides())

                def heard(result: ItemResult) -> None:
                    nonlocal turn
                    before, turn = turn, asyncio.get_running_loop().create_future()
                    started = run(result, before, turn)
                    try:
                        runs.create_task(started)
                    except RuntimeError:  # a run failed: the group is giving the rest up
                        started.close()

                last = await self._step(ensemble, fork, request, tensors, deadline,
                                        traceparent, heard)
                if last.outputs:  # not the final flag alone
                    heard(ItemResult(response=last))
        except BaseExceptionGroup as failed:
            raise _first(failed) from None

    async def _step(self, ensemble: str, step: Step, request: pb.ModelInferRequest,
                    tensors: dict[str, _Tensor], deadline: float | None, traceparent: str,
                    partial: Partial | None = None) -> pb.ModelInferResponse:
        step_request = pb.ModelInferRequest(model_name=step.model, model_version=step.version,
                                            id=request.id)
        for key, value in request.parameters.items():
            step_request.parameters[key].CopyFrom(value)
        for (name, tensor_name), dims in zip(step.inputs, step.input_dims):
            tensor = tensors.get(tensor_name)
            if tensor is None:  # an optional input the request left out
                continue
            shape = carried_shape(tensor.shape, dims, step.batching, tensor.batched)
            step_request.inputs.add(name=name, datatype=tensor.datatype, shape=shape)
            step_request.raw_input_contents.append(tensor.raw)
        for output, _ in step.outputs:
            step_request.outputs.add(name=output)
        places = self._places.get((ensemble, step.number))
        held = contextlib.nullcontext() if places is None else _place(
            places, self._left(deadline),
            self._entries[ensemble].config.ensemble_scheduling.max_inflight_requests)
        try:
            async with held:
                return await self._infer(step_request, self._left(deadline), traceparent,
                                         partial=partial)
        except ServingError as error:
            raise _named(ensemble, step, error) from None

    def _left(self, deadline: float | None) -> float | None:
        """Seconds left until `deadline` (None: no deadline)."""
        return None if deadline is None else max(0.0, deadline - self._clock())

    async def ready(self, name: str, check: ReadyCheck) -> bool:
        """Ready when every step's model version is."""
        steps = self._entries[name].plan.steps
        answers = await asyncio.gather(*(check(s.model, s.version) for s in steps))
        return all(answers)

    def statistics(self, name: str, version: str = "") -> list:
        """ModelStatistics of the ensemble's versions (one version when `version` is given)."""
        versions = [self._repository.version(name, version)] if version else \
            self._entries[name].versions
        return [self._statistics[(name, v)].to_proto() for v in versions]


def _rows(request: pb.ModelInferRequest, max_batch_size: int) -> int:
    return request.inputs[0].shape[0] if max_batch_size and request.inputs else 1


def _take(step: Step, answer: pb.ModelInferResponse, tensors: dict[str, _Tensor]) -> None:
    """The outputs of `step`'s `answer` into `tensors`, as the ensemble names them."""
    produced = {t.name: (t, raw) for t, raw in zip(answer.outputs, answer.raw_output_contents)}
    for output, tensor in step.outputs:
        if output in produced:
            meta, raw = produced[output]
            tensors[tensor] = _Tensor(meta.datatype, meta.shape, raw, step.batching)


def _response(entry: ModelEntry, version: str, request: pb.ModelInferRequest,
              tensors: dict[str, _Tensor], wanted: set[str]) -> pb.ModelInferResponse:
    """The ensemble's answer: the outputs among `tensors` (the `wanted` ones, when named)."""
    plan: Plan = entry.plan
    response = pb.ModelInferResponse(model_name=entry.name, model_version=version,
                                     id=request.id)
    for name, dims in zip(plan.outputs, plan.output_dims):
        tensor = tensors.get(name)
        if tensor is None or (wanted and name not in wanted):
            continue
        shape = carried_shape(tensor.shape, dims, plan.batching, tensor.batched)
        response.outputs.add(name=name, datatype=tensor.datatype, shape=shape)
        response.raw_output_contents.append(tensor.raw)
    return response


def _named(ensemble: str, step: Step, error: ServingError) -> ServingError:
    """`error` of `step`, its message naming the ensemble and the step."""
    return from_code(error.code, f"ensemble '{ensemble}' {step.describe()}: {error.message}")


def _first(failed: BaseExceptionGroup) -> BaseException:
    """The first failure of a fork's runs (each raises a failure of its own, not a group:
    a fork within a run raises its own first)."""
    return failed.exceptions[0]


@contextlib.asynccontextmanager
async def _place(places: asyncio.Semaphore, seconds: float | None, most: int):
    """One of a step's `most` places for requests in flight, waited for at most `seconds`
    (None: as long as it takes), held for the block."""
    try:
        async with asyncio.timeout(seconds):
            await places.acquire()
    except TimeoutError:
        raise DeadlineExceeded(f"deadline exceeded waiting for one of the step's {most} places "
                               "(ensemble_scheduling max_inflight_requests)") from None
    try:
        yield
    finally:
        places.release()
