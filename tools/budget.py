"""The arithmetic of `meshserve bench budget`: readings of /proc and of load runs → figures.

Pure functions, no I/O: `meshserve.tools.budget_run` measures, this module turns what it
measured into figures, each with its budget (from `benchmarks/budget.toml`) and a verdict.

Units:

* **B**, the bare call: the server CPU of one call to a bare `grpc.aio` unary server with
  mutual TLS that answers a constant, driven at concurrency 32 (see `meshserve.tools.
  budget_bare`). CPU figures are given in B, so that a machine twice as fast today as
  yesterday shows the same figure.
* **bare p50**: the p50 round trip of that server at concurrency 1, with the model's own
  request: the unit of the latency each hop adds.

/proc: a process's CPU is ``utime + stime`` of ``/proc/PID/stat`` (clock ticks, all its
threads), its memory ``VmRSS`` of ``/proc/PID/status``.

One module of ~450 lines on purpose: each figure's formula, its budget and its verdict read
together, top to bottom, and `tests/unit/test_budget.py` tables them in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshserve.tools.compare_tables import median, ratio

# The service kinds whose CPU per request has a budget, in the order of a request's path.
KINDS = ("ingress", "router", "batcher", "compute")
# Every process `meshserve up` runs: itself, and the services it starts.
PROCESS_KINDS = ("up", "control-plane", *KINDS)
# A request's hops, outermost first, ending at the bare server they are differenced against.
HOPS = ("ingress", "router", "batcher", "compute", "bare")

UNDER, OVER, FAR_OVER, MISSING = "under", "over", "over (> 2x)", "not measured"
# How the floor's bare relay calls onwards (`meshserve bench relay --client`), as it is named
# in the report: as the ingress and the batchers call, and as the router calls (xDS).
RELAY_CLIENTS = {"http2": "hops' own client", "grpc": "grpc.aio, as the router"}


# ---------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class ProcStat:
    """What a budget reads from ``/proc/PID/stat``."""

    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime, in clock ticks


def parse_stat(text: str) -> ProcStat:
    """``/proc/PID/stat``. The command name (field 2) is in parentheses and may itself hold
    spaces and parentheses, so the fields after it are counted from the last ``)``."""
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError(f"not a /proc stat line: {text[:60]!r}")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()  # fields 3 (state) onwards
    if len(fields) < 13:
        raise ValueError(f"/proc stat line of pid {pid} has {len(fields) + 2} fields, not >= 15")
    return ProcStat(pid=pid, ppid=int(fields[1]), cpu_ticks=int(fields[11]) + int(fields[12]))


def parse_rss_mib(text: str) -> float | None:
    """``VmRSS`` of ``/proc/PID/status`` in MiB; None when absent (a kernel thread, a zombie)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmRSS in {unit!r}, expected kB")
            return int(value) / 1024
    return None


@dataclass(frozen=True)
class ServiceProcess:
    """A process of the mesh: its kind (`PROCESS_KINDS`) and name (``compute-mlp-1``)."""

    pid: int
    kind: str
    name: str


_CLI = "meshserve.tools.cli"


def service_of(pid: int, argv: Sequence[str]) -> ServiceProcess | None:
    """The mesh process a command line names, or None.

    `up` starts each service as ``python -m meshserve.tools.cli KIND ... --port-file=
    DIR/run/NAME.port``; the name is that file's stem (the kind when there is none).
    """
    for index, arg in enumerate(argv[:-1]):
        if arg == _CLI or arg.endswith("/meshserve"):
            kind = argv[index + 1]
            break
    else:
        return None
    if kind not in PROCESS_KINDS:
        return None
    name = kind
    for arg in argv:
        if arg.startswith("--port-file="):
            name = arg.rsplit("/", 1)[-1].removesuffix(".port")
    return ServiceProcess(pid, kind, name)


MODEL_CPU_METRIC = "meshserve_compute_model_cpu_seconds_total"


