"""`meshserve bench budget`: /proc parsing, the CPU and latency arithmetic, verdicts and the
gate, against a small fake mesh (made-up /proc files, readings and windows)."""

from __future__ import annotations

import argparse
import asyncio
import time
import tomllib
from pathlib import Path

import pytest

from meshserve.common.tls import TlsFiles
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools import bench, budget_bare, budget_proc, budget_run
from meshserve.tools.budget import (
    FAR_OVER,
    HOPS,
    KINDS,
    MISSING,
    OVER,
    UNDER,
    Budgets,
    Figure,
    Measured,
    Sample,
    ServiceProcess,
    Window,
    cpu_by_kind,
    figures,
    hop_added,
    largest_by_kind,
    model_cpu_seconds,
    model_share,
    most_answered,
    parse_budgets,
    parse_rss_mib,
    parse_stat,
    past_gate,
    report_lines,
    service_of,
    ticks_at,
    verdict,
)
from meshserve.tools.certs import init_certs
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import LoadSpec

REPO = Path(__file__).resolve().parents[2]


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    """A /proc/PID/stat line with the fields a budget reads (the rest zeros)."""
    return (f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194304 0 0 0 0 {utime} {stime} 0 0 "
            "20 0 1 0 100 0 0\n")


# --- /proc parsing


@pytest.mark.parametrize(("line", "pid", "ppid", "ticks"), [
    (stat_line(42, "python3", 7, 150, 50), 42, 7, 200),
    (stat_line(43, "a (weird) name", 1, 3, 4), 43, 1, 7),  # parentheses inside the name
    (stat_line(44, "two words", 9, 0, 0), 44, 9, 0),
    ("19247 (cat) R 19244 19244 5685 0 -1 4194304 99 0 0 0 12 5 0 0 20 0 1 0 110789 "
     "3133440 356 18446744073709551615 0 0 0 0", 19247, 19244, 17),  # a real line, cut
])
def test_parse_stat(line, pid, ppid, ticks):
    stat = parse_stat(line)
    assert (stat.pid, stat.ppid, stat.cpu_ticks) == (pid, ppid, ticks)


@pytest.mark.parametrize(("line", "message"), [
    ("no parentheses here", "not a /proc stat line"),
    ("5 (short) S 1 2 3", "has 6 fields"),
])
def test_parse_stat_refuses(line, message):
    with pytest.raises(ValueError, match=message):
        parse_stat(line)


@pytest.mark.parametrize(("text", "mib"), [
    ("Name:\tpython3\nVmPeak:\t 9000 kB\nVmRSS:\t  204800 kB\nThreads:\t4\n", 200.0),
    ("Name:\tkthreadd\nThreads:\t1\n", None),  # kernel threads have no VmRSS
])
def test_parse_rss_mib(text, mib):
    assert parse_rss_mib(text) == mib


def test_parse_rss_refuses_other_units():
    with pytest.raises(ValueError, match="VmRSS in 'MB'"):
        parse_rss_mib("VmRSS:\t 12 MB\n")


@pytest.mark.parametrize(("argv", "kind", "name"), [
    (["/v/bin/python", "-m", "meshserve.tools.cli", "compute", "--model=mlp",
      "--port-file=/d/run/compute-mlp-1.port"], "compute", "compute-mlp-1"),
    (["/v/bin/python", "-m", "meshserve.tools.cli", "ingress", "--listen=127.0.0.1:0",
      "--port-file=/d/run/ingress.port"], "ingress", "ingress"),
    (["/v/bin/python", "-m", "meshserve.tools.cli", "router"], "router", "router"),
    (["/v/bin/python", "/v/bin/meshserve", "up", "--data-dir=x"], "up", "up"),
    (["/v/bin/python", "-m", "meshserve.tools.cli", "bench", "run"], None, None),
    (["/v/bin/python", "-m", "pytest", "compute"], None, None),
    ([], None, None),
])
def test_service_of(argv, kind, name):
    found = service_of(11, argv)
    if kind is None:
        assert found is None
    else:
        assert (found.kind, found.name, found.pid) == (kind, name, 11)


