"""`meshserve top`'s arithmetic: rates, totals and quantiles from two scrapes."""

import math

import pytest
from rich.console import Console

from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.top import Scrape, parse, quantile, render, summarise


def exposition(ok: float, failed: float, rows: float, batches: float, batch_sum: float,
               compute: float, pending: float, latency: dict[float, float]) -> str:
    lines = [
        f'nv_inference_request_success{{model="mlp",version="2"}} {ok}',
        f'nv_inference_request_failure{{model="mlp",version="2",reason="UNAVAILABLE"}} {failed}',
        'nv_inference_request_success{model="",version=""} 7',
        f'nv_inference_count{{model="mlp",version="2"}} {rows}',
        f'nv_inference_exec_count{{model="mlp",version="2"}} {batches}',
        f'nv_inference_pending_request_count{{model="mlp",version="2"}} {pending}',
        "# TYPE meshserve_batch_size histogram",
        f'meshserve_batch_size_count{{model="mlp",version="2"}} {batches}',
        f'meshserve_batch_size_sum{{model="mlp",version="2"}} {batch_sum}',
        "# TYPE meshserve_compute_seconds histogram",
        f'meshserve_compute_seconds_count{{model="mlp",version="2",device="cpu"}} {batches}',
        f'meshserve_compute_seconds_sum{{model="mlp",version="2",device="cpu"}} {compute}',
        "# TYPE meshserve_request_duration_seconds histogram",
    ]
    for bound, count in latency.items():
        le = "+Inf" if math.isinf(bound) else str(bound)
        lines.append(f'meshserve_request_duration_seconds_bucket{{model="mlp",le="{le}"}} '
                     f"{count}")
    return "\n".join(lines) + "\n"


def scrape_of(at: float, *texts: str) -> Scrape:
    result = Scrape(at=at)
    for text in texts:
        parse(text, result.samples)
    return result


def test_quantile_interpolates_like_prometheus():
    buckets = {0.001: 0.0, 0.002: 50.0, 0.005: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.25, buckets) == pytest.approx(0.0015)
    assert quantile(0.99, buckets) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 0.0, math.inf: 4.0}) == 0.1


def test_rates_totals_and_weights():
    before = scrape_of(10.0, exposition(100, 2, 100, 10, 100, 1.0, 0,
                                        {0.001: 0, 0.002: 0, 0.005: 0, math.inf: 0}))
    after = scrape_of(12.0,
                      exposition(120, 6, 110, 12, 110, 1.5, 3,
                                 {0.001: 0, 0.002: 12, 0.005: 24, math.inf: 24}),
                      # a second batcher replica of the same version adds up
                      'nv_inference_count{model="mlp",version="2"} 5\n')
    status = pb.StatusResponse(models=[pb.ModelStatus(
        policy=pb.Policy(model="mlp", weights={"1": 90, "2": 10}),
        versions=[pb.VersionStatus(version="2", weight=10, p50_ms=2.5, p99_ms=4.0)],
        canary=pb.Canary(state="running", weight=10, baseline="1",
                         plan=pb.CanaryPlan(model="mlp", to_version="2")))])
    document = summarise(before, after, status)
    assert document["interval_seconds"] == 2.0
    assert document["weights"] == {"mlp": {"1": 90, "2": 10}}
    assert "" not in document["models"]
    mlp = document["models"]["mlp"]
    assert mlp["canary"] == {"state": "running", "weight": 10, "baseline": "1",
                             "to_version": "2"}
    assert mlp["p50_ms"] == pytest.approx(2.0)
    v2 = mlp["versions"]["2"]
    assert v2["requests_per_second"] == pytest.approx((20 + 4) / 2)
    assert v2["errors_per_second"] == {"UNAVAILABLE": pytest.approx(2.0)}
    assert (v2["requests_total"], v2["success_total"]) == (126, 120)
    assert v2["failures_total"] == {"UNAVAILABLE": 6}
    assert (v2["rows_total"], v2["batches_total"]) == (115, 12)
    assert v2["mean_batch_size"] == pytest.approx(5.0)
    assert v2["compute_utilisation"] == pytest.approx(0.25)
    assert v2["queue_depth"] == 3
    assert (v2["p50_ms"], v2["p99_ms"], v2["weight"]) == (2.5, 4.0, 10)
    assert list(mlp["versions"]) == ["1", "2"]
    render(document)  # the live table builds from the same document


