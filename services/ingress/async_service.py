"""Asynchronous inference on the ingress: Submit stores, workers feed the mesh, Result answers,
Cancel gives up.

`Submit` validates a request as ModelInfer does (bad input is refused at once), stores it in
the SQLite store (`submissions.py`) and returns its id. A worker pool takes PENDING rows in
submission order, at most `concurrency` at a time, through the same path as ModelInfer; a
request refused for lack of capacity (RESOURCE_EXHAUSTED, UNAVAILABLE) goes back to the store
and is tried again after a backoff, for up to `retry_seconds`. On start, rows left RUNNING by
a stopped process are PENDING again. Finished rows are deleted after `retention_seconds`.
`Cancel` ends a PENDING or RUNNING row as CANCELLED and, when this process's worker runs it,
cancels that worker's call into the mesh (what a cancelled ModelInfer does there); a row
another process runs on the same store stays CANCELLED when that run ends.

Each row keeps the protocol its Submit arrived by (PROTOCOL: "http" when the HTTP front door
submitted it), and the worker serves it under that protocol, so the ingress's metrics count
an asynchronous request as they count a ModelInfer that came in by the same door. Result
runs no inference and counts nothing.

A request belongs to the principal that submitted it (its owner): Result shows it (and
Cancel gives it up) to its
owner and to the operators of its model (callers the policy allows `admin` on it), and to
anyone else answers exactly what it answers for an id never submitted, so an id held by
another caller discloses nothing. A request without an owner (submitted with no principal:
no policy, an anonymous caller, or stored by an older ingress) is shown, as before, to any
caller allowed to infer on its model who holds its id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from meshserve.common.access import ADMIN
from meshserve.common.errors import InvalidArgument, NotFound, ServingError
from meshserve.common.forwarding import CODE_NUMBER
from meshserve.common.metrics import PROTOCOL
from meshserve.common.server import internal_error_message
from meshserve.common.tracing import header
from meshserve.common.version_pin import PIN_HEADER
from meshserve.ingress import classification
from meshserve.ingress.submissions import (
    CANCELLED,
    GRPC,
    Submission,
    SubmissionStore,
    connect,
)
from meshserve.protocol import async_inference_pb2_grpc
from meshserve.protocol.async_inference_pb2 import ResultResponse, SubmitResponse
from meshserve.protocol.grpc_service_pb2 import ModelInferRequest, ModelInferResponse

log = logging.getLogger(__name__)

Infer = Callable[[ModelInferRequest], Awaitable[ModelInferResponse]]
Sees = Callable[[Submission], bool]  # whether the caller may see a stored request

PURGE_EVERY_S = 60.0
STATES = {"PENDING": ResultResponse.PENDING, "RUNNING": ResultResponse.RUNNING,
          "DONE": ResultResponse.DONE, "FAILED": ResultResponse.FAILED,
          "CANCELLED": ResultResponse.CANCELLED}


@dataclass(frozen=True)
class AsyncSettings:
    store: Path
    max_pending: int = 10_000
    concurrency: int = 32
    retention_seconds: float = 3600.0
    retry_seconds: float = 600.0
    timeout_seconds: float = 60.0


def backoff(attempts: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Seconds before a refused request is tried again, after `attempts` tries."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def everyone(submission: Submission) -> bool:
    """No caller to tell apart (no gate): every stored request is seen."""
    return True


def may_see(submission: Submission, principals: Collection[str],
            operates: Callable[[str], bool]) -> bool:
    """Whether a caller who proved `principals` sees `submission`: a request without an
    owner, yes (its id is the key); else only its owner, or an operator of its model
    (`operates(model)`, asked only then)."""
    return (submission.owner is None or submission.owner in principals
            or operates(submission.model))


class AsyncRequests:
    """The core: `submit`, `lookup`/`wait`, and `run` (the worker pool, until cancelled).

    `clock` is wall-clock seconds (rows carry wall-clock times across restarts)."""

    def __init__(self, store: SubmissionStore, infer: Infer,
                 check: Callable[[ModelInferRequest], None], concurrency: int,
                 retention_seconds: float, retry_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._infer = infer
        self._check = check
        self._concurrency = concurrency
        self._retention = retention_seconds
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._running = 0
        self._wake = asyncio.Event()
        self._finished: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}  # by the id of the row each runs

    def submit(self, request: ModelInferRequest, protocol: str = GRPC,
               owner: str | None = None) -> str:
        """Check and store `request`, which arrived by `protocol` from the principal `owner`
        (None: none); its id."""
        self._check(request)
        submission_id = self._store.submit(request.model_name, request.SerializeToString(),
                                           protocol, owner)
        self._wake.set()
        return submission_id

    def lookup(self, submission_id: str, sees: Sees = everyone) -> Submission:
        """The stored request, if the caller `sees` it; NotFound, the same whether it was
        never stored or is not the caller's to see."""
        if not submission_id:
            raise InvalidArgument("id is empty; pass the id Submit returned")
        found = self._store.get(submission_id)
        if found is None or not sees(found):
            raise NotFound(f"no asynchronous request '{submission_id}' (never submitted, or "
                           f"finished more than {self._retention:g} s ago and deleted)")
        return found

    async def wait(self, submission_id: str, seconds: float,
                   sees: Sees = everyone) -> Submission:
        """The row once finished, or as it is after `seconds`."""
        found = self.lookup(submission_id, sees)
        if found.finished or seconds <= 0:
            return found
        event = self._finished.setdefault(submission_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # never swallows a cancel, as wait_for may
                await event.wait()
        return self._store.get(submission_id) or found

    def cancel(self, submission_id: str, sees: Sees = everyone) -> Submission:
        """Give the request up if it has not finished (see the module); the row after."""
        self.lookup(submission_id, sees)
        if self._store.cancel(submission_id):
            task = self._tasks.get(submission_id)
            if task is not None:
                task.cancel()
            event = self._finished.pop(submission_id, None)
            if event is not None:
                event.set()
        return self.lookup(submission_id, sees)

    async def run(self) -> None:
        recovered = self._store.recover()
        if recovered:
            log.info("asynchronous requests: %d left running by a stopped process are "
                     "pending again", recovered)
        last_purge = float("-inf")
        try:
            while True:
                self._wake.clear()
                for submission in self._store.claim(self._concurrency - self._running):
                    self._start(submission)
                now = self._clock()
                if now - last_purge >= PURGE_EVERY_S:
                    last_purge = now
                    self._store.purge(self._retention)
                due = self._store.next_due()
                timeout = PURGE_EVERY_S
                if due is not None and self._running < self._concurrency:
                    timeout = min(timeout, max(0.0, due - now))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, submission: Submission) -> None:
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._process(submission))
        self._tasks[submission.id] = task

        def ended(_) -> None:
            if self._tasks.get(submission.id) is task:  # not a later try's task
                del self._tasks[submission.id]

        task.add_done_callback(ended)

    async def _process(self, submission: Submission) -> None:
        PROTOCOL.set(submission.protocol)  # this task's own context: labels its metrics
        finished = True
        try:
            request = ModelInferRequest.FromString(submission.request)
            response = await self._infer(request)
        except ServingError as error:
            code = CODE_NUMBER.get(error.code, CODE_NUMBER["UNKNOWN"])
            if error.retryable and self._clock() - submission.created < self._retry_seconds:
                finished = False
                self._store.retry(submission.id, backoff(submission.attempts), code,
                                  error.message)
            else:
                self._store.fail(submission.id, code, error.message)
        except asyncio.CancelledError:
            ended = self._store.get(submission.id)
            if ended is not None and ended.state == CANCELLED:  # by Cancel, which ended it
                return
            finished = False  # stopping: the row stays RUNNING, recovered on the next start
            raise
        except Exception as error:  # noqa: BLE001 — the row must end, whatever happened
            self._store.fail(submission.id, CODE_NUMBER["INTERNAL"],
                             internal_error_message(error))
        else:
            self._store.finish(submission.id, response.SerializeToString())
        finally:
            self._running -= 1
            self._wake.set()
            event = self._finished.pop(submission.id, None) if finished else None
            if event is not None:
                event.set()


