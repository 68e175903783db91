"""`meshserve bench compare`: pure helpers, Triton repository text, the in-process limit.

Nothing here installs or starts Triton or the mesh; the generated model.py runs against a
stand-in for Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.tools import (
    bench,
    bench_compare,
    compare_race,
    compare_tables,
    triton_baseline,
    triton_repository,
)
from meshserve.tools.compare_limit import measure_limit
from meshserve.tools.compare_runs import make_plan
from meshserve.tools.compare_tables import (
    best_batch,
    comparison_rows,
    hop_breakdown,
    markdown_table,
    ratio,
)
from meshserve.tools.triton_repository import ModelSpec, TensorSpec, model_py, triton_config

# --- ratio


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (10.0, 5.0, 2.0),
        (1.0, 4.0, 0.25),
        (0.0, 3.0, 0.0),
        (5.0, 0.0, None),
        (5.0, -1.0, None),
        (None, 3.0, None),
        (3.0, None, None),
        (math.inf, 3.0, None),
        (3.0, math.nan, None),
    ],
)
def test_ratio(numerator, denominator, expected):
    assert ratio(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "—"), (0.8, "0.80×"), (1.234, "1.23×"), (0.0039, "0.004×"), (0.0, "0.000×"),
     (12.0, "12.00×")],
)
def test_ratio_text(value, expected):
    assert compare_tables.ratio_text(value) == expected


# --- best batch: most rows/s, the smaller batch on a tie


@pytest.mark.parametrize(
    ("rows_per_s", "expected"),
    [
        ({1: 100.0}, (1, 100.0)),
        ({1: 100.0, 2: 180.0, 4: 300.0, 8: 290.0}, (4, 300.0)),
        ({1: 50.0, 32: 900.0, 16: 900.0}, (16, 900.0)),
        ({8: 10.0, 1: 10.0}, (1, 10.0)),
        ({1: 500.0, 2: 400.0}, (1, 500.0)),
    ],
)
def test_best_batch(rows_per_s, expected):
    assert best_batch(rows_per_s) == expected


def test_best_batch_needs_a_measurement():
    with pytest.raises(ValueError):
        best_batch({})


# --- tables


def test_markdown_table_aligns_numeric_columns_right():
    text = markdown_table(["model", "rps", "ratio"], [["mlp", "1,234", "0.52×"],
                                                      ["cnn", "—", "—"]])
    assert text == (
        "| model | rps | ratio |\n"
        "|---|---:|---:|\n"
        "| mlp | 1,234 | 0.52× |\n"
        "| cnn | — | — |\n"
    )


def _result(rps, p50, p99, requests=100):
    return {"requests": requests, "throughput_rps": rps,
            "latency_ms": {"p50": p50, "p99": p99}}


COMPARISON_CASES = [
    pytest.param(
        {("meshserve", "mlp", 1, "unary"): _result(400.0, 2.5, 4.0),
         ("triton", "mlp", 1, "unary"): _result(500.0, 2.0, 3.25),
         ("triton-envoy", "mlp", 1, "unary"): _result(320.0, 3.0, 5.5)},
        {"mlp": 1600.0},
        ["mlp", "1", "unary", "400", "2.50", "4.00", "500", "2.00", "3.25", "320", "3.00",
         "5.50", "0.80×", "1.25×", "0.25×"],
        id="all-three",
    ),
    pytest.param(
        {("meshserve", "mlp", 1, "unary"): _result(1234.5, 1.0, 2.0)},
        {},
        ["mlp", "1", "unary", "1,234", "1.00", "2.00", "—", "—", "—", "—", "—", "—", "—", "—",
         "—"],
        id="triton-missing-no-limit",
    ),
    pytest.param(
        {("meshserve", "mlp", 1, "unary"): _result(0.0, None, None, requests=0),
         ("triton", "mlp", 1, "unary"): _result(10.0, 1.0, 1.0)},
        {"mlp": 100.0},
        ["mlp", "1", "unary", "—", "—", "—", "10", "1.00", "1.00", "—", "—", "—", "—", "—",
         "—"],
        id="no-successes",
    ),
]


@pytest.mark.parametrize(("results", "limits", "expected"), COMPARISON_CASES)
def test_comparison_rows(results, limits, expected):
    assert comparison_rows([("mlp", 1, "unary")], results, limits) == [expected]


def test_comparison_table_has_one_row_per_run():
    plan = make_plan(quick=True)
    rows = comparison_rows(plan.runs(), {}, {})
    text = markdown_table(compare_tables.COMPARISON_HEADERS, rows)
    assert len(text.splitlines()) == 2 + len(plan.runs())
    assert text.startswith("| model | concurrency | transport | meshserve rps |")
    assert "| Envoy mesh rps | Envoy mesh p50 ms | Envoy mesh p99 ms |" in text


def test_limit_rows():
    limits = {"mlp": {1: {"rows_per_s": 900.0, "p50_ms": 1.1111},
                      2: {"rows_per_s": 1500.0, "p50_ms": 1.3}}}
    assert compare_tables.limit_rows(limits) == [["mlp", "900", "1.111", "2", "1,500"]]


# --- the race: ratios of two systems in one run, medians over runs


def _race_results(mesh_rps, envoy_rps, triton_rps, mesh_p99=10.0, envoy_p99=20.0,
                  mesh_p50_c1=4.0, envoy_p50_c1=5.0, cnn_rps=450.0, stream_rps=None):
    return {
        ("meshserve", "mlp", 32, "unary"): _result(mesh_rps, 8.0, mesh_p99),
        ("meshserve", "mlp", 32, "stream"): _result(stream_rps or mesh_rps, 8.0, 9.0),
        ("triton-envoy", "mlp", 32, "unary"): _result(envoy_rps, 9.0, envoy_p99),
        ("triton", "mlp", 32, "unary"): _result(triton_rps, 5.0, 8.0),
        ("meshserve", "mlp", 1, "unary"): _result(200.0, mesh_p50_c1, 9.0),
        ("triton-envoy", "mlp", 1, "unary"): _result(180.0, envoy_p50_c1, 9.0),
        ("meshserve", "cnn", 32, "unary"): _result(cnn_rps, 60.0, 80.0),
    }


def test_goal_values_of_one_run():
    results = _race_results(mesh_rps=1200.0, envoy_rps=1000.0, triton_rps=2000.0,
                            stream_rps=1500.0)
    values = {g.label: g.value(results, {"cnn": 500.0}) for g in compare_race.GOALS}
    assert values == {
        "mlp c=32 req/s: meshserve / Envoy mesh": pytest.approx(1.2),
        "mlp c=32 req/s: meshserve / Triton": pytest.approx(0.6),
        "mlp c=32 p99: meshserve / Envoy mesh": pytest.approx(0.5),
        "mlp c=1 p50: meshserve / Envoy mesh": pytest.approx(0.8),
        "cnn c=32 req/s: meshserve / in-process limit": pytest.approx(0.9),
        "mlp c=32 req/s: meshserve stream / unary": pytest.approx(1.25),
    }


def test_goal_without_its_runs_or_limit_has_no_value():
    for goal in compare_race.GOALS:
        assert goal.value({}, {}) is None
    cnn = next(g for g in compare_race.GOALS if g.denominator is None)
    assert cnn.value(_race_results(1.0, 1.0, 1.0), {}) is None  # no limit measured


@pytest.mark.parametrize(("at_least", "at_most", "value", "met"), [
    (1.0, None, 1.0, True), (1.0, None, 0.99, False), (None, 1.0, 1.01, False),
    (None, 1.0, 0.5, True), (0.8, None, None, None),
])
def test_goal_bound(at_least, at_most, value, met):
    goal = compare_race.Goal("x", ("a", "mlp", 1, "unary"), "rps", None, at_least, at_most)
    assert goal.met(value) is met
    assert goal.bound() == ("≥ " if at_least else "≤ ") + f"{at_least or at_most:g}"


@pytest.mark.parametrize(("values", "expected"), [
    ([3.0, None, 1.0, 2.0], 2.0), ([4.0, 1.0], 2.5), ([None, 5.0], 5.0), ([], None),
    ([None, None], None), ([float("nan"), 1.0, 3.0], 2.0),
])
def test_median_skips_missing_values(values, expected):
    assert compare_tables.median(values) == expected


def test_goal_rows_give_each_run_and_judge_the_median():
    goals = compare_race.GOALS[:2]
    rows = compare_race.goal_rows([[1.1, 0.5], [0.9, None], [1.3, 0.9]], goals)
    assert rows == [
        ["mlp c=32 req/s: meshserve / Envoy mesh", "1.10×", "0.90×", "1.30×", "1.10×", "≥ 1",
         "yes"],
        ["mlp c=32 req/s: meshserve / Triton", "0.50×", "—", "0.90×", "0.70×", "≥ 0.8", "no"],
    ]
    assert compare_race.goal_rows([[None, 0.85]], goals) == [
        ["mlp c=32 req/s: meshserve / Envoy mesh", "—", "≥ 1", "—"],
        ["mlp c=32 req/s: meshserve / Triton", "0.85×", "≥ 0.8", "yes"],
    ]
    assert compare_race.goal_headers(1) == ["ratio", "measured", "goal", "met"]
    assert compare_race.goal_headers(3) == ["ratio", "run 1", "run 2", "run 3", "median",
                                             "goal", "met"]


def test_median_results_take_each_figure_over_the_runs_that_answered():
    key = ("meshserve", "mlp", 32, "unary")
    runs = [{key: {**_result(100.0, 5.0, 9.0), "server_cpu_us": 300.0}},
            {key: {**_result(0.0, None, None, requests=0), "server_cpu_us": 900.0}},
            {key: _result(300.0, 3.0, 12.0, requests=50)}, {}]
    merged = compare_race.median_results(runs)
    # The run that answered nothing counts for nothing, its CPU figure neither.
    assert merged == {key: {"requests": 150, "runs": 2, "throughput_rps": 200.0,
                            "latency_ms": {"p50": 4.0, "p99": 10.5}, "server_cpu_us": 300.0}}
    assert compare_race.median_results([{key: _result(0.0, None, None, requests=0)}]) == {}


def test_summary_report_gives_the_median_of_each_runs_ratio():
    limits = {"cnn": {1: {"rows_per_s": 400.0, "p50_ms": 2.5}, 4: {"rows_per_s": 500.0,
                                                                    "p50_ms": 8.0}}}
    runs = [types.SimpleNamespace(results=_race_results(m, e, 2000.0), limits=limits,
                                  failures=failures)
            for m, e, failures in ((900.0, 1000.0, []), (1300.0, 1000.0, ["boom"]),
                                   (1150.0, 1000.0, []))]
    text = bench_compare.summary_report(make_plan(quick=True), runs, 99.0)
    assert "| mlp c=32 req/s: meshserve / Envoy mesh | 0.90× | 1.30× | 1.15× | 1.15× | ≥ 1 | " \
           "yes |" in text
    assert "| cnn c=32 req/s: meshserve / in-process limit | 0.90× | 0.90× | 0.90× | 0.90× | " \
           "≥ 0.9 | yes |" in text
    # The figures' table: medians of the runs (1,150 req/s), ratios of medians.
    assert "| mlp | 32 | unary | 1,150 |" in text
    assert "In-process limit (median best-batch rows/s): mlp —, cnn 500." in text
    assert "- run 2: boom" in text


def test_server_cpu_per_answered_request():
    assert compare_tables.server_cpu_us(1.5, 3000) == pytest.approx(500.0)
    assert compare_tables.server_cpu_us(1.5, 0) is None


def test_cpu_rows_compare_each_systems_cpu_per_request():
    results = {("meshserve", "mlp", 32, "unary"): {"server_cpu_us": 300.0},
               ("triton", "mlp", 32, "unary"): {"server_cpu_us": 200.0},
               ("triton-envoy", "mlp", 32, "unary"): {"server_cpu_us": 400.0},
               ("triton", "cnn", 32, "unary"): {"server_cpu_us": 1250.0}}
    rows = compare_tables.cpu_rows([("mlp", 32, "unary"), ("cnn", 32, "unary")], results)
    assert rows == [["mlp", "32", "unary", "300", "200", "400", "1.50×", "0.75×"],
                    ["cnn", "32", "unary", "—", "1,250", "—", "—", "—"]]
    assert compare_tables.CPU_HEADERS[3:6] == ["meshserve µs/req", "Triton µs/req",
                                                "Envoy mesh µs/req"]


def test_report_opens_with_the_race():
    recorder = types.SimpleNamespace(
        results=_race_results(1200.0, 1000.0, 2000.0), hops=[], failures=[],
        limits={"cnn": {1: {"rows_per_s": 500.0, "p50_ms": 2.0}}})
    text = bench_compare.report(make_plan(quick=True), recorder, 12.0)
    assert text.startswith("## The race\n\n| ratio | measured | goal | met |\n")
    assert "| mlp c=32 req/s: meshserve / Triton | 0.60× | ≥ 0.8 | no |" in text
    assert "| mlp | 32 | unary | 1,200 | 8.00 | 10.00 | 2,000 | 5.00 | 8.00 | 1,000 | 9.00 " \
           "| 20.00 | 0.60× | 1.20× | — |" in text
    assert "## Server CPU per request\n\n| model | concurrency | transport | meshserve µs/req" \
           in text


# --- plans


def test_quick_plan():
    plan = make_plan(quick=True)
    assert plan.models == ("mlp", "cnn")
    assert plan.runs() == [(model, c, t) for model in ("mlp", "cnn") for c in (1, 32)
                           for t in ("unary", "stream")]
    assert plan.duration_s == 3.0 and plan.warmup_s == 1.0


def test_full_plan_fits_in_fifteen_minutes_with_room_for_start_up():
    plan = make_plan(quick=False)
    assert len(plan.runs()) == 2 * 4 * 2
    assert {c for _, c, _ in plan.runs()} == {1, 8, 32, 128}
    assert plan.load_seconds() == 3 * 16 * 13 + 2 * 6 * 2.0  # three systems
    assert plan.load_seconds() < 12 * 60


def test_plan_overrides():
    plan = make_plan(quick=True, models=["cnn"], duration_s=0.5, warmup_s=0.0)
    assert [run for run in plan.runs() if run[2] == "unary"] == [("cnn", 1, "unary"),
                                                                 ("cnn", 32, "unary")]
    assert (plan.duration_s, plan.warmup_s) == (0.5, 0.0)


def test_default_out_dir_is_dated():
    moment = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
    assert bench_compare.default_out_dir(moment) == Path("bench-results/20260304T050607Z")


# --- statistics and the per-hop breakdown


def _stats_response(success=(0, 0), queue=(0, 0), infer=(0, 0), rows=0, batches=0,
                    batch_stats=(), versions=1):
    """`batch_stats` holds (batch_size, executions, input_ns, infer_ns, output_ns)."""
    response = pb.ModelStatisticsResponse()
    for version in range(versions):
        stats = response.model_stats.add(name="mlp", version=str(version + 1),
                                         inference_count=rows, execution_count=batches)
        for name, (count, ns) in (("success", success), ("queue", queue),
                                  ("compute_infer", infer)):
            duration = getattr(stats.inference_stats, name)
            duration.count, duration.ns = count, ns
        for size, executions, input_ns, infer_ns, output_ns in batch_stats:
            entry = stats.batch_stats.add(batch_size=size)
            for name, ns in (("compute_input", input_ns), ("compute_infer", infer_ns),
                             ("compute_output", output_ns)):
                duration = getattr(entry, name)
                duration.count, duration.ns = executions, ns
    return response


def test_statistics_totals_sum_versions_and_batches():
    totals = compare_tables.statistics_totals(
        _stats_response(success=(3, 30), queue=(3, 6), infer=(3, 9), rows=3, batches=2,
                        batch_stats=[(1, 1, 1, 10, 1), (2, 1, 2, 20, 2)], versions=2))
    assert totals["success_count"] == 6 and totals["success_ns"] == 60
    assert totals["queue_ns"] == 12 and totals["compute_infer_count"] == 6
    assert totals["inference_count"] == 6 and totals["execution_count"] == 4
    assert totals["batch_ns"] == 2 * (12 + 24)
    assert totals["batch_rows"] == 2 * (1 + 2)
    assert totals["batch_row_ns"] == 2 * (12 + 2 * 24)


HOP_CASES = [
    pytest.param(
        # 1000 requests of one row: 0.5 ms queue each; 200 batches of 4 rows taking 2 ms
        # (1.5 infer + 0.25 input + 0.25 output) and 200 batches of 1 row taking 1 ms.
        dict(success=(1000, 4_000_000_000), queue=(1000, 500_000_000), rows=1000,
             batches=400,
             batch_stats=[(4, 200, 50_000_000, 300_000_000, 50_000_000),
                          (1, 200, 0, 200_000_000, 0)]),
        3.0, 2.5,
        # compute per request: (800 rows x 2 ms + 200 rows x 1 ms) / 1000 = 1.8 ms;
        # per row: (400 ms + 200 ms) / 1000 = 0.6 ms.
        {"requests": 1000, "queue_ms": 0.5, "compute_ms": 1.8, "compute_per_row_ms": 0.6,
         "server_total_ms": 4.0, "rest_ms": 0.7, "rest_mean_ms": 0.2, "mean_batch": 2.5},
        id="busy",
    ),
    pytest.param(
        dict(), 1.0, 1.0,
        {"requests": 0, "queue_ms": None, "compute_ms": None, "rest_ms": None,
         "rest_mean_ms": None, "mean_batch": None},
        id="no-requests",
    ),
    pytest.param(
        dict(success=(10, 10_000_000), queue=(10, 1_000_000), rows=10, batches=10,
             batch_stats=[(1, 10, 0, 5_000_000, 0)]),
        None, None,
        {"queue_ms": 0.1, "compute_ms": 0.5, "compute_per_row_ms": 0.5, "rest_ms": None,
         "mean_batch": 1.0},
        id="no-client-latency",
    ),
]


@pytest.mark.parametrize(("after", "p50", "mean", "expected"), HOP_CASES)
def test_hop_breakdown(after, p50, mean, expected):
    before = compare_tables.statistics_totals(_stats_response())
    after_totals = compare_tables.statistics_totals(_stats_response(**after))
    hop = hop_breakdown(before, after_totals, p50, mean)
    for key, value in expected.items():
        assert hop[key] == (pytest.approx(value) if value is not None else None), key


def test_hop_breakdown_is_a_difference():
    before = compare_tables.statistics_totals(
        _stats_response(success=(10, 10**7), queue=(10, 10**7), rows=10, batches=10,
                        batch_stats=[(1, 10, 0, 10**7, 0)]))
    after = compare_tables.statistics_totals(
        _stats_response(success=(20, 2 * 10**7), queue=(20, 3 * 10**7), rows=30, batches=15,
                        batch_stats=[(1, 10, 0, 10**7, 0), (4, 5, 0, 10**7, 0)]))
    hop = hop_breakdown(before, after, 10.0)
    assert hop["queue_ms"] == pytest.approx(2.0)
    assert hop["compute_ms"] == pytest.approx(2.0)  # 5 batches of 4 rows, 2 ms each
    assert hop["compute_per_row_ms"] == pytest.approx(0.5)
    assert hop["rest_ms"] == pytest.approx(6.0)
    assert hop["mean_batch"] == pytest.approx(4.0)


# --- Triton repository text

MLP = ModelSpec("mlp", 32, (TensorSpec("INPUT__0", "TYPE_FP32", (256,)),),
                (TensorSpec("OUTPUT__0", "TYPE_FP32", (10,)),))
CNN = ModelSpec("cnn", 32, (TensorSpec("INPUT__0", "TYPE_FP32", (3, 64, 64)),),
                (TensorSpec("OUTPUT__0", "TYPE_FP32", (10,)),), instances=2)
TWO = ModelSpec("two", 8, (TensorSpec("A", "TYPE_FP32", (2,)), TensorSpec("B", "TYPE_FP32", (2,))),
                (TensorSpec("SUM", "TYPE_FP32", (2,)), TensorSpec("DIFF", "TYPE_FP64", (2,))))

CONFIG_CASES = [
    pytest.param(
        MLP, 1000,
        'name: "mlp"\n'
        'backend: "python"\n'
        "max_batch_size: 32\n"
        "input [\n  {\n    name: \"INPUT__0\"\n    data_type: TYPE_FP32\n    dims: [ 256 ]\n"
        "  }\n]\n"
        "output [\n  {\n    name: \"OUTPUT__0\"\n    data_type: TYPE_FP32\n    dims: [ 10 ]\n"
        "  }\n]\n"
        "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n",
        id="mlp",
    ),
    pytest.param(
        CNN, 0,
        'name: "cnn"\n'
        'backend: "python"\n'
        "max_batch_size: 32\n"
        "input [\n  {\n    name: \"INPUT__0\"\n    data_type: TYPE_FP32\n"
        "    dims: [ 3, 64, 64 ]\n  }\n]\n"
        "output [\n  {\n    name: \"OUTPUT__0\"\n    data_type: TYPE_FP32\n    dims: [ 10 ]\n"
        "  }\n]\n"
        "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
        "instance_group [ { kind: KIND_CPU count: 2 } ]\n",
        id="cnn-no-delay",
    ),
]


@pytest.mark.parametrize(("spec", "delay", "expected"), CONFIG_CASES)
def test_triton_config(spec, delay, expected):
    assert triton_config(spec, delay) == expected


def test_triton_config_parses_as_a_model_config():
    from google.protobuf import text_format

    from meshserve.protocol.model_config_pb2 import ModelConfig

    config = text_format.Parse(triton_config(TWO), ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 8
    assert [t.name for t in config.input] == ["A", "B"]
    assert [t.name for t in config.output] == ["SUM", "DIFF"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert config.instance_group[0].count == 1


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        (MLP, ["INPUTS = ['INPUT__0']", "OUTPUTS = ['OUTPUT__0']", "OUTPUT_DTYPES = ['float32']",
               "THREADS = 1", "MODEL_FILE = 'model.pt'"]),
        (TWO, ["INPUTS = ['A', 'B']", "OUTPUTS = ['SUM', 'DIFF']",
               "OUTPUT_DTYPES = ['float32', 'float64']"]),
    ],
)
def test_model_py_text(spec, needles):
    text = model_py(spec)
    compile(text, "model.py", "exec")
    for needle in needles:
        assert needle in text
    assert "torch.jit.load" in text and "torch.set_num_threads" in text
    assert "inference_mode" in text and "get_input_tensor_by_name" in text


def test_model_py_rejects_unsupported_outputs():
    spec = ModelSpec("s", 4, MLP.inputs, (TensorSpec("TEXT", "TYPE_STRING", (1,)),))
    with pytest.raises(ValueError, match="TYPE_STRING"):
        model_py(spec)


class _TwoHeads(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


def _fake_pb_utils() -> types.ModuleType:
    """The few names of Triton's triton_python_backend_utils that model.py uses."""
    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors):
            self.outputs = {t.name: t.array for t in output_tensors}

    class Request:
        def __init__(self, **arrays):
            self.inputs = {name: Tensor(name, array) for name, array in arrays.items()}

    module.Tensor = Tensor
    module.InferenceResponse = InferenceResponse
    module.Request = Request
    module.get_input_tensor_by_name = lambda request, name: request.inputs[name]
    return module