def write_process(root: Path, pid: int, ppid: int, argv: list[str], ticks: int = 0,
                  rss_kib: int = 1024) -> None:
    directory = root / str(pid)
    directory.mkdir()
    (directory / "stat").write_text(stat_line(pid, "python3", ppid, ticks, 0))
    (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (directory / "status").write_text(f"Name:\tpython3\nVmRSS:\t{rss_kib} kB\n")


def cli(kind: str, name: str) -> list[str]:
    return ["python", "-m", "meshserve.tools.cli", kind, f"--port-file=/d/run/{name}.port"]


def test_mesh_processes_are_up_and_its_named_children(tmp_path):
    """A fake /proc: `up` (pid 100), three services it started, a grandchild, a stranger."""
    write_process(tmp_path, 100, 1, ["python", "-m", "meshserve.tools.cli", "up"])
    write_process(tmp_path, 101, 100, cli("ingress", "ingress"), ticks=30, rss_kib=2048)
    write_process(tmp_path, 102, 100, cli("batcher", "batcher-mlp-1"))
    write_process(tmp_path, 103, 100, cli("compute", "compute-mlp-1"))
    write_process(tmp_path, 104, 103, cli("compute", "compute-mlp-2"))  # not up's child
    write_process(tmp_path, 105, 100, ["sleep", "10"])  # up's child, but no service
    write_process(tmp_path, 106, 1, cli("router", "router"))  # another mesh's
    (tmp_path / "self").mkdir()
    found = budget_proc.mesh_processes(100, tmp_path)
    assert [(p.pid, p.kind, p.name) for p in found] == [
        (100, "up", "up"), (101, "ingress", "ingress"), (102, "batcher", "batcher-mlp-1"),
        (103, "compute", "compute-mlp-1")]
    assert budget_proc.cpu_ticks(101, tmp_path) == 30
    assert budget_proc.rss_mib(101, tmp_path) == 2.0
    assert budget_proc.cpu_ticks(999, tmp_path) is None  # gone


def test_tree_cpu_ticks_count_the_roots_and_their_descendants(tmp_path):
    """A fake /proc: a server (200) with a child and a grandchild, a second root (300), a
    stranger (400); a root that is gone counts nothing."""
    write_process(tmp_path, 200, 1, ["tritonserver"], ticks=100)
    write_process(tmp_path, 201, 200, ["stub"], ticks=20)
    write_process(tmp_path, 202, 201, ["stub-helper"], ticks=3)
    write_process(tmp_path, 300, 1, ["envoy"], ticks=7)
    write_process(tmp_path, 400, 1, ["envoy"], ticks=1000)
    (tmp_path / "self").mkdir()
    assert budget_proc.tree_cpu_ticks([200], tmp_path) == 123
    assert budget_proc.tree_cpu_ticks([200, 300, 999], tmp_path) == 130
    assert budget_proc.tree_cpu_ticks([201, 200], tmp_path) == 123  # each process once
    assert budget_proc.tree_cpu_ticks([], tmp_path) == 0


def test_a_service_port_file_or_its_first_replicas(tmp_path):
    for name in ("compute-mlp-1", "compute-cnn-1-0", "compute-cnn-1-1"):
        (tmp_path / f"{name}.port").write_text("1")
    assert budget_proc.port_file(tmp_path, "compute-mlp-1") == tmp_path / "compute-mlp-1.port"
    assert budget_proc.port_file(tmp_path, "compute-cnn-1") == tmp_path / "compute-cnn-1-0.port"


def test_idle_cores_from_a_fake_sys(tmp_path):
    assert budget_proc.idle_cores(tmp_path) is None  # Linux says nothing
    driver = tmp_path / "devices/system/cpu/cpuidle/current_driver"
    driver.parent.mkdir(parents=True)
    driver.write_text("intel_idle\n")
    assert budget_proc.idle_cores(tmp_path) == "idle cores: cpuidle driver intel_idle"
    driver.write_text("haltpoll\n")
    polling = tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns"
    polling.parent.mkdir(parents=True)
    polling.write_text("0\n")
    assert budget_proc.idle_cores(tmp_path) == \
        "idle cores: cpuidle driver haltpoll, halt polling 0 ns"


def test_sampler_reads_each_end_and_keeps_the_largest_rss(tmp_path):
    write_process(tmp_path, 7, 1, cli("router", "router"), ticks=5, rss_kib=4096)
    with budget_proc.Sampler([7, 8], tmp_path, interval=60) as sampler:
        (tmp_path / "7" / "stat").write_text(stat_line(7, "python3", 1, 9, 1))
        (tmp_path / "7" / "status").write_text("VmRSS:\t1024 kB\n")
    assert [s.ticks for s in sampler.samples] == [{7: 5}, {7: 10}]  # pid 8 never existed
    assert sampler.rss_max == {7: 4.0}
    largest: dict[str, float] = {"router": 1.0}
    largest_by_kind(sampler.rss_max, [ServiceProcess(7, "router", "router")],
                               largest)
    assert largest == {"router": 4.0}


def test_most_answered_sums_versions_over_results():
    results = [{"versions": {"1": 90, "2": 10}}, {"versions": {"2": 85}}, {"versions": {}}]
    assert most_answered(results) == "2"
    assert most_answered([{"versions": {"2": 5, "1": 5}}]) == "1"  # a tie: the first by name


# --- CPU over a window

SAMPLES = [Sample(10.0, {1: 100, 2: 0}), Sample(11.0, {1: 200, 2: 50}),
           Sample(12.0, {1: 200, 2: 150, 3: 0}), Sample(13.0, {1: 260, 3: 10})]


@pytest.mark.parametrize(("pid", "at", "ticks"), [
    (1, 10.0, 100), (1, 10.5, 150), (1, 11.5, 200), (1, 12.25, 215), (1, 13.0, 260),
    (2, 11.5, 100), (3, 12.5, 5),
])
def test_ticks_at_interpolates(pid, at, ticks):
    assert ticks_at(SAMPLES, pid, at) == pytest.approx(ticks)


@pytest.mark.parametrize(("pid", "at"), [(1, 9.9), (1, 13.1), (2, 12.5), (3, 11.0), (4, 11.0)])
def test_ticks_at_refuses_outside_readings(pid, at):
    with pytest.raises(ValueError, match=f"no CPU readings of pid {pid}"):
        ticks_at(SAMPLES, pid, at)


def test_cpu_by_kind_sums_each_kinds_processes():
    processes = [ServiceProcess(1, "batcher", "batcher-mlp-1"),
                 ServiceProcess(2, "batcher", "batcher-mlp-2"),
                 ServiceProcess(3, "compute", "compute-mlp-1")]
    cpu = cpu_by_kind(SAMPLES[:3], processes[:2], 10.5, 11.5, ticks_per_s=100)
    assert cpu == pytest.approx({"batcher": (200 - 150 + 100 - 25) / 100})
    assert cpu_by_kind(SAMPLES, processes[2:], 12.0, 13.0, 100) == {"compute": 0.1}


@pytest.mark.parametrize(("requests", "kinds", "expected"), [
    (100, ["ingress"], 0.002), (100, ["ingress", "router"], 0.003), (100, ["gone"], 0.0),
    (0, ["ingress"], None),
])
def test_window_per_request(requests, kinds, expected):
    window = Window(requests, {"ingress": 0.2, "router": 0.1})
    assert window.per_request(kinds) == (None if expected is None else pytest.approx(expected))


# --- latency each hop adds


def test_hop_added_differences_each_round_then_takes_the_median():
    p50 = {"ingress": [10.0, 20.0, 11.0], "router": [8.0, 18.0, 9.0],
           "batcher": [5.0, 16.0, 6.5], "compute": [3.0, 11.0, 3.5], "bare": [2.0, 4.0, 2.0]}
    added = hop_added(p50)
    # ingress: (2/2, 2/4, 2/2) -> 1.0; router: (3/2, 2/4, 2.5/2) -> 1.25;
    # batcher: (2/2, 5/4, 3/2) -> 1.25; compute: (1/2, 7/4, 1.5/2) -> 0.75
    assert added == pytest.approx({"ingress": 1.0, "router": 1.25, "batcher": 1.25,
                                   "compute": 0.75})
    assert hop_added({hop: [] for hop in HOPS}) == dict.fromkeys(HOPS[:-1])


# --- verdicts and the gate


@pytest.mark.parametrize(("value", "budget", "expected"), [
    (1.0, None, ""), (None, None, ""), (None, 1.0, MISSING), (0.5, 1.0, UNDER),
    (1.0, 1.0, UNDER), (1.01, 1.0, OVER), (2.0, 1.0, OVER), (2.01, 1.0, FAR_OVER),
    (-0.2, 0.5, UNDER),
])
def test_verdict(value, budget, expected):
    assert verdict(value, budget) == expected


GATE_FIGURES = [Figure("a", 1.9, "B", 1.0, gated=True), Figure("b", 2.1, "B", 1.0, gated=True),
                Figure("c", 9.0, "B"), Figure("d", None, "B", 1.0, gated=True),
                Figure("e", 0.1, "x", 0.2, gated=True),
                Figure("f", 9.0, "ms", 1.0), Figure("g", None, "%", 1.0)]  # not gated


@pytest.mark.parametrize(("factor", "failing"), [
    (2.0, ["b", "d"]), (1.0, ["a", "b", "d"]), (3.0, ["d"]), (0.4, ["a", "b", "d", "e"]),
])
def test_past_gate(factor, failing):
    assert [f.name for f in past_gate(GATE_FIGURES, factor)] == failing


@pytest.mark.parametrize(("figure", "text"), [
    (Figure("w", 3.0, "B", 1.0, gated=True), "w 3 B (budget 1)"),
    (Figure("w", None, "B", 1.0, gated=True), "w not measured B (budget 1)"),
    (Figure("w", 3.0, "B", None, gated=True), "w 3 B (budget not known)"),
])
def test_a_gate_failure_says_what_was_measured_against_what(figure, text):
    assert budget_run._failure(figure) == text


# --- the budget file


def budget_data() -> dict:
    return tomllib.loads((REPO / "benchmarks" / "budget.toml").read_text())


def test_checked_in_budget_file_holds_the_budgets():
    budgets = parse_budgets(budget_data())
    assert budgets.cpu_per_request_b == {"ingress": 1.3, "router": 0.15, "batcher": 0.3,
                                         "compute": 0.15}
    assert (budgets.concurrency_1_ratio, budgets.hop_p50, budgets.idle_cpu_percent) == (
        2.5, 0.5, 5.0)
    assert set(budgets.rss_load_mib) == set(KINDS)
    assert budget_run.load_budgets(budget_run.DEFAULT_BUDGET) == budgets


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("latency"), r"\[latency\] is missing"),
    (lambda d: d["cpu_per_request"].pop("router"), "cpu_per_request.router must be a number"),
    (lambda d: d["idle"].update(cpu_percent=-1), "idle.cpu_percent must be a number > 0"),
    (lambda d: d["concurrency_1"].update(whole_mesh_ratio="2"), "whole_mesh_ratio"),
    (lambda d: d["rss_mib"]["idle"].update(gateway=10), "unknown process kinds under"),
    (lambda d: d["rss_mib"].pop("load"), r"\[rss_mib.load\] is missing"),
])
def test_bad_budget_file_names_the_key(change, message):
    data = budget_data()
    change(data)
    with pytest.raises(ValueError, match=message):
        parse_budgets(data)


