"""The measurements of `meshserve bench budget` (`meshserve.tools.budget_run` runs them and
reports): load windows against `meshserve up` and the bare server, each hop's debug
`ModelInfer` at concurrency 1, the model in this process, and the mesh at rest.

How each figure is measured:

* **B**: the bare server's CPU (utime + stime of its process) over a load window at
  concurrency 32, divided by the calls answered in the window (sent and answered inside it).
* **CPU per request** of a kind (ingress; router; all batchers together; all computes
  together) at concurrency 32 and 1, per model: the CPU of those processes over the window
  divided by the requests answered in it, in B. /proc is read every `SAMPLE_S` seconds in a
  thread and interpolated to the client's window edges. The count leaves out requests that
  straddle an edge (at most the concurrency), which errs toward more CPU per request (under
  2 % here). The **whole mesh** is the four kinds together; its c=1 figure over its c=32
  figure is the per-request cost that concurrency amortises.
* **Model CPU per sample**: ``torch.jit.load`` of the version that answered most, called in
  this process at batch 16 with one torch thread (and glibc's allocator bounds fixed, as in
  compute), in every round after its load windows;
  process CPU time per row. Compute's budget is its own share plus this. Its p50 at batch 1
  (wall time) is compute's latency allowance. Also reported: its CPU at batch 1 (this
  thread's) when each call follows a pause of `PAUSE_S`, as every process of the mesh
  sleeps between the requests of a concurrency-1 load, over its CPU back to back (medians
  of the calls): what a pause alone does to the same work on this machine.
* **The batcher's Python after a pause**: the same ratio for a hop's own code, the
  batcher's handling of a group of one mlp request in this process, answered at once by a
  stand-in for compute (`budget_python`): what concurrency 1 costs every hop on this machine
  beyond the extra groups.
* **p50 added by each hop** at concurrency 1: each hop is called directly with its debug
  ``ModelInfer`` (ingress and router unpinned, the batcher and compute of the version that
  answered most; compute with the batcher's certificate, as compute admits only batchers)
  and so is the bare server, round after round; within each round the hop's p50 less the
  p50 of the hop behind it (compute: less the bare server's), over the bare server's p50 of
  the same request, is what it adds; the figure is the median over rounds.
* **The floor**: `meshserve bench relay` with none of meshserve's work (a driver, a bare
  relay on the services' server and an echo, mutual TLS, messages the size of the first
  model's request, one in flight), once per client the hops use (their own HTTP/2 client; a
  `grpc.aio` channel, as the router's), paced as at concurrency 1: the relay's CPU per message
  (in B) and the p50 it adds over the driver calling the echo itself (in the first model's
  bare p50s) are what any hop costs at c=1 on this machine before its own work.
* **Idle mesh CPU**: once the load has stopped and the mesh has settled (`Plan.settle_s`),
  the CPU of every process of `up` (itself included) over short windows, as % of one core.
* **RSS**: VmRSS of each process; idle is read in the idle phase, under load is the largest
  reading during the c=32 windows; each kind shows its largest process.

With ``--profile`` a separate c=32 load of the first model runs after the measurements while
py-spy records ingress, router and that model's batchers and computes (``--native``), so the
profiler's own cost never reaches a figure.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from meshserve.common.repository import ModelRepository
from meshserve.common.tls import TlsFiles, channel_credentials, channel_options
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.tools.bench_relay import PACE_MS
from meshserve.tools.bench_relay import measure as measure_relay
from meshserve.tools.budget import (
    HOPS,
    RELAY_CLIENTS,
    Measured,
    ServiceProcess,
    Window,
    cpu_by_kind,
    cpu_seconds,
    largest_by_kind,
    model_share,
    most_answered,
)
from meshserve.tools.budget_proc import (
    BareServer,
    MeshUp,
    Sampler,
    compute_reading,
    record_profiles,
)
from meshserve.tools.budget_python import batcher_paused_ratio
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec
from meshserve.tools.random_requests import random_request

MODELS = ("mlp", "cnn")
HIGH, LOW = 32, 1


@dataclass(frozen=True)
class Plan:
    """How long each part of a budget run lasts."""

    models: tuple[str, ...]
    rounds: int  # load windows per (model, concurrency), and bare windows
    warmup_s: float
    load_s: float
    hop_rounds: int
    hop_warmup_s: float
    hop_s: float
    model_s: float  # in-process model measurement, per model and round
    floor_messages: int  # messages through the bare relay back to back, per client
    floor_paced: int  # paced (/proc counts CPU in 10 ms ticks: 200 read to 50 µs a message)
    settle_s: float
    idle_windows: int
    idle_s: float
    profile_s: float


QUICK = Plan(models=("mlp",), rounds=2, warmup_s=0.5, load_s=2.0, hop_rounds=3,
             hop_warmup_s=0.3, hop_s=0.6, model_s=0.3, floor_messages=300,
             floor_paced=200, settle_s=2.0, idle_windows=3,
             idle_s=1.0, profile_s=5.0)
FULL = Plan(models=MODELS, rounds=3, warmup_s=1.0, load_s=4.0, hop_rounds=5,
            hop_warmup_s=0.5, hop_s=1.5, model_s=0.5, floor_messages=1000,
            floor_paced=400, settle_s=3.0, idle_windows=5,
            idle_s=2.0, profile_s=10.0)


@dataclass(frozen=True)
class Target:
    """Where a load goes and as whom."""

    address: str
    identity: str  # the server's identity (TLS target name)
    caller: str  # the certificate presented: client, or batcher for compute

    def spec(self, tls_dir: Path, model: str, request: bytes, concurrency: int,
             duration_s: float, warmup_s: float) -> LoadSpec:
        return LoadSpec(target=self.address, model=model, concurrency=concurrency,
                        duration_s=duration_s, warmup_s=warmup_s, ca=tls_dir / "ca.crt",
                        cert=tls_dir / f"{self.caller}.crt", key=tls_dir / f"{self.caller}.key",
                        server_name=self.identity, request=request)


def request_bytes(endpoint: str, tls_dir: Path, model: str) -> bytes:
    """One request of `model` with a random row, as the load generator builds it from the
    ingress's ModelMetadata."""
    credentials = channel_credentials(TlsFiles.for_identity(tls_dir, "client"))
    with grpc.secure_channel(endpoint, credentials, options=channel_options("ingress")) as ch:
        metadata = GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=10)
    return random_request(metadata, model=model)[0].SerializeToString()


