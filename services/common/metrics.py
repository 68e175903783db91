"""Prometheus metrics: one registry per service, built by its entry point, served over HTTP.

Names follow Triton's (`nv_inference_*`, counters in Triton's units) where Triton has the
metric, so existing dashboards work; the rest are `meshserve_*`. Labels stay bounded: model,
version, status code name, device, hop — never request ids or principals. Labelled children
are made once per label set and cached, so recording costs one dict lookup and one
`inc`/`observe`.

The services' core code never imports this module: it is handed the small recorder objects
below (or callbacks made from them) by the wiring in each `service.py`.

One module of ~420 lines on purpose: every metric name, help text and label set of the mesh
in one place, so that the dashboard and the docs have one list to follow.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

# Seconds: from a fraction of a millisecond (a hop on loopback) to a slow CPU batch.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, float("inf"))
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, float("inf"))


class Metrics:
    """A service's metrics: its own registry (never prometheus_client's global one), with the
    process's CPU, memory and file descriptors (`process_*`) and its garbage collections by
    generation (`python_gc_*`), read at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def counter(self, name: str, documentation: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, documentation, list(labels), registry=self.registry)

    def triton_counter(self, name: str, documentation: str,
                       labels: Iterable[str] = ()) -> TritonCounter:
        return TritonCounter(name, documentation, labels, self.registry)

    def gauge(self, name: str, documentation: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, documentation, list(labels), registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: Iterable[str] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> LoopHistogram:
        return LoopHistogram(name, documentation, labels, buckets, self.registry)

    def certificate_expiry(self, certificate: Path) -> None:
        """`meshserve_certificate_expiry_seconds{identity}`: when this service's certificate
        expires, as a Unix time (alert on `... - time() < 7 * 86400`). Read again at each
        scrape, so a rotated certificate shows; the last value stays while it is replaced."""
        identity, expires = certificate_facts(certificate)
        latest = [expires]

        def current() -> float:
            with contextlib.suppress(OSError, ValueError):
                latest[0] = certificate_facts(certificate)[1]
            return latest[0]

        self.gauge("meshserve_certificate_expiry_seconds",
                   "Expiry of the service's own TLS certificate (Unix time, seconds)",
                   ["identity"]).labels(identity).set_function(current)


def certificate_facts(certificate: Path) -> tuple[str, float]:
    """(identity, notAfter as Unix time): the identity is the first DNS SAN, else the CN."""
    from cryptography import x509

    from meshserve.common.certificates import names_of

    pem = Path(certificate).read_bytes()
    expires = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    return names_of(pem).label, expires.replace(tzinfo=datetime.UTC).timestamp()


class _LoopMetric:
    """A metric recorded on the event loop without locks: one child per label set, made by
    `_child()`, whose plain numbers a scrape (another thread) reads."""

    def __init__(self, name: str, documentation: str, labels: Iterable[str],
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = tuple(labels)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def _child(self):
        raise NotImplementedError

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labels):
                raise ValueError(f"{self._name} takes labels {self._labels}")
            child = self._children[values] = self._child()
        return child


class TritonCounter(_LoopMetric):
    """A cumulative counter exposed under its exact name, as Triton does (`nv_inference_count`,
    not prometheus_client's `nv_inference_count_total`); typed `untyped` in the text format,
    since prometheus_client writes a counter's TYPE line only for `_total` names. Children
    are plain floats."""

    def _child(self) -> _Count:
        return _Count()

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, "unknown")]

    def collect(self) -> list[Metric]:
        metric = Metric(self._name, self._documentation, "unknown")
        for values, child in list(self._children.items()):
            metric.add_sample(self._name, dict(zip(self._labels, values, strict=True)),
                              child.value)
        return [metric]


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram(_LoopMetric):
    """A histogram observed on the event loop, exposed as prometheus_client's `Histogram` is
    (`_bucket{le}`, `_count`, `_sum`; no `_created`). An observation is a bisection and two
    additions (~0.3 µs), where prometheus_client's takes a lock per bucket, count and sum
    (~2.4 µs): the ingress and the batchers observe one per request. A scrape copies each
    child's counts at once, so its buckets agree with its count."""

    def __init__(self, name: str, documentation: str, labels: Iterable[str],
                 buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        bounds = tuple(float(b) for b in buckets)
        self._bounds = bounds if bounds[-1] == float("inf") else (*bounds, float("inf"))
        super().__init__(name, documentation, labels, registry)

    def _child(self) -> _Observations:
        return _Observations(self._bounds)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labels)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        return [family]


