"""Compute: loads one model version, warms it, and runs batches on CUDA or the CPU.

`meshserve compute --model-repository R --model M --version V [--device auto]`
Ready (grpc.health.v1 SERVING) only once the model is loaded and warm.
"""

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanKind, StatusCode

from meshserve.common import batch_requests, model_files, runtime
from meshserve.common.errors import (
    FailedPrecondition,
    Internal,
    NotFound,
    ServingError,
    Unavailable,
)
from meshserve.common.forwarding import error_result, not_a_group
from meshserve.common.http2_client import target_argument
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.identity import Callers, add_callers_flag, default_callers
from meshserve.common.metrics import ComputeMetrics, Metrics
from meshserve.common.repository import ModelRepository
from meshserve.common.server import HealthServicer, Service, internal_error_message
from meshserve.common.streams import Early, group_handler
from meshserve.common.tls import TlsFiles
from meshserve.common.tracing import TRACEPARENT, Tracing, context_of, header
from meshserve.common.validation import Schema
from meshserve.compute.backends import triton_python_backend_utils as pb_utils
from meshserve.compute.tensors import WARMUP_DIR
from meshserve.protocol import grpc_service_pb2_grpc
from meshserve.protocol.groups_pb2 import InferGroup, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelInferResponse, ModelReadyResponse

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ComputeSettings:
    listen: str
    tls: TlsFiles
    repository: Path
    model: str
    version: str
    device: str = "auto"
    threads: int = 1
    # Manifests must be signed by one of these keys (a PEM file or a directory of *.pub);
    # None: signatures are not checked (digests still are).
    trusted_signers: Path | None = None
    # Refuse a version directory without a manifest.
    require_signed: bool = False
    # The key-encryption key of encrypted artifacts.
    kek_file: Path | None = None
    allowed_callers: frozenset[str] = default_callers("compute")
    # Where a Python model's calls to other models go: the ingress at HOST:PORT, or at the
    # port a file holds once the ingress has written it (a supervisor that starts it later);
    # neither: such calls fail.
    bls_target: str = ""
    bls_target_file: Path | None = None


# A batch that takes less than this runs on the event loop itself. Handing it to the worker
# thread and back costs 150-300 µs of CPU on 2 cores (two wake-ups and a self-pipe write), a
# tenth of a quick batch; and with the batcher's next batch already in the stream, the loop
# would read and check it while the worker runs this one, and the two threads' turns at the
# GIL stretched the cnn's batches of 4 to 18.7 ms of wall time for 11.5 ms of CPU. The loop
# answers health checks between batches, so only models whose batches take longer than this
# keep it free on the worker thread.
INLINE_BELOW_S = 0.1


class Pace:
    """How long batches take lately (a moving average), and so where the next one runs."""

    def __init__(self, inline_below: float = INLINE_BELOW_S, weight: float = 0.2) -> None:
        self.inline_below = inline_below
        self.weight = weight
        self.seconds: float | None = None  # None until a batch has run
        self.running = 0  # batches on the worker thread now
        self.ran = 0  # batches run so far

    def inline(self) -> bool:
        """Run the next batch on the event loop: batches are quick and none is running."""
        return not self.running and self.seconds is not None and self.seconds < self.inline_below

    async def turn(self) -> None:
        """Return once a turn of the event loop has passed with no batch run in it, so that
        the answers of the batches before this one have been written (the connection writes
        on the loop's next turn). Otherwise a batch read together with the one before runs
        first, and both answers reach the batcher together, after both batches."""
        while True:
            ran = self.ran
            await asyncio.sleep(0)
            if self.ran == ran:
                return

    def took(self, seconds: float) -> None:
        self.ran += 1
        self.seconds = seconds if self.seconds is None else (
            (1 - self.weight) * self.seconds + self.weight * seconds)