# --- figures of a small fake mesh

BUDGETS = Budgets(cpu_per_request_b={"ingress": 1.3, "router": 0.15, "batcher": 0.3,
                                     "compute": 0.15},
                  concurrency_1_ratio=2.5, hop_p50=0.5, idle_cpu_percent=5.0,
                  rss_idle_mib={"compute": 400, "ingress": 100}, rss_load_mib={"compute": 400})


def fake_run() -> Measured:
    """B = 400 µs (median of three bare windows); mlp at c=32 and c=1 over two windows."""
    bare = [Window(1000, {"bare": 0.39}), Window(1000, {"bare": 0.40}),
            Window(500, {"bare": 0.5})]
    c32 = [Window(1000, {"ingress": 0.8, "router": 0.1, "batcher": 0.2, "compute": 0.12,
                         "up": 5.0}, model_cpu_s=0.08),
           Window(1000, {"ingress": 0.8, "router": 0.1, "batcher": 0.2, "compute": 0.12},
                  model_cpu_s=0.06)]
    c1 = [Window(100, {"ingress": 0.2, "router": 0.2, "batcher": 0.2, "compute": 0.2},
                 model_cpu_s=0.05)] * 2
    p50 = {"ingress": [4.0], "router": [3.0], "batcher": [2.5], "compute": [1.5], "bare": [1.0]}
    return Measured(bare=bare, load={("mlp", 32): c32, ("mlp", 1): c1},
                    model_cpu_per_sample_s={"mlp": [90e-6, 70e-6, 80e-6]},
                    model_p50_ms={"mlp": [0.25, 0.2, 0.3]},
                    model_paused_ratio={"mlp": [2.5, 4.0, 3.0]},
                    batcher_paused_ratio=[1.5, 2.0, 1.75],
                    hop_p50_ms={"mlp": p50}, relay_cpu_s={"http2": 600e-6, "grpc": 1e-3},
                    relay_added_ms={"http2": 0.7, "grpc": 1.2}, idle_cpu_percent=[4.0, 9.0, 6.0],
                    rss_idle_mib={"compute": 320.0, "ingress": 90.0, "up": 270.0},
                    rss_load_mib={"compute": 900.0})