def test_generated_model_py_batches_requests_and_splits_answers(tmp_path, monkeypatch):
    version_dir = tmp_path / "two" / "3"
    version_dir.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TwoHeads()), str(version_dir / "model.pt"))
    fake = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    namespace: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(compile(model_py(TWO), "model.py", "exec"), namespace)
        model = namespace["TritonPythonModel"]()
        model.initialize({"model_repository": str(tmp_path / "two"), "model_version": "3"})
        assert torch.get_num_threads() == 1
        requests = [fake.Request(A=np.full((rows, 2), rows, np.float32),
                                 B=np.ones((rows, 2), np.float32)) for rows in (1, 3, 2)]
        responses = model.execute(requests)
    finally:
        torch.set_num_threads(threads)
    assert len(responses) == 3
    for rows, response in zip((1, 3, 2), responses):
        np.testing.assert_array_equal(response.outputs["SUM"], np.full((rows, 2), rows + 1))
        np.testing.assert_array_equal(response.outputs["DIFF"], np.full((rows, 2), rows - 1))
        assert response.outputs["DIFF"].dtype == np.float64


def test_write_repository_mirrors_the_demo_models(tmp_path):
    from meshserve.tools.demo_repository import write_demo_repository

    write_demo_repository(tmp_path / "models")
    mirrored = triton_repository.write_repository(tmp_path / "models", tmp_path / "triton",
                                                ["mlp", "cnn"])
    # As many instances as meshserve starts computes: two for the cnn, one for the mlp.
    assert mirrored == {"mlp": ("2", 1), "cnn": ("2", 2)}
    for name in ("mlp", "cnn"):
        model_dir = tmp_path / "triton" / name
        assert 'backend: "python"' in (model_dir / "config.pbtxt").read_text()
        assert (model_dir / "2" / "model.pt").read_bytes() == (
            tmp_path / "models" / name / "2" / "model.pt").read_bytes()
        compile((model_dir / "2" / "model.py").read_text(), "model.py", "exec")
    assert "dims: [ 3, 64, 64 ]" in (tmp_path / "triton" / "cnn" / "config.pbtxt").read_text()
    for name, count in (("mlp", 1), ("cnn", 2)):
        assert (f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]"
                in (tmp_path / "triton" / name / "config.pbtxt").read_text())