def to_proto(submission: Submission) -> ResultResponse:
    answer = ResultResponse(id=submission.id, state=STATES[submission.state])
    if submission.state == "DONE":
        answer.response.ParseFromString(submission.response)
    elif submission.code:
        answer.code, answer.message = submission.code, submission.message
    return answer


class AsyncInferenceServicer(async_inference_pb2_grpc.AsyncInferenceServicer):
    """Authorized by the ingress's gate (meshserve.ingress.auth) as ModelInfer is: Submit is
    action `infer` on the model, under the caller's rate limit and default priority, and
    stores the caller's principal as the request's owner; Result and Cancel find a request
    only for whom `may_see` allows (anyone else gets NOT_FOUND, as for an unknown id), and
    then need `infer` on the model the request named."""

    def __init__(self, requests: AsyncRequests, gate=None) -> None:
        self._requests = requests
        self._gate = gate

    async def Submit(self, request, context):
        owner = None
        if self._gate is not None:
            caller = self._gate.caller(context)
            owner = caller.principal
            self._gate.authorize(caller, "infer", request.model_name)
            self._gate.admit(caller, "infer", request.model_name)
            priority = self._gate.default_priority(caller)
            if priority and "priority" not in request.parameters:
                request.parameters["priority"].int64_param = priority
        pin = header(context.invocation_metadata(), PIN_HEADER)
        if pin and not request.model_version:
            request.model_version = pin
        return SubmitResponse(id=self._requests.submit(request, PROTOCOL.get(), owner))

    async def Cancel(self, request, context):
        sees = self._authorized(request.id, context)
        return to_proto(self._requests.cancel(request.id, sees))

    async def Result(self, request, context):
        sees = self._authorized(request.id, context)
        seconds = request.wait_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining - 0.05))
        return to_proto(await self._requests.wait(request.id, seconds, sees))

    def _authorized(self, submission_id: str, context) -> Sees:
        """What the caller sees, once it may act on request `submission_id`: authenticated
        before the store is read, NOT_FOUND unless it sees the request, then `infer` on the
        request's model."""
        caller = None if self._gate is None else self._gate.caller(context)
        sees = self._sees(caller)
        found = self._requests.lookup(submission_id, sees)
        if caller is not None:
            self._gate.authorize(caller, "infer", found.model)
        return sees

    def _sees(self, caller) -> Sees:
        """What `caller` sees: its own requests (any principal it proved, a certificate's or
        a token's), those of the models it operates, and those without an owner."""
        if caller is None:
            return everyone
        principals = frozenset(c.principal for c in caller.credentials
                               if c.principal is not None)
        return lambda found: may_see(found, principals,
                                     lambda model: self._gate.allows(caller, ADMIN, model))


