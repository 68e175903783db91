"""`meshserve top`: a live view of a running mesh, per model and version.

Reads every service's Prometheus `/metrics` (the `DIR/run/*.metrics-port` files `meshserve up`
writes, or `--metrics URL`, repeatable) twice, one interval apart, for rates; weights and
canaries come from the control plane's admin API with the operator certificate.
`--once --json` prints one JSON document instead (rates over one interval, plus cumulative
counts) for scripts; `--json` alone prints one such document a line, every interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.traffic import admin_channel, control_plane_address, operator_tls

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """Samples summed over every source (replicas add up), and when they were read."""

    at: float
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def select(self, name: str) -> Iterable[tuple[dict[str, str], float]]:
        for (sample, labels), value in self.samples.items():
            if sample == name:
                yield dict(labels), value


def parse(text: str, into: dict[tuple[str, Labels], float]) -> None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            into[key] = into.get(key, 0.0) + sample.value


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310
        return reply.read().decode()


def scrape(urls: list[str]) -> Scrape:
    result = Scrape(at=time.monotonic())
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        texts = list(pool.map(_fetch_or_error, urls))
    result.at = time.monotonic()
    for url, (text, error) in zip(urls, texts, strict=True):
        if error:
            result.errors[url] = error
        else:
            parse(text, result.samples)
    return result


def _fetch_or_error(url: str) -> tuple[str, str]:
    try:
        return fetch(url), ""
    except (OSError, ValueError) as error:
        return "", str(error)


def metrics_urls(args: argparse.Namespace) -> list[str]:
    if args.metrics:
        return list(args.metrics)
    run_dir = args.data_dir / "run"
    urls = [f"http://127.0.0.1:{int(p.read_text())}/metrics"
            for p in sorted(run_dir.glob("*.metrics-port")) if p.read_text().strip()]
    if not urls:
        raise SystemExit(f"no metrics endpoints in {run_dir}: start `meshserve up --data-dir "
                         f"{args.data_dir}` or pass --metrics URL")
    return urls


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _key(labels: dict[str, str]) -> tuple[str, str] | None:
    model, version = labels.get("model", ""), labels.get("version", "")
    return (model, version) if model else None


def summarise(before: Scrape, after: Scrape, status: pb.StatusResponse | None) -> dict:
    """The JSON document: per model and version, rates over [before, after] and totals."""
    seconds = max(after.at - before.at, 1e-9)
    models: dict[str, dict] = {}

    def model_entry(model: str) -> dict:
        return models.setdefault(model, {
            "p50_ms": None, "p99_ms": None, "canary": None, "requests_per_second": 0.0,
            "errors_per_second": {}, "requests_total": 0.0, "success_total": 0.0,
            "failures_total": {}, "versions": {}})

    def version(model: str, name: str) -> dict:
        return model_entry(model)["versions"].setdefault(name, {
            "weight": None, "requests_per_second": 0.0, "errors_per_second": {},
            "p50_ms": None, "p99_ms": None, "queue_depth": 0.0, "mean_batch_size": None,
            "compute_utilisation": 0.0, "requests_total": 0.0, "success_total": 0.0,
            "failures_total": {}, "rows_total": 0.0, "batches_total": 0.0})

    def requests_of(labels: dict[str, str]) -> list[dict]:
        """The entries a request of these labels counts in: its model's, and its version's
        when it has one; none for a model the ingress does not know (model "")."""
        if not (key := _key(labels)):
            return []
        return [model_entry(key[0]), version(*key)] if key[1] else [model_entry(key[0])]

    def delta(name: str) -> dict[tuple, float]:
        then = {k: v for k, v in before.samples.items() if k[0] == name}
        out: dict[tuple, float] = {}
        for key, value in after.samples.items():
            if key[0] == name:
                previous = then.get(key, 0.0)
                # A restarted service starts its counters again (as Prometheus' rate reads it).
                out[key[1]] = value - previous if value >= previous else value
        return out

    # Each request the ingress answered counts for its model, and for its version when the
    # ingress knows it: a request that named none and failed has none (a success has the one
    # that answered).
    for labels, value in after.select("nv_inference_request_success"):
        for entry in requests_of(labels):
            entry["success_total"] += value
            entry["requests_total"] += value
    for labels, value in after.select("nv_inference_request_failure"):
        code = labels.get("reason", "")
        for entry in requests_of(labels):
            entry["failures_total"][code] = entry["failures_total"].get(code, 0.0) + value
            entry["requests_total"] += value
    for name in ("nv_inference_request_success", "nv_inference_request_failure"):
        for labels, value in delta(name).items():
            labels = dict(labels)
            for entry in requests_of(labels):
                entry["requests_per_second"] += value / seconds
                if name.endswith("failure"):
                    code = labels.get("reason", "")
                    entry["errors_per_second"][code] = (
                        entry["errors_per_second"].get(code, 0.0) + value / seconds)
    for sample, field_ in (("nv_inference_count", "rows_total"),
                           ("nv_inference_exec_count", "batches_total")):
        for labels, value in after.select(sample):
            if key := _key(labels):
                version(*key)[field_] += value
    for labels, value in after.select("nv_inference_pending_request_count"):
        if key := _key(labels):
            version(*key)["queue_depth"] += value
    batch_sum: dict[tuple, float] = defaultdict(float)
    batch_count: dict[tuple, float] = defaultdict(float)
    for labels, value in delta("meshserve_batch_size_sum").items():
        if key := _key(dict(labels)):
            batch_sum[key] += value
    for labels, value in delta("meshserve_batch_size_count").items():
        if key := _key(dict(labels)):
            batch_count[key] += value
    for key, count in batch_count.items():
        if count:
            version(*key)["mean_batch_size"] = batch_sum[key] / count
    for labels, value in delta("meshserve_compute_seconds_sum").items():
        if key := _key(dict(labels)):
            version(*key)["compute_utilisation"] += value / seconds
    # Client-visible latency at the ingress is per model (its histogram has no version).
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in delta("meshserve_request_duration_seconds_bucket").items():
        labels = dict(labels)
        if labels.get("model"):
            buckets[labels["model"]][float(labels["le"])] += value
    for model, counts in buckets.items():
        if model in models:
            for q, name in ((0.5, "p50_ms"), (0.99, "p99_ms")):
                value = quantile(q, counts)
                models[model][name] = None if value is None else value * 1000
    if status is not None:
        for model_status in status.models:
            model = model_status.policy.model
            for name, weight in model_status.policy.weights.items():
                version(model, name)["weight"] = weight
            for v in model_status.versions:
                entry = version(model, v.version)
                entry["weight"] = v.weight
                entry["p50_ms"], entry["p99_ms"] = v.p50_ms, v.p99_ms
            canary = model_status.canary
            if canary.state:
                models[model]["canary"] = {"state": canary.state, "weight": canary.weight,
                                           "baseline": canary.baseline,
                                           "to_version": canary.plan.to_version}
    for entry in models.values():
        entry["versions"] = dict(sorted(entry["versions"].items(),
                                        key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(8))))
    weights = {model: {name: v["weight"] for name, v in entry["versions"].items()
                       if v["weight"] is not None}
               for model, entry in sorted(models.items())}
    return {"interval_seconds": round(seconds, 3), "models": dict(sorted(models.items())),
            "weights": weights, "scrape_errors": after.errors}


async def control_plane_status(args: argparse.Namespace) -> tuple[pb.StatusResponse | None,
                                                                   str]:
    try:
        address = control_plane_address(args)
    except SystemExit as error:
        return None, str(error)
    try:
        async with admin_channel(address, operator_tls(args)) as channel:
            return await AdminStub(channel).Status(pb.StatusRequest(), timeout=5), ""
    except grpc.aio.AioRpcError as error:
        return None, f"{error.code().name}: {error.details()}"
    except OSError as error:
        return None, str(error)


async def sample(args: argparse.Namespace, urls: list[str],
                 before: Scrape | None) -> tuple[Scrape, dict]:
    loop = asyncio.get_running_loop()
    if before is None:
        before = await loop.run_in_executor(None, scrape, urls)
        await asyncio.sleep(args.interval)
    after, (status, problem) = await asyncio.gather(
        loop.run_in_executor(None, scrape, urls), control_plane_status(args))
    document = summarise(before, after, status)
    document["control_plane_error"] = problem or None
    return after, document


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def unversioned(entry: dict) -> tuple[float, dict[str, float]]:
    """A model's requests/s and errors/s by code that no version row shows: failures of
    requests that named no version (the model's figures less its versions')."""
    rate = entry["requests_per_second"] - sum(
        v["requests_per_second"] for v in entry["versions"].values())
    errors = {code: total - sum(v["errors_per_second"].get(code, 0.0)
                                for v in entry["versions"].values())
              for code, total in entry["errors_per_second"].items()}
    tiny = 1e-9 * max(1.0, entry["requests_per_second"])  # what float sums leave over
    return (rate if rate > tiny else 0.0), {code: r for code, r in errors.items() if r > tiny}


def _errors(per_code: dict[str, float]) -> str:
    return ", ".join(f"{code} {rate:.1f}" for code, rate in sorted(per_code.items())
                     if rate) or "-"


def render(document: dict):
    from rich.table import Table

    table = Table(title=f"meshserve top  (rates over {document['interval_seconds']:.1f} s)",
                  expand=True)
    for column in ("model", "ver", "weight", "req/s", "errors/s", "p50 ms", "p99 ms",
                   "queue", "batch", "compute", "canary"):
        table.add_column(column, justify="left" if column in ("model", "errors/s", "canary")
                         else "right")
    for model, entry in document["models"].items():
        canary = entry["canary"]
        canary_text = (f"{canary['state']} {canary['to_version']}@{canary['weight']}%"
                       if canary else "")
        for name, v in entry["versions"].items():
            p50 = v["p50_ms"] if v["p50_ms"] else entry["p50_ms"]
            p99 = v["p99_ms"] if v["p99_ms"] else entry["p99_ms"]
            table.add_row(model, name, "-" if v["weight"] is None else f"{v['weight']}%",
                          _num(v["requests_per_second"]), _errors(v["errors_per_second"]),
                          _num(p50, 2), _num(p99, 2), _num(v["queue_depth"], 0),
                          _num(v["mean_batch_size"]), f"{v['compute_utilisation']:.0%}",
                          canary_text)
        rate, errors = unversioned(entry)
        if rate > 0:
            table.add_row(model, "-", "", _num(rate), _errors(errors), "", "", "", "", "", "")
    notes = []
    if document.get("control_plane_error"):
        notes.append(f"control plane: {document['control_plane_error']}")
    notes.extend(f"{url}: {error}" for url, error in document["scrape_errors"].items())
    if notes:
        table.caption = "\n".join(notes)
    return table


async def live(args: argparse.Namespace, urls: list[str]) -> None:
    from rich.live import Live

    before, document = await sample(args, urls, None)
    with Live(render(document), auto_refresh=False) as view:
        while True:
            await asyncio.sleep(args.interval)
            before, document = await sample(args, urls, before)
            view.update(render(document), refresh=True)


async def json_lines(args: argparse.Namespace, urls: list[str]) -> None:
    """One JSON document a line, every interval, until interrupted."""
    before = None
    while True:
        before, document = await sample(args, urls, before)
        print(json.dumps(document, sort_keys=False), flush=True)
        await asyncio.sleep(args.interval)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise SystemExit(f"--interval must be a number of seconds above 0, not {args.interval}")
    urls = metrics_urls(args)
    if args.once:
        _, document = asyncio.run(sample(args, urls, None))
        if args.json:
            print(json.dumps(document, indent=2, sort_keys=False))
        else:
            from rich.console import Console

            Console().print(render(document))
        return 0
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        asyncio.run(json_lines(args, urls) if args.json else live(args, urls))
    return 0


def register(commands) -> None:
    parser = commands.add_parser("top")
    parser.add_argument("--data-dir", type=Path, default=Path(".meshserve"),
                        help="where `meshserve up` keeps certificates and ports")
    parser.add_argument("--metrics", action="append", metavar="URL",
                        help="a service's /metrics URL (repeatable; default: every one `up` "
                             "started)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between scrapes (and screen refreshes)")
    parser.add_argument("--once", action="store_true", help="one sample, then exit")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (without --once: a document a line, every interval)")
    parser.add_argument("--control-plane", help="HOST:PORT (default: the one `up` started)")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--cert", type=Path, help="operator certificate")
    parser.add_argument("--key", type=Path)
    parser.set_defaults(func=run)