class _Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Counted in the first bucket whose bound is at least `value` (`le`)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where a service serves `/metrics` (`listen` empty: not served)."""

    registry: CollectorRegistry
    listen: str = ""
    port_file: Path | None = None


class HttpListener:
    """A started HTTP server on a daemon thread (`/metrics`, or the probes of
    meshserve.common.probes); `close()` stops it."""

    def __init__(self, server, thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) → (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def serve_metrics(registry: CollectorRegistry, address: str) -> HttpListener:
    """Serve `registry` at http://ADDRESS/metrics; port 0 picks a free port (see `.port`)."""
    host, port = split_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return HttpListener(server, thread)


# --- the recorders each service's core is handed -------------------------------------------


#: The protocol the request being served arrived by: "grpc", or "http" (set by the ingress's
#: HTTP front door in the task that serves each HTTP request). Labels the ingress's metrics.
GRPC_PROTOCOL = "grpc"
PROTOCOL: ContextVar[str] = ContextVar("meshserve_protocol", default=GRPC_PROTOCOL)


class IngressMetrics:
    """Client-visible outcomes at the ingress, per model, version and protocol (see
    PROTOCOL)."""

    def __init__(self, metrics: Metrics) -> None:
        self._success = metrics.triton_counter(
            "nv_inference_request_success", "Number of successful inference requests",
            ["model", "version", "protocol"])
        self._failure = metrics.triton_counter(
            "nv_inference_request_failure",
            "Number of failed inference requests, by gRPC status (reason)",
            ["model", "version", "reason", "protocol"])
        self._duration = metrics.histogram(
            "meshserve_request_duration_seconds",
            "Client-visible latency of inference requests at the ingress",
            ["model", "protocol"])
        self._successes: dict[tuple[str, str, str], Callable[[], None]] = {}
        self._failures: dict[tuple[str, str, str, str], Callable[[], None]] = {}
        self._durations: dict[tuple[str, str], Callable[[float], None]] = {}
        self.group = GroupMetrics(metrics, "ingress->router")
        self._denied = metrics.counter(
            "meshserve_ingress_denied", "Requests refused at the ingress, by reason "
            "(unauthenticated, permission_denied, rate_limited)", ["reason"])
        self._shed = metrics.counter(
            "meshserve_shed", "Requests refused by overload at the ingress, by reason "
            "(saturated: the model's queue is full; inflight_bytes)",
            ["model", "version", "reason"])
        # Triton's name for it, in its unit.
        self._first_answer = metrics.histogram(
            "nv_inference_first_response_histogram_ms",
            "Time from a decoupled model's request to its first answer (ms), at the ingress",
            ["model", "version"], buckets=tuple(bound * 1e3 for bound in LATENCY_BUCKETS))

    def denied(self, reason: str) -> None:
        self._denied.labels(reason).inc()

    def shed(self, model: str, version: str, reason: str) -> None:
        self._shed.labels(model, version, reason).inc()

    def first_answer(self, model: str, version: str, seconds: float) -> None:
        """A decoupled model's request answered: how long its first answer took."""
        self._first_answer.labels(model, version).observe(seconds * 1e3)

    def unserved(self, code: str) -> None:
        """A gRPC inference call that ended `code` before the ingress read it (its deadline
        passed, or its client reset it, while it waited for its handler): a failure of no
        model that the ingress knows of."""
        self._failure.labels("", "", code, GRPC_PROTOCOL).inc()

    def request(self, model: str, version: str, code: str, seconds: float) -> None:
        """One answered request; `code` is the gRPC status name ("OK" for success)."""
        protocol = PROTOCOL.get()
        if code == "OK":
            key = (model, version, protocol)
            inc = self._successes.get(key)
            if inc is None:
                inc = self._successes[key] = self._success.labels(*key).inc
        else:
            key = (model, version, code, protocol)
            inc = self._failures.get(key)
            if inc is None:
                inc = self._failures[key] = self._failure.labels(*key).inc
        inc()
        observe = self._durations.get((model, protocol))
        if observe is None:
            observe = self._durations[(model, protocol)] = self._duration.labels(
                model, protocol).observe
        observe(seconds)