def test_figures_of_a_fake_mesh():
    found = {f.name: f for f in figures(fake_run(), BUDGETS, ["mlp"])}
    expected = {  # name: (measured, budget, verdict)
        "B: bare call server CPU, c=32": (400.0, None, ""),
        "batcher's Python per group of one, after a pause / back to back": (1.75, None, ""),
        "mlp bare p50, c=1": (1.0, None, ""),
        "mlp model CPU per sample (batch 16, 1 thread)": (0.2, None, ""),
        "mlp model CPU at batch 1, after a pause / back to back": (3.0, None, ""),
        "mlp c=32 ingress CPU per request": (2.0, 1.3, OVER),  # 800 µs / 400 µs
        "mlp c=32 router CPU per request": (0.25, 0.15, OVER),
        "mlp c=32 batcher CPU per request": (0.5, 0.3, OVER),
        "mlp c=32 compute CPU per request": (0.3, 0.35, UNDER),  # budget 0.15 + model 0.2
        "mlp c=32 model CPU per request inside compute": (0.175, None, ""),  # 70 µs
        "mlp c=32 compute CPU per request beyond its model": (0.125, 0.15, UNDER),  # 50 µs
        # `up` is not a hop; budget 1.9 + the model's 0.175 inside compute
        "mlp c=32 whole mesh CPU per request": (3.05, 2.075, OVER),
        "mlp c=1 ingress CPU per request": (5.0, None, ""),
        "mlp c=1 whole mesh CPU per request": (20.0, None, ""),
        "mlp whole mesh CPU per request, c=1 / c=32": (20 / 3.05, 2.5, FAR_OVER),
        "mlp c=1 model CPU per request inside compute": (1.25, None, ""),  # 500 µs
        "mlp c=1 compute CPU per request beyond its model": (3.75, None, ""),
        # 20 - 1.25 B at c=1 against 3.05 - 0.175 B at c=32
        "mlp whole mesh CPU per request beyond its model, c=1 / c=32": (18.75 / 2.875, None,
                                                                        ""),
        "mlp p50 added by ingress, c=1": (1.0, 0.5, OVER),
        "mlp p50 added by router, c=1": (0.5, 0.5, UNDER),
        "mlp p50 added by batcher, c=1": (1.0, 0.5, OVER),
        "mlp p50 added by compute, c=1": (0.5, 0.75, UNDER),  # budget 0.5 + model 0.25
        # a bare relay's 600 µs and 1 ms of CPU per message in B; its added p50s over the
        # bare p50 of 1 ms
        "floor: bare relay CPU per message, c=1, hops' own client": (1.5, None, ""),
        "floor: p50 added by a bare relay, c=1, hops' own client": (0.7, None, ""),
        "floor: bare relay CPU per message, c=1, grpc.aio, as the router": (2.5, None, ""),
        "floor: p50 added by a bare relay, c=1, grpc.aio, as the router": (1.2, None, ""),
        "idle mesh CPU (every process of up)": (6.0, 5.0, OVER),
        "RSS idle: up (largest process)": (270.0, None, ""),
        "RSS idle: ingress (largest process)": (90.0, 100, UNDER),
        "RSS idle: compute (largest process)": (320.0, 400, UNDER),
        "RSS under load: compute (largest process)": (900.0, 400, FAR_OVER),
    }
    for name, (value, budget, word) in expected.items():
        figure = found.pop(name)
        assert (figure.value, figure.budget, figure.verdict) == (
            pytest.approx(value), None if budget is None else pytest.approx(budget), word), name
    assert sorted(found) == [f"mlp c=1 {kind} CPU per request"
                             for kind in ("batcher", "compute", "router")]
    ran = figures(fake_run(), BUDGETS, ["mlp"])
    assert [f.name for f in ran if f.gated] == ["mlp c=32 whole mesh CPU per request"]
    # 3.05 B against 2.075 B: router, batcher and the ratio are past 1.5x their budgets,
    # but only the whole request is gated
    assert past_gate(ran, 1.5) == []
    assert [f.name for f in past_gate(ran, 1.4)] == ["mlp c=32 whole mesh CPU per request"]
    slower = fake_run()
    slower.load[("mlp", 32)] = [Window(1000, {"ingress": 2.0, "compute": 0.1},
                                       model_cpu_s=0.05)]
    assert [f.name for f in past_gate(figures(slower, BUDGETS, ["mlp"]), 2.0)] == [
        "mlp c=32 whole mesh CPU per request"]  # 5.25 B against 2.025 B
    unread = fake_run()  # the computes' counters could not be read: no budget, the gate fails
    unread.load[("mlp", 32)] = [Window(1000, {"ingress": 0.1})]
    assert [f.name for f in past_gate(figures(unread, BUDGETS, ["mlp"]), 2.0)] == [
        "mlp c=32 whole mesh CPU per request"]