@dataclass
class AsyncApi:
    """What the ingress's wiring adds to its service: nothing when not configured."""

    register: Callable[..., None] = lambda server, gate=None: None
    background: list = field(default_factory=list)
    cleanup: list = field(default_factory=list)
    requests: AsyncRequests | None = None  # for other front doors (HTTP)


def build_async(settings: AsyncSettings | None, ingress) -> AsyncApi:
    """The asynchronous API over `ingress` (its `infer` and `config`)."""
    if settings is None:
        return AsyncApi()
    connection = connect(settings.store)
    store = SubmissionStore(connection, settings.max_pending)

    def check(request: ModelInferRequest) -> None:
        """What ModelInfer would refuse before running it: the tensors, and the outputs asked
        for as classes."""
        ingress.schema(request.model_name, request.model_version).validate(request)
        if request.outputs:
            classification.requested(request, ingress.repository.get(request.model_name))

    async def infer(request: ModelInferRequest) -> ModelInferResponse:
        return await ingress.infer(request, settings.timeout_seconds)

    requests = AsyncRequests(store, infer, check, settings.concurrency,
                             settings.retention_seconds, settings.retry_seconds)

    def register(server, gate=None) -> None:
        async_inference_pb2_grpc.add_AsyncInferenceServicer_to_server(
            AsyncInferenceServicer(requests, gate), server)

    async def close() -> None:
        connection.close()

    return AsyncApi(register, [requests.run], [close], requests)


def add_async_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async-store", type=Path, metavar="PATH",
                        help="SQLite file of the asynchronous API (Submit/Result); "
                             "without it the API is not served")
    parser.add_argument("--async-max-pending", type=int, default=10_000,
                        help="unfinished asynchronous requests stored before Submit is "
                             "refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--async-concurrency", type=int, default=32,
                        help="asynchronous requests in the mesh at once")
    parser.add_argument("--async-retention", type=float, default=3600.0, metavar="SECONDS",
                        help="how long finished results are kept")
    parser.add_argument("--async-retry", type=float, default=600.0, metavar="SECONDS",
                        help="how long a request refused for lack of capacity is retried")
    parser.add_argument("--async-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="deadline of each attempt in the mesh")


def async_settings(args: argparse.Namespace) -> AsyncSettings | None:
    if args.async_store is None:
        return None
    if args.async_max_pending < 1 or args.async_concurrency < 1:
        raise SystemExit("--async-max-pending and --async-concurrency must be >= 1")
    return AsyncSettings(store=args.async_store, max_pending=args.async_max_pending,
                         concurrency=args.async_concurrency,
                         retention_seconds=args.async_retention,
                         retry_seconds=args.async_retry, timeout_seconds=args.async_timeout)
