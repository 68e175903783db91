"""`meshserve bench compare`: meshserve against NVIDIA Triton and the in-process limit.

One run, one machine, the same TorchScript files (the demo repository that
`write_demo_repository` writes), for each demo model:

1. **limit**: the model called in-process (``torch.jit.load``, one intra-op thread like
   meshserve's compute default, ``torch.inference_mode``) at batch 1 and at every batch size of
   `BATCH_SIZES`, a fixed short time each; the best batch size's rows/s is the ceiling.
2. **meshserve**: the embedded default of ``meshserve up`` (every service a local process,
   mutual TLS at the ingress, compute on the CPU), started with `meshserve.tools.up`.
3. **triton**: ``tritonserver`` from nvidia-pytriton (installed on demand into a cache
   environment, see `meshserve.tools.triton_baseline`) with a Python-backend model per demo
   model that loads the same TorchScript file; 1 ms queue delay, one CPU instance.

Each server in turn (never two at once) gets a closed-loop `run_load` per model, concurrency
and transport. Before and after each run, ``ModelStatistics`` is read (for meshserve through
the ingress) and the difference gives a per-hop breakdown: batcher queue time per request,
compute time per request (input + infer + output of the batches the request was in), and the
rest of the client's p50 (for meshserve: ingress + router + transport). The statistics also
cover the run's warm-up, so they are averages over slightly more requests than the client's
window.

Results go to ``--out`` (default ``bench-results/<UTC timestamp>/``): ``results.jsonl`` (every
raw JSON line: limit measurements, bench results, statistics), ``report.md`` (the tables that
are also printed), ``logs/`` (server logs) and ``latency-throughput.png`` when matplotlib is
importable (it is not a dependency).
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from meshserve.tools.compare_runs import (
    MODELS,
    SERVERS,
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
    HOP_HEADERS,
    LIMIT_HEADERS,
    best_batch,
    comparison_rows,
    hop_rows,
    limit_rows,
    markdown_table,
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
                        cert=tls / "client.crt", key=tls / "client.key", server_name="ingress")
        bench_target(target, plan, recorder)
    finally:
        stop_all(list(reversed(children)), grace=7.0)
        logs = recorder.out_dir / "logs" / "meshserve"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (data_dir / "run").glob("*.log"):
            shutil.copyfile(log, logs / log.name)


def run_triton(data_dir: Path, work_dir: Path, plan: Plan, recorder: Recorder,
               triton_root: Path | None, timeout_s: float) -> None:
    from meshserve.tools import triton_baseline, triton_repository

    installed = triton_baseline.install(triton_root, say=recorder.say)
    repository = work_dir / "triton-models"
    versions = triton_repository.write_repository(data_dir / "models", repository, plan.models)
    backends = triton_baseline.backend_directory(installed, work_dir / "triton-backends")
    recorder.write({"kind": "triton", "tritonserver": str(installed.tritonserver),
                    "versions": versions,
                    "queue_delay_us": triton_repository.QUEUE_DELAY_US})
    recorder.say("starting Triton (Python backend, KIND_CPU x1, 1 ms queue delay)")
    runs = list(plan.runs())
    while runs:
        server = triton_baseline.TritonServer(installed, repository, backends,
                                              recorder.out_dir / "logs" / "triton.log",
                                              plan.models, timeout_s=timeout_s)
        with server:
            recorder.say(f"  ready  tritonserver       {server.address}")
            while runs and server.process.poll() is None:
                bench_one(Target("triton", server.address), plan, *runs.pop(0), recorder)
            if runs:  # it died under the last load: say so, start it again for the rest
                crash = f"tritonserver exited with {server.process.returncode} under load"
                recorder.failures.append(crash)
                recorder.write({"kind": "failure", "server": "triton", "error": crash})
                recorder.say(f"  {crash}; starting it again")


def report(plan: Plan, recorder: Recorder, elapsed_s: float) -> str:
    limits = {m: best_batch({b: v["rows_per_s"] for b, v in by.items()})[1]
              for m, by in recorder.limits.items()}
    parts = [
        "## meshserve vs Triton (closed loop, batch 1 per request)\n\n",
        markdown_table(COMPARISON_HEADERS, comparison_rows(plan.runs(), recorder.results,
                                                           limits)),
        "\nmeshserve/limit: meshserve throughput over the in-process best-batch rows/s.\n",
        "\n## In-process limit (torch.jit.load, 1 thread, inference_mode)\n\n",
        markdown_table(LIMIT_HEADERS, limit_rows(recorder.limits)),
        "\n## Per-hop breakdown\n\n"
        "From ModelStatistics before and after each run (read through the ingress for "
        "meshserve; averages, warm-up included): batcher queue time per request, compute time "
        "(input + infer + output) of the batch each request was in, and the rest of the "
        "client's latency — for meshserve ingress+router+transport, for Triton its frontend "
        "and transport. The p50 rest subtracts means from a median, as asked; the mean rest "
        "compares like with like.\n\n",
        markdown_table(HOP_HEADERS, hop_rows(recorder.hops)),
        f"\n{len(recorder.results)} runs of {plan.duration_s:g} s (+{plan.warmup_s:g} s warm-up)"
        f" in {elapsed_s:.0f} s total.\n",
    ]
    if recorder.failures:
        parts.append("\n## Failures\n\n" + "".join(f"- {f}\n" for f in recorder.failures))
    return "".join(parts)


def compare(plan: Plan, out_dir: Path, triton_root: Path | None = None,
            servers: Iterable[str] = SERVERS, timeout_s: float = 180.0,
            say: Callable[[str], None] = print) -> int:
    """Runs the whole comparison; returns 0 when every run completed without errors."""
    from meshserve.common.repository import ModelRepository
    from meshserve.tools.demo_repository import write_demo_repository

    servers = tuple(servers)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out_dir, say)
    say(f"bench compare: {len(plan.runs())} runs per server, ~{plan.load_seconds(len(servers)):.0f}"
        f" s under load; results in {out_dir}")
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
        steps: list[tuple[str, Callable[[], None]]] = []
        if "triton" in servers:
            # Install first: it is the slowest step on a fresh machine and the likeliest to fail.
            from meshserve.tools import triton_baseline

            steps.append(("triton install",
                          lambda: triton_baseline.install(triton_root, say=say)))
        steps.append(("limit", lambda: measure_limits(data_dir / "models", plan, recorder)))
        if "meshserve" in servers:
            steps.append(("meshserve",
                          lambda: run_meshserve(data_dir, plan, recorder, timeout_s)))
        if "triton" in servers:
            steps.append(("triton", lambda: run_triton(data_dir, work_dir, plan, recorder,
                                                       triton_root, timeout_s)))
        failed: set[str] = set()
        for name, step in steps:
            if name == "triton" and "triton install" in failed:
                continue
            say(f"[{time.monotonic() - started:5.0f} s] {name}")
            try:
                step()
            except Exception as error:  # one step failing must not stop the others
                failed.add(name)
                recorder.failures.append(f"{name}: {type(error).__name__}: {error}")
                recorder.write({"kind": "failure", "step": name, "error": str(error),
                                "traceback": traceback.format_exc()})
                say(f"  FAILED {name}: {type(error).__name__}: {error}")
    elapsed = time.monotonic() - started
    text = report(plan, recorder, elapsed)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    say("")
    say(text)
    say(p99_by_model(recorder.results, recorder.limits, out_dir / "latency-throughput.png"))
    say(f"results: {out_dir}/results.jsonl, {out_dir}/report.md")
    expected = len(plan.runs()) * len(servers)
    complete = len(recorder.results) == expected and not recorder.failures
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
        return compare(plan, out_dir, args.triton_dir, args.servers, args.timeout)
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
        help="meshserve vs NVIDIA Triton vs the in-process limit, on the demo models",
        description="Runs the demo models in-process, on meshserve (embedded default) and on "
        "Triton (nvidia-pytriton, installed on demand), one server at a time, and writes a "
        "Markdown report and raw JSON lines to a dated folder.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="concurrency 1 and 32, unary, ~3 s each (default: 1, 8, 32, 128; "
                        "unary and stream; 12 s each)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench-results/<UTC timestamp>/)")
    parser.add_argument("--triton-dir", type=Path, default=None,
                        help="Triton cache environment (default ~/.cache/meshserve/triton)")
    parser.add_argument("--models", type=_models, default=None,
                        help="comma list of demo models (default mlp,cnn)")
    parser.add_argument("--servers", type=_servers, default=SERVERS,
                        help="comma list of meshserve,triton (default both)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per run (overrides the plan's)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up seconds per run (overrides the plan's)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds each server may take to become ready (default 180)")
    parser.set_defaults(func=_cmd_compare)