def test_figures_of_a_failed_measurement_fail_the_gate():
    measured = fake_run()
    measured.load[("mlp", 32)] = [Window(0, {"ingress": 1.0})]  # nothing answered
    found = figures(measured, BUDGETS, ["mlp"])
    ingress = next(f for f in found if f.name == "mlp c=32 ingress CPU per request")
    assert (ingress.value, ingress.verdict) == (None, MISSING)
    assert [f.name for f in past_gate(found, 2.0)] == ["mlp c=32 whole mesh CPU per request"]


def test_figures_leave_out_what_the_run_skipped():
    measured = Measured(bare=[Window(10, {"bare": 0.004})],
                        load={("mlp", 32): [Window(10, dict.fromkeys(KINDS, 0.001))]})
    names = [f.name for f in figures(measured, BUDGETS, ["mlp"])]
    assert names == ["B: bare call server CPU, c=32",
                     "mlp model CPU per sample (batch 16, 1 thread)",
                     *[f"mlp c=32 {kind} CPU per request" for kind in KINDS],
                     "mlp c=32 model CPU per request inside compute",
                     "mlp c=32 compute CPU per request beyond its model",
                     "mlp c=32 whole mesh CPU per request"]
    beyond = next(f for f in figures(measured, BUDGETS, ["mlp"])
                  if f.name.endswith("beyond its model"))
    assert (beyond.value, beyond.verdict) == (None, MISSING)  # the computes were not read