def _checked(result: dict, what: str) -> dict:
    if not result["requests"]:
        raise RuntimeError(f"{what}: no request answered; errors {result['errors']}")
    return result


def load_window(spec: LoadSpec, processes: list[ServiceProcess], what: str,
                rss_into: dict[str, float] | None = None,
                run_dir: Path | None = None) -> tuple[Window, dict]:
    """One load run; the CPU of `processes` by kind over its measured window and, with the
    mesh's `run_dir`, the part of compute's CPU its models took (their share over the whole
    run, as the computes counted it, applied to the window)."""
    ticks = os.sysconf("SC_CLK_TCK")
    before = None if run_dir is None else compute_reading(processes, run_dir, ticks)
    with Sampler(p.pid for p in processes) as sampler:
        result = _checked(run_load(spec), what)
    share = None if before is None else model_share(
        before, compute_reading(processes, run_dir, ticks))
    start, end = result["window_unix_s"]
    cpu = cpu_by_kind(sampler.samples, processes, start, end, ticks)
    if rss_into is not None:
        largest_by_kind(sampler.rss_max, processes, rss_into)
    model_cpu = None if share is None else share * cpu.get("compute", 0.0)
    return Window(result["requests"], cpu, model_cpu), result


# The pause before each call of the in-process model's paused measurement: about how long each
# process of the mesh sleeps between its turns at concurrency 1.
PAUSE_S = 0.002


class ModelCost(NamedTuple):
    per_row_s: float  # process CPU per row at the batch size, back to back
    p50_ms: float  # wall time at batch 1
    paused_ratio: float  # CPU at batch 1 after a PAUSE_S pause over back to back