def model_cpu_seconds(metrics_text: str) -> float:
    """The CPU a compute's models took themselves, summed over its series, from its
    Prometheus text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(MODEL_CPU_METRIC):
            total += float(line.rsplit(" ", 1)[1])
    return total


def model_share(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The share of compute's CPU its models took between two readings, each (model CPU
    seconds, compute CPU seconds); None when compute spent nothing in between."""
    spent = after[1] - before[1]
    if spent <= 0:
        return None
    return min(1.0, max(0.0, (after[0] - before[0]) / spent))


# ---------------------------------------------------------------------------------------------
# CPU over a window


@dataclass(frozen=True)
class Sample:
    """CPU ticks of some processes, read at ``at`` (seconds since the epoch)."""

    at: float
    ticks: Mapping[int, int]


def ticks_at(samples: Sequence[Sample], pid: int, at: float) -> float:
    """The CPU ticks of `pid` at time `at`, interpolated linearly between the samples around
    it (samples in time order). Raises ValueError when `at` is outside the samples that have
    `pid` (the process started late or ended early)."""
    known = [s for s in samples if pid in s.ticks]
    if not known or not known[0].at <= at <= known[-1].at:
        raise ValueError(f"no CPU readings of pid {pid} around {at:.3f}")
    for before, after in zip(known, known[1:]):
        if before.at <= at <= after.at:
            span = after.at - before.at
            share = (at - before.at) / span if span > 0 else 1.0
            return before.ticks[pid] + share * (after.ticks[pid] - before.ticks[pid])
    return float(known[-1].ticks[pid])


def cpu_seconds(samples: Sequence[Sample], pids: Iterable[int], start: float, end: float,
                ticks_per_s: int) -> float:
    """CPU seconds the processes `pids` used together from `start` to `end`."""
    ticks = sum(ticks_at(samples, pid, end) - ticks_at(samples, pid, start) for pid in pids)
    return ticks / ticks_per_s


def cpu_by_kind(samples: Sequence[Sample], processes: Iterable[ServiceProcess], start: float,
                end: float, ticks_per_s: int) -> dict[str, float]:
    """CPU seconds of each kind of process (all its processes together) over a window."""
    pids: dict[str, list[int]] = {}
    for process in processes:
        pids.setdefault(process.kind, []).append(process.pid)
    return {kind: cpu_seconds(samples, found, start, end, ticks_per_s)
            for kind, found in pids.items()}


def largest_by_kind(values: dict[int, float], processes: Iterable[ServiceProcess],
                    into: dict[str, float]) -> None:
    """Fold per-pid values into the largest per kind (`into` keeps earlier maxima)."""
    for process in processes:
        if process.pid in values:
            into[process.kind] = max(values[process.pid], into.get(process.kind, 0.0))


def most_answered(results: Iterable[dict]) -> str:
    """The version that answered most requests over some load results."""
    counts: dict[str, int] = {}
    for result in results:
        for version, count in result["versions"].items():
            counts[version] = counts.get(version, 0) + count
    return max(sorted(counts), key=lambda v: counts[v])


# ---------------------------------------------------------------------------------------------
# Measurements and figures


@dataclass(frozen=True)
class Window:
    """One measured load window: requests answered in it, CPU seconds per process kind, and
    the part of compute's CPU its models took themselves (as the computes counted it)."""

    requests: int
    cpu_s: Mapping[str, float]
    model_cpu_s: float | None = None

    def model_per_request(self) -> float | None:
        if self.requests <= 0 or self.model_cpu_s is None:
            return None
        return self.model_cpu_s / self.requests

    def per_request(self, kinds: Iterable[str]) -> float | None:
        """CPU seconds per answered request of `kinds` together; None without requests."""
        if self.requests <= 0:
            return None
        return sum(self.cpu_s.get(kind, 0.0) for kind in kinds) / self.requests