class GroupMetrics:
    """Groups sent over one hop: their sizes, and failed group calls by status code."""

    def __init__(self, metrics: Metrics, hop: str) -> None:
        self._hop = hop
        self._size = metrics.histogram(
            "meshserve_group_size", "Requests per group sent to the next hop", ["hop", "model"],
            buckets=SIZE_BUCKETS)
        self._failed = metrics.counter(
            "meshserve_group_call_failures", "Group calls to the next hop that failed, by code",
            ["hop", "model", "code"])

    def recorder(self, model: str) -> Callable[[int, str], None]:
        """A callback for one model's forwarder: (group size, status name of the call)."""
        observe = self._size.labels(self._hop, model).observe
        failures: dict[str, Callable[[], None]] = {}

        def record(size: int, code: str) -> None:
            observe(size)
            if code != "OK":
                inc = failures.get(code)
                if inc is None:
                    inc = failures[code] = self._failed.labels(self._hop, model, code).inc
                inc()

        return record


class BatcherMetrics:
    """One model version's batching, in Triton's names and units (cumulative µs counters)."""

    def __init__(self, metrics: Metrics, model: str, version: str,
                 pending: Callable[[], int]) -> None:
        labels = ["model", "version"]

        def child(metric):
            return metric.labels(model, version)

        self._rows = child(metrics.triton_counter(
            "nv_inference_count", "Number of inferences performed (rows)", labels)).inc
        self._batches = child(metrics.triton_counter(
            "nv_inference_exec_count", "Number of model executions performed (batches)",
            labels)).inc
        self._request_us = child(metrics.triton_counter(
            "nv_inference_request_duration_us",
            "Cumulative inference request duration in microseconds (queue + compute)",
            labels)).inc
        self._queue_us = child(metrics.triton_counter(
            "nv_inference_queue_duration_us",
            "Cumulative inference queuing duration in microseconds", labels)).inc
        self._infer_us = child(metrics.triton_counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute inference duration in microseconds", labels)).inc
        child(metrics.gauge(
            "nv_inference_pending_request_count",
            "Instantaneous number of requests queued for a batch", labels)).set_function(pending)
        self._batch_size = child(metrics.histogram(
            "meshserve_batch_size", "Rows per batch sent to compute", labels,
            buckets=SIZE_BUCKETS)).observe
        self._queue_seconds = child(metrics.histogram(
            "meshserve_queue_seconds", "Time requests spent queued for a batch", labels)).observe
        self.failover = FailoverMetrics(metrics, model, version)

    def batch(self, rows: int, requests: int, infer_ns: int) -> None:
        """A batch ran; like Triton, each request is charged the batch's compute time."""
        self._rows(rows)
        self._batches()
        self._batch_size(rows)
        self._infer_us(infer_ns * requests / 1000)

    def request(self, ok: bool, total_ns: int, queue_ns: int | None) -> None:
        if queue_ns is not None:
            self._queue_seconds(queue_ns / 1e9)
        if ok:
            self._request_us(total_ns / 1000)
            if queue_ns is not None:
                self._queue_us(queue_ns / 1000)


class FailoverMetrics:
    """One model version's overload and failover at the batcher: requests shed (by reason:
    priority, queue_full, bytes, deadline), batch retries (by outcome), replica ejections,
    and each compute replica's circuit state (1 in rotation, 0 ejected or not serving)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._model, self._version = model, version
        self._shed = metrics.counter(
            "meshserve_shed", "Requests refused or evicted by overload, by reason",
            ["model", "version", "reason"])
        self._retries = metrics.counter(
            "meshserve_batcher_retries", "Batches whose replica failed, by retry outcome",
            ["model", "version", "outcome"])
        self._ejections = metrics.counter(
            "meshserve_batcher_replica_ejections", "Compute replicas taken out of rotation",
            ["model", "version", "replica"])
        self._up = metrics.gauge(
            "meshserve_batcher_replica_up", "1 when the compute replica is in rotation",
            ["model", "version", "replica"])

    def shed(self, reason: str) -> None:
        self._shed.labels(self._model, self._version, reason).inc()

    def retry(self, outcome: str) -> None:
        self._retries.labels(self._model, self._version, outcome).inc()

    def ejection(self, replica: str) -> None:
        self._ejections.labels(self._model, self._version, replica).inc()

    def replica_up(self, replica: str, up: bool) -> None:
        self._up.labels(self._model, self._version, replica).set(1 if up else 0)


class ComputeMetrics:
    """`meshserve_compute_seconds{model,version,device}`: one observation per batch run;
    `meshserve_compute_model_cpu_seconds_total`: the CPU the model itself took (the thread
    that ran it, from input tensors to output bytes), apart from the serving around it."""

    def __init__(self, metrics: Metrics) -> None:
        labels = ["model", "version", "device"]
        self._seconds = metrics.histogram(
            "meshserve_compute_seconds", "Time a batch took on the device (input, infer, output)",
            labels)
        self._cpu = metrics.counter(
            "meshserve_compute_model_cpu_seconds",
            "CPU time of the thread running the model (input, infer, output), summed", labels)

    def recorder(self, model: str, version: str,
                 device: str) -> Callable[[float, float], None]:
        """`record(seconds, cpu_seconds)` of one batch."""
        seconds, cpu = self._seconds.labels(model, version, device), self._cpu.labels(
            model, version, device)

        def record(took: float, cpu_seconds: float) -> None:
            seconds.observe(took)
            cpu.inc(cpu_seconds)

        return record


class CacheMetrics:
    """One model version's response cache, in Triton's names (durations: cumulative µs)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = ["model", "version"]

        def inc(name: str, documentation: str):
            return metrics.triton_counter(name, documentation, labels).labels(model, version).inc

        self._hits = inc("nv_cache_num_hits_per_model", "Number of response cache hits")
        self._misses = inc("nv_cache_num_misses_per_model", "Number of response cache misses")
        self._hit_us = inc("nv_cache_hit_duration_per_model",
                           "Cumulative time of response cache hits (lookup) in microseconds")
        self._miss_us = inc("nv_cache_miss_duration_per_model",
                            "Cumulative time of response cache misses (lookup and insertion) "
                            "in microseconds")

    def hit(self, ns: int) -> None:
        self._hits()
        self._hit_us(ns / 1000)

    def miss(self, ns: int) -> None:
        self._misses()
        self._miss_us(ns / 1000)


class XdsCollector:
    """The control plane's xDS state, read at scrape time (nothing on the hot path)."""

    def __init__(self, snapshot_version: Callable[[], str], nacks: Callable[[], int],
                 age: Callable[[], float]) -> None:
        self._snapshot_version = snapshot_version
        self._nacks = nacks
        self._age = age

    def collect(self):
        info = GaugeMetricFamily("meshserve_xds_snapshot_info",
                                 "The xDS snapshot version being served (value 1)",
                                 labels=["version"])
        info.add_metric([self._snapshot_version()], 1)
        yield info
        nacks = CounterMetricFamily("meshserve_xds_nacks", "xDS responses clients rejected")
        nacks.add_metric([], self._nacks())
        yield nacks
        age = GaugeMetricFamily("meshserve_xds_snapshot_age_seconds",
                                "Seconds since the served xDS snapshot last changed")
        age.add_metric([], self._age())
        yield age

    def describe(self):
        return []

    @classmethod
    def register(cls, metrics: Metrics, snapshot_version: Callable[[], str],
                 nacks: Callable[[], int], age: Callable[[], float]) -> None:
        metrics.registry.register(cls(snapshot_version, nacks, age))