class InProcessModel:
    """A TorchScript file loaded in this process, called with one torch thread."""

    def __init__(self, artifact: Path, dims: tuple[int, ...], batch: int = 16) -> None:
        import torch

        from meshserve.common import heap

        heap.keep_freed_memory()  # as compute runs its model
        self._torch = torch
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            self._model = torch.jit.load(str(artifact), map_location="cpu").eval()
        self.batch = batch
        self._rows, self._one = torch.rand(batch, *dims), torch.rand(1, *dims)

    def cost(self, seconds: float) -> ModelCost:
        """Each figure measured over about `seconds` after a short warm-up."""
        torch, model = self._torch, self._model
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for _ in range(2):
                    model(self._rows)
                    model(self._one)
                calls, cpu0, end = 0, time.process_time(), time.monotonic() + seconds
                while time.monotonic() < end or calls < 3:
                    model(self._rows)
                    calls += 1
                per_row = (time.process_time() - cpu0) / (calls * self.batch)
                hot_ms, hot_cpu = self._calls_at_batch_1(0.0, seconds)
                _, paused_cpu = self._calls_at_batch_1(PAUSE_S, seconds)
        finally:
            torch.set_num_threads(previous)
        return ModelCost(per_row, hot_ms, paused_cpu / hot_cpu)

    def _calls_at_batch_1(self, pause: float, seconds: float) -> tuple[float, float]:
        """Calls at batch 1, each after `pause`, for about `seconds`: the median wall time
        (ms) and the median CPU of this thread (ns) per call."""
        wall, cpu, end = [], [], time.monotonic() + seconds
        while time.monotonic() < end or len(cpu) < 3:
            if pause:
                time.sleep(pause)
            sent, start = time.perf_counter(), time.thread_time_ns()
            self._model(self._one)
            cpu.append(max(time.thread_time_ns() - start, 1))
            wall.append((time.perf_counter() - sent) * 1000)
        return statistics.median(wall), statistics.median(cpu)