def hop_added(p50_ms: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """The p50 each hop adds, in bare p50s. `p50_ms[hop][r]` is the p50 of round `r` at each
    of `HOPS`; per round, a hop adds its p50 less the p50 of the hop behind it (compute: less
    the bare server's), over the bare server's p50 of that round; the figure is the median
    over rounds (differences within a round, so that a machine slowing down between rounds
    shifts both sides alike)."""
    rounds = min((len(p50_ms.get(hop, ())) for hop in HOPS), default=0)
    added = {}
    for hop, behind in zip(HOPS, HOPS[1:]):
        added[hop] = median(ratio(p50_ms[hop][r] - p50_ms[behind][r], p50_ms["bare"][r])
                            for r in range(rounds))
    return added


@dataclass
class Measured:
    """Everything one budget run measured (raw seconds, milliseconds and MiB).

    `bare` windows carry the bare server's CPU under ``"bare"``; `load` is keyed by
    (model, concurrency); `hop_p50_ms[model][hop]` holds one p50 per round, `HOPS` as keys;
    the in-process model figures hold one value per round too (their medians count).
    """

    bare: list[Window] = field(default_factory=list)
    load: dict[tuple[str, int], list[Window]] = field(default_factory=dict)
    model_cpu_per_sample_s: dict[str, list[float]] = field(default_factory=dict)
    model_p50_ms: dict[str, list[float]] = field(default_factory=dict)  # batch 1
    # CPU at batch 1 after a pause over back to back (see budget_measure.PAUSE_S)
    model_paused_ratio: dict[str, list[float]] = field(default_factory=dict)
    # The batcher's own Python, the same way (see budget_python)
    batcher_paused_ratio: list[float] = field(default_factory=list)
    hop_p50_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # The floor: a bare relay paced as at concurrency 1 (`bench relay`), by its client
    # (`RELAY_CLIENTS`): its CPU per message (s), and the p50 it adds to a call (ms)
    relay_cpu_s: dict[str, float] = field(default_factory=dict)
    relay_added_ms: dict[str, float] = field(default_factory=dict)
    idle_cpu_percent: list[float] = field(default_factory=list)
    rss_idle_mib: dict[str, float] = field(default_factory=dict)  # kind -> largest process
    rss_load_mib: dict[str, float] = field(default_factory=dict)

    def bare_call_s(self) -> float | None:
        """B: the bare server's CPU per answered call (median of the windows)."""
        return median(w.per_request(["bare"]) for w in self.bare)

    def per_request_s(self, model: str, concurrency: int, kinds: Iterable[str]) -> float | None:
        kinds = tuple(kinds)
        return median(w.per_request(kinds) for w in self.load.get((model, concurrency), []))

    def model_per_request_s(self, model: str, concurrency: int) -> float | None:
        """The models' own CPU per request inside compute (median of the windows)."""
        return median(w.model_per_request() for w in self.load.get((model, concurrency), []))

    def serving_per_request_s(self, model: str, concurrency: int) -> float | None:
        """Compute's CPU per request beyond its models' own (median of the windows)."""
        windows = self.load.get((model, concurrency), [])
        return median(None if w.model_cpu_s is None or w.requests <= 0 else
                      (w.cpu_s.get("compute", 0.0) - w.model_cpu_s) / w.requests
                      for w in windows)


@dataclass(frozen=True)
class Budgets:
    """The budget file: CPU per request at concurrency 32 (B) for each kind of `KINDS`
    (compute's plus the model's own CPU per sample), the whole mesh's c=1 / c=32 ratio, the
    p50 each hop may add (bare p50s; compute's plus the model's own p50 at batch 1), the idle
    mesh's CPU (% of one core) and RSS (MiB) per process kind, idle and under load."""

    cpu_per_request_b: Mapping[str, float]
    concurrency_1_ratio: float
    hop_p50: float
    idle_cpu_percent: float
    rss_idle_mib: Mapping[str, float]
    rss_load_mib: Mapping[str, float]


def _number(table: Mapping, key: str, where: str) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"budget file: {where}.{key} must be a number > 0, got {value!r}")
    return float(value)