def test_the_models_own_cpu_from_a_computes_metrics():
    text = ("# TYPE meshserve_compute_model_cpu_seconds counter\n"
            'meshserve_compute_model_cpu_seconds_total{device="cpu",model="mlp",version="1"} 1.5\n'
            'meshserve_compute_model_cpu_seconds_created{device="cpu",model="mlp"} 1.7e9\n'
            'meshserve_compute_model_cpu_seconds_total{device="cpu",model="mlp",version="2"} 0.25\n'
            'meshserve_compute_seconds_sum{device="cpu",model="mlp",version="1"} 9.0\n')
    assert model_cpu_seconds(text) == 1.75
    assert model_cpu_seconds("") == 0.0
    assert model_share((1.0, 10.0), (1.6, 11.0)) == pytest.approx(0.6)
    assert model_share((1.0, 10.0), (1.0, 10.0)) is None  # compute spent nothing
    assert model_share((1.0, 10.0), (3.0, 11.0)) == 1.0  # ticks are coarser than the counter


def test_report_lines_and_json():
    lines = report_lines([Figure("mlp c=32 router CPU per request", 0.551, "B", 0.15),
                          Figure("idle mesh CPU", 4.04, "% core", 5.0),
                          Figure("B: bare call", 431.2, "µs"),
                          Figure("hop", None, "bare p50", 0.5, "a note")])
    assert lines[0].split() == ["figure", "measured", "budget", "verdict"]
    assert lines[1].split()[-7:] == ["0.551", "B", "0.150", "B", "over", "(>", "2x)"]
    assert lines[2].split()[-5:] == ["4.0", "%", "5.0", "%", "under"]
    assert lines[3].split()[-3:] == ["431", "µs", "—"]
    assert lines[4].endswith("not measured  (a note)")
    assert Figure("x", 1 / 3, "B", 0.3).to_json() == {
        "name": "x", "measured": 0.3333, "unit": "B", "budget": 0.3, "verdict": OVER,
        "note": ""}