class BudgetRun:
    """One budget run against a started mesh and bare server; fills `measured`."""

    def __init__(self, plan: Plan, mesh: MeshUp, bare: BareServer,
                 say: Callable[[str], None]) -> None:
        self.plan = plan
        self.mesh = mesh
        self.bare = bare
        self.say = say
        self.tls = mesh.data_dir / "tls"
        self.measured = Measured()
        self.results: list[dict] = []  # every load result, for the JSON
        self.requests = {m: request_bytes(mesh.endpoint, self.tls, m) for m in plan.models}
        self.ingress = Target(mesh.endpoint, "ingress", "client")
        self.bare_target = Target(bare.address, "ingress", "client")
        self._repository = ModelRepository.load(mesh.data_dir / "models")
        self._loaded: dict[tuple[str, str], InProcessModel] = {}

    def _window(self, target: Target, model: str, concurrency: int, processes,
                what: str, rss: bool = False) -> Window:
        spec = target.spec(self.tls, model, self.requests[model], concurrency,
                           self.plan.load_s, self.plan.warmup_s)
        run_dir = self.mesh.data_dir / "run" if target is self.ingress else None
        window, result = load_window(spec, processes, what,
                                     self.measured.rss_load_mib if rss else None, run_dir)
        self.results.append({"what": what, **result})
        if result["errors"]:
            self.say(f"  {what}: errors {result['errors']}")
        return window

    def loads(self) -> None:
        """Rounds of: the bare server at c=32, then each model at c=32 and c=1."""
        measured, mesh = self.measured, self.mesh.processes
        for index in range(self.plan.rounds):
            window = self._window(self.bare_target, self.plan.models[0], HIGH,
                                  [self.bare.process_info], "bare c=32")
            measured.bare.append(window)
            self.say(f"  round {index + 1}/{self.plan.rounds}: bare "
                     f"{window.per_request(['bare']) * 1e6:.0f} µs/call")
            for model in self.plan.models:
                for concurrency in (HIGH, LOW):
                    what = f"{model} c={concurrency}"
                    window = self._window(self.ingress, model, concurrency, mesh, what,
                                          rss=concurrency == HIGH)
                    measured.load.setdefault((model, concurrency), []).append(window)
                    self.say(f"  round {index + 1}/{self.plan.rounds}: {what} "
                             f"{window.requests / self.plan.load_s:.0f} req/s")
            self._model_costs()
            self.mesh.check_unchanged()

    def _model_costs(self) -> None:
        """Each model's own cost in this process, between the load windows of a round, and
        what a pause costs the batcher's Python."""
        for model in self.plan.models:
            version = self.version(model)
            loaded = self._loaded.get((model, version))
            if loaded is None:
                config = self._repository.get(model).config
                loaded = self._loaded[(model, version)] = InProcessModel(
                    self._repository.artifact(model, version), tuple(config.input[0].dims))
            cost = loaded.cost(self.plan.model_s)
            self.measured.model_cpu_per_sample_s.setdefault(model, []).append(cost.per_row_s)
            self.measured.model_p50_ms.setdefault(model, []).append(cost.p50_ms)
            self.measured.model_paused_ratio.setdefault(model, []).append(cost.paused_ratio)
            self.say(f"    {model} version {version} in-process: {cost.per_row_s * 1e6:.0f} µs "
                     f"CPU per row at batch 16, p50 {cost.p50_ms:.3f} ms at batch 1, "
                     f"{cost.paused_ratio:.1f}x the CPU at batch 1 after a "
                     f"{PAUSE_S * 1e3:g} ms pause")
        ratio = batcher_paused_ratio(PAUSE_S, self.plan.model_s)
        self.measured.batcher_paused_ratio.append(ratio)
        self.say(f"    the batcher's Python in-process: {ratio:.1f}x the CPU per group of one "
                 f"after a {PAUSE_S * 1e3:g} ms pause")

    def version(self, model: str) -> str:
        return most_answered(r for r in self.results if r["model"] == model
                             and r["target"] == self.mesh.endpoint)

    def hop_targets(self, model: str) -> dict[str, Target]:
        version = self.version(model)
        return {"ingress": self.ingress,
                "router": Target(self.mesh.address("router"), "router", "client"),
                "batcher": Target(self.mesh.address(f"batcher-{model}-{version}"), "batcher",
                                  "client"),
                "compute": Target(self.mesh.address(f"compute-{model}-{version}"), "compute",
                                  "batcher"),
                "bare": self.bare_target}

    def hops(self) -> None:
        """Rounds of c=1 loads straight at each hop and at the bare server; p50s."""
        for model in self.plan.models:
            targets = self.hop_targets(model)
            p50s: dict[str, list[float]] = {hop: [] for hop in HOPS}
            for _ in range(self.plan.hop_rounds):
                for hop in HOPS:
                    spec = targets[hop].spec(self.tls, model, self.requests[model], LOW,
                                             self.plan.hop_s, self.plan.hop_warmup_s)
                    result = _checked(run_load(spec), f"{model} c=1 at {hop}")
                    if result["errors"]:
                        raise RuntimeError(f"{model} c=1 at {hop}: errors {result['errors']}")
                    self.results.append({"what": f"{model} c=1 at {hop}", **result})
                    p50s[hop].append(result["latency_ms"]["p50"])
            self.measured.hop_p50_ms[model] = p50s
            self.say(f"  {model} p50 by hop (ms): " + ", ".join(
                f"{hop} {sorted(values)[len(values) // 2]:.3f}" for hop, values in p50s.items()))
        self.mesh.check_unchanged()

    def floor(self) -> None:
        """A bare relay for each client, paced as at c=1, with the first model's request."""
        size = len(self.requests[self.plan.models[0]])
        for client in RELAY_CLIENTS:  # the clients the report names
            with tempfile.TemporaryDirectory(prefix="meshserve-relay-") as work:
                _, paced, straight = measure_relay(size, self.plan.floor_messages,
                                                   self.plan.floor_paced, PACE_MS / 1e3,
                                                   Path(work), client)
            self.measured.relay_cpu_s[client] = paced.relay_us / 1e6
            self.measured.relay_added_ms[client] = paced.p50_ms - straight.p50_ms
            self.say(f"  bare relay on {client}: {paced.relay_us:.0f} µs CPU per message "
                     f"paced, adds {paced.p50_ms - straight.p50_ms:.3f} ms to the p50")

    def idle(self) -> None:
        """The mesh's CPU and RSS once the load has stopped and it has settled."""
        time.sleep(self.plan.settle_s)
        processes = self.mesh.processes
        ticks = os.sysconf("SC_CLK_TCK")
        for _ in range(self.plan.idle_windows):
            with Sampler(p.pid for p in processes) as sampler:
                time.sleep(self.plan.idle_s)
            first, last = sampler.samples[0].at, sampler.samples[-1].at
            cpu = cpu_seconds(sampler.samples, [p.pid for p in processes], first, last, ticks)
            self.measured.idle_cpu_percent.append(100 * cpu / (last - first))
        largest_by_kind(sampler.rss_max, processes, self.measured.rss_idle_mib)
        self.mesh.check_unchanged()
        self.say("  idle: " + ", ".join(f"{v:.1f} %" for v in self.measured.idle_cpu_percent))

    def profile(self, out_dir: Path) -> list[str]:
        """py-spy profiles of the hops of the first model under a c=32 load."""
        model = self.plan.models[0]
        wanted = [p for p in self.mesh.processes
                  if p.kind in ("ingress", "router") or p.name.startswith(
                      (f"batcher-{model}-", f"compute-{model}-"))]
        return record_profiles(wanted, out_dir, self.plan.profile_s, lambda: run_load(
            self.ingress.spec(self.tls, model, self.requests[model], HIGH,
                              self.plan.profile_s + 2, 1.0)))