def _table(data: Mapping, key: str, where: str = "") -> Mapping:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"budget file: [{where}{key}] is missing")
    return value


def parse_budgets(data: Mapping) -> Budgets:
    """The budget file's content (as `tomllib` reads it); ValueError names a bad key."""
    cpu = _table(data, "cpu_per_request")
    mesh = _table(data, "concurrency_1")
    latency = _table(data, "latency")
    idle = _table(data, "idle")
    rss = _table(data, "rss_mib")
    rss_idle, rss_load = _table(rss, "idle", "rss_mib."), _table(rss, "load", "rss_mib.")
    unknown = sorted(set(rss_idle) - set(PROCESS_KINDS) | set(rss_load) - set(PROCESS_KINDS))
    if unknown:
        raise ValueError(f"budget file: unknown process kinds under [rss_mib]: "
                         f"{', '.join(unknown)}; known: {', '.join(PROCESS_KINDS)}")
    return Budgets(
        cpu_per_request_b={k: _number(cpu, k, "cpu_per_request") for k in KINDS},
        concurrency_1_ratio=_number(mesh, "whole_mesh_ratio", "concurrency_1"),
        hop_p50=_number(latency, "hop_added_p50", "latency"),
        idle_cpu_percent=_number(idle, "cpu_percent", "idle"),
        rss_idle_mib={k: _number(rss_idle, k, "rss_mib.idle") for k in rss_idle},
        rss_load_mib={k: _number(rss_load, k, "rss_mib.load") for k in rss_load},
    )


@dataclass(frozen=True)
class Figure:
    """One line of the report: a measured value, in `unit`, against its budget (if any).
    `gated`: the figure `--gate` guards (CI's one speed gate): the whole mesh's CPU per
    request at concurrency 32 against the four kinds' budgets together plus the model's own
    CPU as compute counted it (a gated figure without a value or a budget fails). Each kind,
    the c=1 / c=32 ratio, latency, idle CPU and memory are reported against their budgets
    but never fail a run: on a shared 2-core machine a kind's share and the c=1 figure move
    from run to run of one build by more than the gate's margin."""

    name: str
    value: float | None
    unit: str
    budget: float | None = None
    note: str = ""
    gated: bool = False

    @property
    def verdict(self) -> str:
        return verdict(self.value, self.budget)

    def to_json(self) -> dict:
        return {"name": self.name, "measured": _rounded(self.value), "unit": self.unit,
                "budget": _rounded(self.budget), "verdict": self.verdict, "note": self.note}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def verdict(value: float | None, budget: float | None) -> str:
    """"" without a budget; else under (≤ budget), over, or over (> 2x) past twice it."""
    if budget is None:
        return ""
    if value is None:
        return MISSING
    if value <= budget:
        return UNDER
    return OVER if value <= 2 * budget else FAR_OVER


def past_gate(figures: Iterable[Figure], factor: float) -> list[Figure]:
    """Gated figures past `factor` × their budget, or not measured."""
    return [f for f in figures if f.gated
            and (f.value is None or f.budget is None or f.value > factor * f.budget)]