class Compute:
    """Owns the model and the one worker thread that runs it."""

    def __init__(self, settings: ComputeSettings, metrics=None) -> None:
        """`metrics`, when given, makes the per-batch observer once the device is known:
        `metrics.recorder(model, version, device)(seconds, cpu_seconds)`."""
        repository = ModelRepository.load(settings.repository)
        entry = repository.get(settings.model)
        self.name = entry.name
        self.version = repository.version(settings.model, settings.version)
        self.config = entry.config
        self._schema = Schema(entry.config)
        self.decoupled = entry.config.model_transaction_policy.decoupled
        self._version_dir = entry.path / self.version
        self._artifact_name = entry.config.default_model_filename or "model.pt"
        self._settings = settings
        # Why the model was refused (it then never loads); "" otherwise.
        self.refused = ""
        self._device = settings.device
        self._threads = settings.threads
        # One worker: batches run one at a time, the event loop stays free for health checks.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._pace = Pace()
        self.model = None
        self._metrics = metrics
        self._observe = None

    def _load(self) -> None:
        from meshserve.compute.backends import load_model

        self._install_model_calls()
        model = load_model(self.config, self._verified_artifact(), self._version_dir,
                           self._device, self._threads)
        device = model.device
        for request in model.warmup_requests(self._version_dir.parent / WARMUP_DIR):
            try:
                if self.decoupled:
                    model.run_decoupled(request, self.version, lambda position, result: None)
                else:
                    model.run(request, self.version)
            except ServingError as error:
                raise FailedPrecondition(f"{self._version_dir / self._artifact_name}: warm-up "
                                         f"failed: {error.message}") from None
        log.info("model '%s' version '%s' loaded on %s and warm", self.name, self.version, device)
        if self._metrics is not None:
            self._observe = self._metrics.recorder(self.name, self.version, str(device))
        self.model = model

    def _install_model_calls(self) -> None:
        """Tell Python models where their calls to other models go, when this compute knows."""
        settings = self._settings
        if not settings.bls_target and settings.bls_target_file is None:
            return
        from meshserve.compute.backends.model_calls import ModelCalls, target_in

        if settings.bls_target:
            def target() -> str:
                return settings.bls_target
        else:
            def target() -> str:
                return target_in(settings.bls_target_file)
        pb_utils.set_model_calls(ModelCalls(target, settings.tls))

    def _verified_artifact(self) -> bytes | Path:
        """The artifact, checked against its signed manifest before anything loads it:
        decrypted plaintext in memory, or the path of an unsigned one (when allowed)."""
        settings = self._settings
        trusted = (model_files.trusted_signers(settings.trusted_signers)
                   if settings.trusted_signers else None)
        kek = model_files.read_kek(settings.kek_file) if settings.kek_file else None
        source, manifest, signer = model_files.load_version(
            self._version_dir, self._artifact_name, trusted, kek, settings.require_signed)
        if manifest is None:
            log.warning("model '%s' version '%s' has no manifest: loading it unverified",
                        self.name, self.version)
        else:
            log.info("model '%s' version '%s': artifact %s verified%s", self.name,
                     self.version, manifest["digest"],
                     f", signed by {signer}" if signer else " (signature not checked: no "
                     "--trusted-signers)")
        return source

    async def load(self, health: HealthServicer) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        except ServingError as error:  # ArtifactRefused, an unreadable key, ...
            self._refuse(health, error.message)
            return
        except Exception as error:  # noqa: BLE001 — whatever loading or warming it raised
            self._refuse(health, f"{self._version_dir / self._artifact_name}: "
                                 f"{type(error).__name__}: {error}", error)
            return
        if self._threads:
            import torch

            # Torch's thread count is set per thread: quick batches run on this one.
            torch.set_num_threads(self._threads)
        health.set(True)

    def _refuse(self, health: HealthServicer, reason: str,
                error: Exception | None = None) -> None:
        """Stay up and NOT_SERVING, saying why (in the log, and to whoever follows its health:
        the batcher passes it on to the control plane, and so to the ingress's repository
        index); the rest of the mesh keeps serving. An unexpected `error` is logged with its
        traceback."""
        self.refused = f"refusing model '{self.name}' version {self.version}: {reason}"
        log.error("%s", self.refused, exc_info=error)
        health.set(False, reason=self.refused)

    async def traced(self, request, tracing: Tracing, traceparent: str,
                     run: Callable[[], Awaitable[T]]) -> T:
        """`run()` (`infer` or `stream` of the batch `request`) inside a `compute.infer` span
        (the batcher's `batcher.batch` its parent)."""
        batched = self.config.max_batch_size and request.inputs and request.inputs[0].shape
        rows = request.inputs[0].shape[0] if batched else 1
        span = tracing.start("compute.infer", context_of(traceparent), {
            "model": self.name, "model.version": self.version, "batch.size": rows,
            "device": "" if self.model is None else str(self.model.device)},
            kind=SpanKind.SERVER)
        try:
            return await run()
        except Exception as error:
            span.set_status(StatusCode.ERROR, str(error))
            raise
        finally:
            span.end()

    def _check_servable(self, request) -> None:
        if request.model_name != self.name or request.model_version not in ("", self.version):
            raise NotFound(f"this compute replica serves model '{self.name}' version "
                           f"'{self.version}', not '{request.model_name}' version "
                           f"'{request.model_version}'")
        if self.refused:
            raise FailedPrecondition(self.refused)
        if self.model is None:
            raise Unavailable(f"model '{self.name}' version '{self.version}' is still loading")

    async def infer(self, request):
        self._check_servable(request)
        self._schema.validate(request)  # once per batch: a malformed one never reaches torch
        await self._pace.turn()
        if self._pace.inline() and not self.model.waits:
            response, timings, cpu_ns = self._run(request)
        else:
            # A Python model's requests learn that their batch was given up (this cancelled).
            cancelled = threading.Event() if self.model.waits else None
            self._pace.running += 1
            try:
                response, timings, cpu_ns = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, request, cancelled)
            except asyncio.CancelledError:
                if cancelled is not None:
                    cancelled.set()
                raise
            finally:
                self._pace.running -= 1
        self._timed(response, timings, cpu_ns)
        return response

    def _timed(self, response: ModelInferResponse, timings, cpu_ns: int) -> None:
        """A batch's timings, in its answer's parameters (the batcher's statistics read
        them), and told to the pace and the metrics."""
        parameters = response.parameters
        parameters["compute_input_ns"].int64_param = timings.input_ns
        parameters["compute_infer_ns"].int64_param = timings.infer_ns
        parameters["compute_output_ns"].int64_param = timings.output_ns
        seconds = (timings.input_ns + timings.infer_ns + timings.output_ns) / 1e9
        self._pace.took(seconds)
        if self._observe is not None:
            self._observe(seconds, cpu_ns / 1e9)

    def _run(self, request, cancelled: threading.Event | None = None):
        """The model's run, and the CPU it took on the thread that ran it."""
        cpu = time.thread_time_ns()
        response, timings = self.model.run(request, self.version, cancelled)
        return response, timings, time.thread_time_ns() - cpu

    async def stream(self, request, early: Early | None) -> ItemResult:
        """A decoupled model's batch: each answer the model sends goes back at once as an
        early answer to its request's position in the batch (`more` set until that request's
        last); once `execute` has returned with requests still open, an early answer without
        results says so (the batcher may send the next batch, as Triton runs the next
        `execute` then); and this returns, with the batch's timings alone, once every request
        of the batch has had its last answer. When `execute` raises, the requests still
        waiting for theirs get its error. Without `early` the answers are dropped. When the
        batch is given up (this is cancelled: every request of it was), each request's
        `is_cancelled()` turns true, so that the model can stop."""
        try:
            self._check_servable(request)
            self._schema.validate(request)
        except ServingError as error:
            return error_result(error)
        cancelled = threading.Event()
        try:
            return await self._answer_as_sent(request, early, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def _answer_as_sent(self, request, early: Early | None,
                              cancelled: threading.Event) -> ItemResult:
        """`stream`'s batch, run with `cancelled` for its requests."""
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[tuple[int, ItemResult]] = asyncio.Queue()
        waiting = set(range(self.model.requests_in(request)))

        def send(position: int, result: ItemResult) -> None:  # on the model's threads
            loop.call_soon_threadsafe(answers.put_nowait, (position, result))

        async def tell(position: int, result: ItemResult) -> None:
            if position not in waiting:
                return
            if not result.more:
                waiting.discard(position)
            if early is not None:
                await early(InferGroupResult(results=[result],
                                             items=[position]).SerializeToString())

        await self._pace.turn()
        self._pace.running += 1
        try:
            running = loop.run_in_executor(self._executor, self._run_decoupled, request, send,
                                           cancelled)
            while waiting and not running.done():
                getter = asyncio.ensure_future(answers.get())
                try:
                    await asyncio.wait((getter, running), return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    getter.cancel()
                    raise
                if getter.done():
                    await tell(*getter.result())
                else:
                    getter.cancel()
            try:
                timings, cpu_ns = await running
            except Exception as error:  # noqa: BLE001 — the answer of the requests still open
                failed = error_result(error if isinstance(error, ServingError) else
                                      Internal(internal_error_message(error)))
            else:
                failed = None
        finally:
            self._pace.running -= 1
        while not answers.empty():  # sent before execute returned
            await tell(*answers.get_nowait())
        for position in sorted(waiting) if failed is not None else ():
            await tell(position, failed)
        if waiting and early is not None:
            await early(InferGroupResult().SerializeToString())
        while waiting:  # sent by the model's own threads after execute returned
            await tell(*await answers.get())
        response = ModelInferResponse()
        if failed is None:
            self._timed(response, timings, cpu_ns)
        return ItemResult(response=response)

    def _run_decoupled(self, request, send, cancelled: threading.Event) -> tuple:
        cpu = time.thread_time_ns()
        timings = self.model.run_decoupled(request, self.version, send, cancelled)
        return timings, time.thread_time_ns() - cpu

    async def answer(self, request, tracing: Tracing | None, traceparent: str) -> ItemResult:
        """One batch's result: its response, or the error that refused it (a request alone
        in its batch that failed on its own is answered as one of a larger batch would be)."""
        try:
            if tracing is None:
                return ItemResult(response=await self.infer(request))
            return ItemResult(response=await self.traced(request, tracing, traceparent,
                                                         lambda: self.infer(request)))
        except batch_requests.RequestFailed as failed:
            return ItemResult(response=batch_requests.failed_alone(request, self.version,
                                                                   failed.error))
        except ServingError as error:
            return error_result(error)
        except Exception as error:  # noqa: BLE001 — the batch's answer, not the stream's
            return error_result(Internal(internal_error_message(error)))

    async def streamed(self, request, early: Early | None, tracing: Tracing | None,
                       traceparent: str) -> ItemResult:
        """A decoupled model's batch (`stream`), inside a `compute.infer` span when tracing,
        as `answer` runs `infer`."""
        if tracing is None:
            return await self.stream(request, early)
        return await self.traced(request, tracing, traceparent,
                                 lambda: self.stream(request, early))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, compute: Compute, tracing: Tracing | None = None) -> None:
        self._compute = compute
        self._tracing = tracing

    async def ModelInfer(self, request, context):
        if self._tracing is None:
            return await self._compute.infer(request)
        return await self._compute.traced(
            request, self._tracing, header(context.invocation_metadata(), TRACEPARENT),
            lambda: self._compute.infer(request))

    async def ModelReady(self, request, context):
        return ModelReadyResponse(ready=self._compute.model is not None)


def build_service(settings: ComputeSettings, metrics: Metrics | None = None,
                  tracing: Tracing | None = None) -> Service:
    compute = Compute(settings, None if metrics is None else ComputeMetrics(metrics))
    if metrics is not None:  # a Python model's own metric families, served beside compute's
        metrics.registry.register(pb_utils.model_metrics())
    health = HealthServicer()

    async def handle(body: bytes, early=None) -> bytes:
        """Each item of a group is one batch (the batcher sends groups of one)."""
        try:
            group = InferGroup.FromString(body)
        except DecodeError as error:
            raise not_a_group(error) from None
        if compute.decoupled:
            results = [await compute.streamed(item.request, early, tracing, item.traceparent)
                       for item in group.items]
        else:
            results = [await compute.answer(item.request, tracing, item.traceparent)
                       for item in group.items]
        return InferGroupResult(results=results).SerializeToString()

    def register(server) -> None:
        server.add_generic_rpc_handlers((group_handler(handle, service.draining),))
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(compute, tracing), server)

    service = Service(settings.listen, server_ssl_context(settings.tls), register, health,
                      background=[lambda: compute.load(health)],
                      cleanup=[compute.close, *([] if tracing is None else [tracing.close])],
                      callers=Callers("compute", settings.allowed_callers))
    return service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve compute", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="", help="default: the model's default version")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    # One thread: on a shared CPU, torch's spinning thread pool loses more than it gains
    # (mlp batch 32: 1.0 ms with one thread, 1.9 ms with two, on 2 cores).
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default)")
    add_callers_flag(parser, "compute")
    parser.add_argument("--trusted-signers", type=Path,
                        help="verify manifests against these Ed25519 public keys (a PEM file "
                             "or a directory of *.pub) before loading")
    parser.add_argument("--require-signed", action="store_true",
                        help="refuse a version without a signed manifest")
    parser.add_argument("--kek-file", type=Path,
                        help="key-encryption key of encrypted artifacts (default: "
                             f"${model_files.KEK_ENV})")
    calls = parser.add_mutually_exclusive_group()
    calls.add_argument("--bls-target", type=target_argument,
                       help="HOST:PORT of the mesh's ingress, where a Python model's calls to "
                            "other models (InferenceRequest.exec) go, with this compute's "
                            "certificate (principal 'compute'); default: such calls fail")
    calls.add_argument("--bls-target-file", type=Path,
                       help="as --bls-target, the ingress on this host at the port this file "
                            "holds (read when a model first calls, for a supervisor that "
                            "starts the ingress after the computes)")
    args = parser.parse_args(argv)
    if args.require_signed and args.trusted_signers is None:
        parser.error("--require-signed needs --trusted-signers")
    runtime.configure_logging("compute", args.log_level, args.log_format)
    settings = ComputeSettings(
        listen=args.listen, tls=runtime.tls_files(args), repository=args.model_repository,
        model=args.model, version=args.version, device=args.device, threads=args.threads,
        allowed_callers=args.allow_callers, trusted_signers=args.trusted_signers,
        require_signed=args.require_signed,
        kek_file=model_files.kek_path(args.kek_file, dict(os.environ)),
        bls_target=args.bls_target or "", bls_target_file=args.bls_target_file)

    return runtime.run_service("compute", args, build_service, settings)