# --- the bare server, driven by the load generator with a request of its own


def test_constant_answer_is_one_row_of_a_demo_model():
    answer = pb.ModelInferResponse.FromString(budget_bare.constant_answer())
    [output] = answer.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("OUTPUT__0", "FP32", [1, 10])
    assert answer.raw_output_contents == [bytes(40)]


async def test_load_on_the_bare_server_over_mutual_tls(tmp_path):
    init_certs(tmp_path)
    server, port = budget_bare.build_server(TlsFiles.for_identity(tmp_path, "ingress"))
    await server.start()
    spec = LoadSpec(target=f"127.0.0.1:{port}", model="mlp", concurrency=2, duration_s=0.3,
                    warmup_s=0.05, ca=tmp_path / "ca.crt", cert=tmp_path / "client.crt",
                    key=tmp_path / "client.key", server_name="ingress",
                    request=b"any bytes: the bare server does not parse them")
    try:
        before = time.time()
        result = await asyncio.to_thread(run_load, spec)
        after = time.time()
        assert result["requests"] > 0 and result["errors"] == {}
        assert result["versions"] == {"1": result["requests"]}
        start, end = result["window_unix_s"]
        assert before <= start < end <= after
        assert end - start == pytest.approx(result["duration_s"], abs=1e-3)
        # Without `request` the load generator asks ModelMetadata, which this server lacks.
        without = LoadSpec(**{**spec.__dict__, "request": b""})
        with pytest.raises(RuntimeError, match="ModelMetadata for 'mlp'.*UNIMPLEMENTED"):
            await asyncio.to_thread(run_load, without)
    finally:
        await server.stop(None)


# --- the command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "budget", *argv])


def test_cli_flags():
    args = parse(["--quick", "--json", "--gate", "2", "--out", "x"])
    assert (args.quick, args.json, args.gate, args.out, args.profile) == (
        True, True, 2.0, Path("x"), False)
    assert args.budget == REPO / "benchmarks" / "budget.toml"
    with pytest.raises(SystemExit):
        parse(["--gate", "0"])


def test_cli_refuses_a_bad_budget_file_before_starting_anything(tmp_path, capsys):
    bad = tmp_path / "budget.toml"
    bad.write_text("[cpu_per_request]\ningress = 1.3\n")
    args = parse(["--budget", str(bad), "--out", str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "[concurrency_1] is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