def figures(measured: Measured, budgets: Budgets, models: Sequence[str],
            concurrencies: Sequence[int] = (1, 32)) -> list[Figure]:
    """Every figure of a run, in report order. Figures of what was not measured are left out
    (a model or concurrency the run skipped); a measurement that failed shows as None."""
    bare = measured.bare_call_s()
    out = [Figure("B: bare call server CPU, c=32", _micro(bare), "µs")]
    if measured.batcher_paused_ratio:
        out.append(Figure("batcher's Python per group of one, after a pause / back to back",
                          median(measured.batcher_paused_ratio), "x",
                          note="in-process: what a pause between requests alone costs"))
    low, high = min(concurrencies), max(concurrencies)
    for model in models:
        p50s = measured.hop_p50_ms.get(model, {})
        bare_p50 = median(p50s.get("bare", []))
        if p50s:
            out.append(Figure(f"{model} bare p50, c=1", bare_p50, "ms"))
        model_b = ratio(median(measured.model_cpu_per_sample_s.get(model, [])), bare)
        out.append(Figure(f"{model} model CPU per sample (batch 16, 1 thread)", model_b, "B"))
        if model in measured.model_paused_ratio:
            out.append(Figure(f"{model} model CPU at batch 1, after a pause / back to back",
                              median(measured.model_paused_ratio[model]), "x",
                              note="in-process: what a pause between requests alone costs"))
        for concurrency in sorted(concurrencies, reverse=True):
            if (model, concurrency) not in measured.load:
                continue
            for kind in KINDS:
                value = ratio(measured.per_request_s(model, concurrency, [kind]), bare)
                name = f"{model} c={concurrency} {kind} CPU per request"
                if concurrency != high:
                    out.append(Figure(name, value, "B"))
                    if kind == "compute":
                        out.extend(_compute_split(measured, model, concurrency, bare))
                elif kind != "compute":
                    out.append(Figure(name, value, "B", budgets.cpu_per_request_b[kind]))
                else:
                    out.extend(_compute_figures(measured, budgets, model, concurrency, value,
                                                model_b, bare))
            whole = ratio(measured.per_request_s(model, concurrency, KINDS), bare)
            name = f"{model} c={concurrency} whole mesh CPU per request"
            if concurrency != high:
                out.append(Figure(name, whole, "B"))
                continue
            inside = ratio(measured.model_per_request_s(model, concurrency), bare)
            budget = None if inside is None else (
                sum(budgets.cpu_per_request_b[kind] for kind in KINDS) + inside)
            out.append(Figure(name, whole, "B", budget,
                              "the four budgets plus the model's CPU inside compute",
                              gated=True))
        if (model, low) in measured.load and (model, high) in measured.load and low != high:
            out.append(Figure(
                f"{model} whole mesh CPU per request, c={low} / c={high}",
                ratio(measured.per_request_s(model, low, KINDS),
                      measured.per_request_s(model, high, KINDS)),
                "x", budgets.concurrency_1_ratio))
            out.append(Figure(
                f"{model} whole mesh CPU per request beyond its model, c={low} / c={high}",
                ratio(_beyond_model(measured, model, low), _beyond_model(measured, model, high)),
                "x", note="what concurrency amortises in the hops and compute's serving alone"))
        if p50s:
            added = hop_added(p50s)
            model_p50 = ratio(median(measured.model_p50_ms.get(model, [])), bare_p50)
            for hop in HOPS[:-1]:
                budget = budgets.hop_p50
                note = ""
                if hop == "compute":
                    budget = None if model_p50 is None else budget + model_p50
                    note = "plus the model's own p50 at batch 1"
                out.append(Figure(f"{model} p50 added by {hop}, c=1", added[hop], "bare p50",
                                  budget, note))
    out.extend(_floor(measured, bare, models))
    if measured.idle_cpu_percent:
        out.append(Figure("idle mesh CPU (every process of up)",
                          median(measured.idle_cpu_percent), "% core",
                          budgets.idle_cpu_percent))
    for label, rss, rss_budgets in (("idle", measured.rss_idle_mib, budgets.rss_idle_mib),
                                    ("under load", measured.rss_load_mib, budgets.rss_load_mib)):
        for kind in PROCESS_KINDS if label == "idle" else KINDS:
            if kind in rss:
                out.append(Figure(f"RSS {label}: {kind} (largest process)", rss[kind], "MiB",
                                  rss_budgets.get(kind)))
    return out


