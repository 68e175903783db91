"""`meshserve bench budget`: the speed budget of `meshserve up`, measured in one run.

It starts ``meshserve up`` as shipped (its own temporary data directory, any free port,
compute on the CPU; metrics, authentication and logging at their defaults) and, beside it,
the bare server of `meshserve.tools.budget_bare`; drives both with the load generator of
`meshserve.tools.load` (closed loop, unary, one client process, unpinned requests of one
random row as a client sends them); and reads /proc for every process `up` started (its
children, named by their command lines). Everything that is compared is measured in the same
run, and rounds are interleaved (bare, then each model at c=32 and c=1, round after round) so
that a machine that slows down mid-run slows every figure alike. Each figure is the median of
its rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from meshserve.tools.arguments import positive_float
from meshserve.tools.budget import (
    Budgets,
    Figure,
    Measured,
    figures,
    parse_budgets,
    past_gate,
    report_lines,
)
from meshserve.tools.budget_measure import FULL, HIGH, LOW, QUICK, BudgetRun, Plan
from meshserve.tools.budget_proc import (
    BareServer,
    MeshUp,
    idle_cores,
    py_spy,
)

DEFAULT_BUDGET = Path(__file__).resolve().parents[1] / "benchmarks" / "budget.toml"
READY_TIMEOUT_S = 240.0


# ---------------------------------------------------------------------------------------------
# The whole run


def default_out_dir(now: datetime.datetime | None = None) -> Path:
    now = now or datetime.datetime.now(datetime.UTC)
    return Path("bench-results") / f"budget-{now.strftime('%Y%m%dT%H%M%SZ')}"


def load_budgets(path: Path) -> Budgets:
    try:
        return parse_budgets(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"budget file {path}: {error}") from None


def measure(plan: Plan, data_dir: Path, out_dir: Path, profile: bool,
            say: Callable[[str], None]) -> tuple[Measured, list[dict], list[str]]:
    """Starts the mesh (in `data_dir`) and the bare server, measures, stops them. Returns
    what was measured, every load result, and notes (the machine's idle cores, profiling)."""
    idle = idle_cores()
    notes = [] if idle is None else [idle]
    started = time.monotonic()
    mesh = MeshUp(data_dir, out_dir / "up.log")
    bare = None
    try:
        mesh.wait_ready(READY_TIMEOUT_S)
        say(f"[{time.monotonic() - started:4.0f} s] meshserve up ready at {mesh.endpoint} "
            f"({len(mesh.processes)} processes)")
        bare = BareServer(data_dir / "tls", data_dir.parent)
        run = BudgetRun(plan, mesh, bare, say)
        for name, step in (("load", run.loads), ("hops", run.hops), ("floor", run.floor)):
            say(f"[{time.monotonic() - started:4.0f} s] {name}")
            step()
        if profile:
            say(f"[{time.monotonic() - started:4.0f} s] profiles")
            notes += run.profile(out_dir / "profiles")
        bare.stop()
        say(f"[{time.monotonic() - started:4.0f} s] idle")
        run.idle()
        return run.measured, run.results, notes
    finally:
        if bare is not None:
            bare.stop()
        mesh.stop()
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (mesh.data_dir / "run").glob("*.log"):
            shutil.copyfile(log, logs / log.name)


def run_budget(plan: Plan, budgets: Budgets, out_dir: Path, *, gate: float | None = None,
               profile: bool = False, as_json: bool = False,
               say: Callable[[str], None] = print) -> int:
    """Measures, prints the figures and writes them to `out_dir`; 1 when a figure is past
    `gate` × its budget, else 0."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-budget-") as temp:
        data_dir = Path(temp) / "mesh"
        measured, results, notes = measure(plan, data_dir, out_dir, profile, say)
    found = figures(measured, budgets, plan.models, (LOW, HIGH))
    elapsed = time.monotonic() - started
    failing = past_gate(found, gate) if gate is not None else []
    document = {"figures": [f.to_json() for f in found], "gate": gate,
                "past_gate": [f.name for f in failing], "elapsed_s": round(elapsed, 1),
                "notes": notes, "data_dir": str(data_dir),
                "plan": plan.__dict__ | {"models": list(plan.models)}}
    (out_dir / "budget.json").write_text(json.dumps(document, indent=2) + "\n")
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    lines = report_lines(found)
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(lines))
    for note in notes:
        say(f"note: {note}")
    say(f"budget run took {elapsed:.0f} s; results in {out_dir}")
    if failing:
        say(f"past {gate:g}x the budget: " + "; ".join(_failure(f) for f in failing))
        return 1
    return 0


def _failure(figure: Figure) -> str:
    measured = "not measured" if figure.value is None else f"{figure.value:.3g}"
    budget = "not known" if figure.budget is None else f"{figure.budget:.3g}"
    return f"{figure.name} {measured} {figure.unit} (budget {budget})"


# ---------------------------------------------------------------------------------------------
# Command line


def _cmd_budget(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def terminate(signum, frame) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: the mesh is stopped

    try:
        budgets = load_budgets(args.budget)
    except ValueError as error:
        say(f"bench budget: {error}")
        return 2
    if args.profile and py_spy() is None:
        say("bench budget: --profile needs py-spy: .venv/bin/pip install -e '.[profile]'")
        return 2
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run_budget(QUICK if args.quick else FULL, budgets,
                          args.out or default_out_dir(), gate=args.gate, profile=args.profile,
                          as_json=args.json, say=say)
    except (RuntimeError, ValueError) as error:  # the mesh failed, or a reading is missing
        say(f"bench budget: {error}")
        return 2
    except KeyboardInterrupt:
        say("bench budget: interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``budget`` to ``meshserve bench``'s subcommands."""
    parser = commands.add_parser(
        "budget", help="CPU, latency and memory of every hop of `meshserve up` against its "
        "budget", description="Starts `meshserve up` and a bare mutual-TLS gRPC server, "
        "measures each service's CPU per request (in bare calls, B), the p50 each hop adds, the "
        "idle mesh's CPU and each service's RSS, and prints each figure against its budget.")
    parser.add_argument("--quick", action="store_true",
                        help="mlp only, two short rounds (about a minute and a half)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="also write py-spy flame graphs of each hop under load "
                        "(needs py-spy: pip install -e '.[profile]')")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench-results/budget-<UTC time>/)")
    parser.add_argument("--gate", type=positive_float, metavar="FACTOR",
                        help="exit 1 when a CPU-per-request figure is past FACTOR x its budget")
    parser.add_argument("--budget", type=Path, default=DEFAULT_BUDGET,
                        help="the budget file (default benchmarks/budget.toml)")
    parser.set_defaults(func=_cmd_budget)


__all__ = ["FULL", "QUICK", "Plan", "add_parser", "run_budget"]