def test_failures_of_requests_that_named_no_version_count_for_their_model():
    """An unpinned request that fails is recorded with version "": the model's figures and a
    row of the live table (version "-") show it, as the ingress's metrics count it."""
    def text(ok: float, invalid: float, unavailable: float) -> str:
        return (f'nv_inference_request_success{{model="mlp",version="1"}} {ok}\n'
                f'nv_inference_request_failure{{model="mlp",version="",reason="INVALID_ARGUMENT"}}'
                f' {invalid}\n'
                f'nv_inference_request_failure{{model="mlp",version="",reason="UNAVAILABLE"}}'
                f' {unavailable}\n'
                'nv_inference_request_failure{model="",version="",reason="NOT_FOUND"} 9\n')

    document = summarise(scrape_of(0.0, text(10, 4, 0)), scrape_of(2.0, text(30, 24, 2)), None)
    assert set(document["models"]) == {"mlp"}
    mlp = document["models"]["mlp"]
    assert mlp["requests_per_second"] == pytest.approx((20 + 20 + 2) / 2)
    assert mlp["errors_per_second"] == {"INVALID_ARGUMENT": pytest.approx(10.0),
                                        "UNAVAILABLE": pytest.approx(1.0)}
    assert (mlp["requests_total"], mlp["success_total"]) == (56, 30)
    assert mlp["failures_total"] == {"INVALID_ARGUMENT": 24, "UNAVAILABLE": 2}
    assert list(mlp["versions"]) == ["1"]
    assert mlp["versions"]["1"]["requests_per_second"] == pytest.approx(10.0)
    assert mlp["versions"]["1"]["errors_per_second"] == {}

    console = Console(width=200, record=True)
    console.print(render(document))
    rows = [line for line in console.export_text().splitlines() if "mlp" in line]
    assert len(rows) == 2
    assert rows[1].split("│")[2].strip() == "-"
    assert "INVALID_ARGUMENT 10.0, UNAVAILABLE 1.0" in rows[1]
    assert rows[1].split("│")[4].strip() == "11.0"  # (20 + 2) / 2 s


def test_a_counter_reset_counts_from_zero():
    before = scrape_of(0.0, 'nv_inference_request_success{model="m",version="1"} 50\n')
    after = scrape_of(1.0, 'nv_inference_request_success{model="m",version="1"} 3\n')
    v1 = summarise(before, after, None)["models"]["m"]["versions"]["1"]
    assert v1["requests_per_second"] == 3.0
    assert v1["weight"] is None


@pytest.mark.parametrize("interval", ["nan", "inf", "0", "-1"])
def test_top_refuses_an_interval_that_is_not_a_positive_number(interval):
    from meshserve.tools.cli import main

    with pytest.raises(SystemExit, match="--interval must be a number of seconds above 0"):
        main(["top", "--interval", interval])


def test_top_json_without_once_prints_a_document_a_line(monkeypatch, capsys):
    """`top --json` alone: one JSON line per interval, not a silent wait for --once."""
    from meshserve.tools import top
    from meshserve.tools.cli import main

    calls = []

    async def sample(args, urls, before):
        calls.append(before)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return len(calls), {"models": {}, "n": len(calls)}

    monkeypatch.setattr(top, "sample", sample)
    monkeypatch.setattr(top, "metrics_urls", lambda args: [])
    assert main(["top", "--json", "--interval", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines() == ['{"models": {}, "n": 1}',
                                                    '{"models": {}, "n": 2}']
    assert calls == [None, 1, 2]  # each interval's rates from the one before