def test_server_environment_puts_the_cache_interpreter_first(tmp_path, monkeypatch):
    install = triton_baseline.TritonInstall(tmp_path)
    monkeypatch.setattr(triton_baseline.TritonInstall, "libdir", lambda self: "/py/lib")
    monkeypatch.setattr(triton_baseline.TritonInstall, "libs",
                        property(lambda self: Path("/wheel/libs")))
    env = triton_baseline.server_environment(
        install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x", "PYTHONPATH": "/bad"})
    assert env["PATH"] == f"{tmp_path / 'venv' / 'bin'}:/usr/bin"
    assert env["LD_LIBRARY_PATH"] == "/py/lib:/x:/wheel/libs"
    assert "PYTHONPATH" not in env


def test_free_port_is_a_loopback_port():
    port = triton_baseline.free_port()
    assert 0 < port < 65536


# --- the in-process limit (a tiny model, a tiny duration)


def test_measure_limit_smoke(tmp_path):
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(8, 2).eval()), str(path))
    threads = torch.get_num_threads()
    results = measure_limit(path, [(8,)], batch_sizes=(1, 4), duration_s=0.02)
    assert torch.get_num_threads() == threads
    assert sorted(results) == [1, 4]
    for measured in results.values():
        assert measured["calls"] >= 1
        assert measured["rows_per_s"] > 0 and measured["p50_ms"] > 0
    size, best = best_batch({b: m["rows_per_s"] for b, m in results.items()})
    assert size in (1, 4) and best == max(m["rows_per_s"] for m in results.values())


# --- the command line


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshserve")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_compare_subcommand_is_registered():
    args = _parse(["compare", "--quick", "--out", "results", "--models", "mlp"])
    assert args.func is bench_compare._cmd_compare
    assert args.quick and args.out == Path("results") and args.models == ("mlp",)
    assert args.servers == ("meshserve", "triton", "triton-envoy") and args.triton_dir is None
    assert args.runs == 1 and args.envoy_dir is None
    args = _parse(["compare", "--runs", "3", "--servers", "triton-envoy", "--envoy-dir", "e"])
    assert args.runs == 3 and args.servers == ("triton-envoy",) and args.envoy_dir == Path("e")
    assert _parse(["run", "--target", "x:1", "--model", "m"]).func is bench._cmd_run


@pytest.mark.parametrize("argv", [["--models", "resnet"], ["--runs", "0"], ["--runs", "x"],
                                  ["--servers", "envoy"]])
def test_compare_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        _parse(["compare", *argv])