def _floor(measured: Measured, bare: float | None, models: Sequence[str]) -> list[Figure]:
    """What a relay with none of meshserve's work costs at concurrency 1, in the units of the
    hops' figures (its added p50 in the first model's bare p50s): the floor under each hop's
    c=1 CPU and p50 added on this machine, measured in the same run."""
    bare_p50 = median(measured.hop_p50_ms.get(models[0], {}).get("bare", [])) if models else None
    out = []
    for client, label in RELAY_CLIENTS.items():
        if client in measured.relay_cpu_s:
            note = "a bare relay, paced as at c=1 (bench relay): no meshserve code in it"
            out += [Figure(f"floor: bare relay CPU per message, c=1, {label}",
                           ratio(measured.relay_cpu_s[client], bare), "B", note=note),
                    Figure(f"floor: p50 added by a bare relay, c=1, {label}",
                           ratio(measured.relay_added_ms.get(client), bare_p50), "bare p50",
                           note=note)]
    return out


def _compute_figures(measured: Measured, budgets: Budgets, model: str, concurrency: int,
                     value: float | None, model_b: float | None,
                     bare: float | None) -> list[Figure]:
    """Compute's CPU per request against its share plus the model's cost in this process
    (batch 16, warm caches: reported), and without what its models took themselves as
    compute counted it (at the batch sizes the mesh formed)."""
    own = budgets.cpu_per_request_b["compute"]
    return [Figure(f"{model} c={concurrency} compute CPU per request", value, "B",
                   None if model_b is None else own + model_b,
                   "plus the model's own CPU per sample (in-process, batch 16)"),
            *_compute_split(measured, model, concurrency, bare, own)]


def _compute_split(measured: Measured, model: str, concurrency: int, bare: float | None,
                   own: float | None = None) -> list[Figure]:
    """Compute's CPU per request in two: what its models took themselves, as compute counted
    it, and the rest (against `own`, its budget, when given)."""
    prefix = f"{model} c={concurrency}"
    return [
        Figure(f"{prefix} model CPU per request inside compute",
               ratio(measured.model_per_request_s(model, concurrency), bare), "B"),
        Figure(f"{prefix} compute CPU per request beyond its model",
               ratio(measured.serving_per_request_s(model, concurrency), bare), "B", own),
    ]


def _beyond_model(measured: Measured, model: str, concurrency: int) -> float | None:
    """The whole mesh's CPU per request less what the model took inside compute."""
    whole = measured.per_request_s(model, concurrency, KINDS)
    inside = measured.model_per_request_s(model, concurrency)
    return None if whole is None or inside is None else whole - inside


def _micro(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


# ---------------------------------------------------------------------------------------------
# Report


def _value_text(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("MiB", "µs"):
        return f"{value:,.0f} {unit}"
    if unit == "% core":
        return f"{value:.1f} %"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3f} {unit}"


def report_lines(figures_: Iterable[Figure]) -> list[str]:
    """One line per figure: name, measured, budget, verdict (and a note)."""
    rows = [(f.name, _value_text(f.value, f.unit),
             "—" if f.budget is None else _value_text(f.budget, f.unit),
             f.verdict, f.note) for f in figures_]
    width = max([len("figure")] + [len(r[0]) for r in rows])
    lines = [f"{'figure':<{width}}  {'measured':>16}  {'budget':>16}  verdict"]
    for name, value, budget, word, note in rows:
        line = f"{name:<{width}}  {value:>16}  {budget:>16}  {word}"
        lines.append(f"{line}  ({note})" if note and word else line.rstrip())
    return lines


__all__ = [
    "HOPS",
    "KINDS",
    "PROCESS_KINDS",
    "RELAY_CLIENTS",
    "Budgets",
    "Figure",
    "Measured",
    "ProcStat",
    "Sample",
    "ServiceProcess",
    "Window",
    "cpu_by_kind",
    "cpu_seconds",
    "figures",
    "hop_added",
    "largest_by_kind",
    "most_answered",
    "parse_budgets",
    "parse_rss_mib",
    "parse_stat",
    "past_gate",
    "report_lines",
    "service_of",
    "ticks_at",
    "verdict",
]
