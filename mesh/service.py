"""The control plane: xDS (ADS) for the routers and the admin API, on one mutual-TLS port.

`meshserve control-plane --store PATH [--listen HOST:PORT] --tls-cert F --tls-key F --tls-ca F`
State (policies, endpoints, canaries, audit log) lives in the store, so a restarted control
plane serves the same routes. With `--policy FILE` (the ingress's access policy, re-read when
it changes) every admin RPC is an action on a model that the caller's certificate identity
must be allowed (`meshserve.mesh.admin_access`); without one, every admitted client
certificate may read and only the operators' certificates may change anything.
"""

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from envoy.service.discovery.v3 import ads_pb2_grpc

from meshserve.common import model_files, runtime
from meshserve.common.access import PolicyFile
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.identity import OPERATORS, Callers, add_callers_flag, default_callers
from meshserve.common.metrics import Metrics, XdsCollector
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.common.upstream import follow_stream
from meshserve.mesh.admin import AdminServicer
from meshserve.mesh.control import ControlPlane
from meshserve.mesh.policy import Endpoint
from meshserve.mesh.readiness import Readiness
from meshserve.mesh.registry import Registry
from meshserve.mesh.store import Store
from meshserve.mesh.xds import AggregatedDiscovery
from meshserve.protocol import admin_pb2_grpc
from meshserve.protocol.groups_pb2 import CountersRequest
from meshserve.protocol.groups_pb2_grpc import GroupInferenceStub


@dataclass(frozen=True)
class ControlPlaneSettings:
    listen: str
    tls: TlsFiles
    store: str
    batcher_identity: str = "batcher"
    sample_seconds: float = 1.0
    kubernetes_namespace: str = ""
    # The model registry (off when no repository is given): pushed versions land in
    # `model_repository`, every artifact ever pushed in `registry_dir`/sha256/.
    model_repository: Path | None = None
    registry_dir: Path | None = None
    signing_key: Path | None = None
    kek_file: Path | None = None
    allowed_callers: frozenset[str] = default_callers("control-plane")
    # The access policy of the admin API (None: reads for every admitted caller, changes for
    # the operators' certificates only).
    policy_file: Path | None = None


@dataclass
class _Feed:
    """One batcher's counters as last pushed (None while there are none), and when the
    control plane last asked for them."""

    read_at: float
    latest: tuple | None = None
    task: asyncio.Task | None = None


class CounterFeeds:
    """Batchers' counters as each batcher pushes them (WatchCounters: at most a message a
    second while they change, none while the batcher is idle), over one long-lived mTLS
    channel per batcher, with the certificate files of the moment when it (re)connects.
    Reading an endpoint's returns the latest counters received (LookupError while there are
    none)."""

    RETRY_S = 1.0
    FORGET_S = 60.0  # a batcher no longer asked about (gone from the mesh) is let go
    INTERVAL_S = 1.0  # how often a batcher looks at its counters to push them

    def __init__(self, tls: TlsFiles, identity: str, clock=time.monotonic) -> None:
        self._tls = tls
        self._identity = identity
        self._clock = clock
        self._feeds: dict[str, _Feed] = {}

    async def __call__(self, endpoint: Endpoint):
        now = self._clock()
        feed = self._feeds.get(endpoint.address)
        if feed is None:
            feed = self._feeds[endpoint.address] = _Feed(now)
            feed.task = asyncio.get_running_loop().create_task(
                self._follow(endpoint.address, feed))
        feed.read_at = now
        for address, other in list(self._feeds.items()):
            if now - other.read_at > self.FORGET_S:
                other.task.cancel()
                del self._feeds[address]
        if feed.latest is None:
            raise LookupError(f"no counters from the batcher at {endpoint.address} yet")
        return feed.latest

    async def _follow(self, address: str, feed: _Feed) -> None:
        def heard(counters) -> None:
            feed.latest = (counters.requests, counters.failures, tuple(counters.bucket_counts),
                           tuple(counters.bucket_bounds_ms))

        def ended() -> None:
            feed.latest = None

        await follow_stream(
            ReloadingChannel(address, self._tls, self._identity),
            lambda channel: GroupInferenceStub(channel).WatchCounters(
                CountersRequest(interval_ms=int(self.INTERVAL_S * 1000))),
            heard, ended, self.RETRY_S)

    async def close(self) -> None:
        for feed in self._feeds.values():
            feed.task.cancel()
        await asyncio.gather(*(f.task for f in self._feeds.values()), return_exceptions=True)


def build_service(settings: ControlPlaneSettings, metrics: Metrics | None = None) -> Service:
    reader = CounterFeeds(settings.tls, settings.batcher_identity)
    control = ControlPlane(Store.open(settings.store), reader, settings.sample_seconds,
                           counts_lag=CounterFeeds.INTERVAL_S)
    registry = None
    if settings.model_repository is not None:
        repository = settings.model_repository
        registry = Registry(
            control.store, repository, settings.registry_dir or repository.parent / "registry",
            model_files.signing_key(settings.signing_key or
                                    repository.parent / "keys" / "signing.key", create=True),
            model_files.read_kek(settings.kek_file) if settings.kek_file else None)
    if metrics is not None:
        XdsCollector.register(metrics, lambda: control.cache.snapshot.version,
                              lambda: control.cache.nack_count,
                              lambda: time.monotonic() - control.cache.changed_at)
    health = HealthServicer()
    policy = (PolicyFile(settings.policy_file, time.monotonic).current
              if settings.policy_file is not None else None)
    count_denied = None
    if metrics is not None:
        denied = metrics.counter("meshserve_admin_denied",
                                 "Admin API calls refused by the access policy, by action",
                                 ["action"])
        count_denied = lambda action: denied.labels(action).inc()  # noqa: E731
    readiness = Readiness(control.store, control.changes, settings.tls,
                          settings.batcher_identity)
    admin = AdminServicer(control, registry, policy, count_denied, readiness)

    def register(server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AggregatedDiscovery(control.cache), server)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)

    async def start_work() -> None:
        control.resume_canaries()
        health.set(True)
        await control.sample_batchers()

    background = [start_work, readiness.follow]
    if settings.kubernetes_namespace:
        from meshserve.mesh.kube import follow_endpoint_slices

        background.append(lambda: follow_endpoint_slices(control, settings.kubernetes_namespace))

    async def close() -> None:
        await readiness.close()
        await control.close()
        await reader.close()

    return Service(settings.listen, server_ssl_context(settings.tls), register, health,
                   background=background, cleanup=[close],
                   callers=Callers("control-plane", settings.allowed_callers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve control-plane", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--store", required=True,
                        type=runtime.url_without_password("use PGPASSWORD or ~/.pgpass"),
                        help="the mesh's state: a SQLite file (or sqlite:///path) or a "
                             "postgresql:// URL (password from PGPASSWORD or ~/.pgpass)")
    parser.add_argument("--batcher-identity", default="batcher")
    parser.add_argument("--sample-seconds", type=float, default=1.0,
                        help="how often batchers' counters are read")
    parser.add_argument("--kubernetes-namespace", default="",
                        help="watch batchers' EndpointSlices in this namespace (in a cluster)")
    add_callers_flag(parser, "control-plane")
    parser.add_argument("--model-repository", type=Path,
                        help="keep a model registry: pushed versions land in this repository")
    parser.add_argument("--registry-dir", type=Path,
                        help="content-addressed store of every pushed artifact (default: "
                             "registry/ beside the repository)")
    parser.add_argument("--signing-key", type=Path,
                        help="Ed25519 key that signs manifests, created (0600) when missing "
                             "(default: keys/signing.key beside the repository)")
    parser.add_argument("--kek-file", type=Path,
                        help="key-encryption key for pushes with --encrypt (default: "
                             f"${model_files.KEK_ENV})")
    parser.add_argument("--policy", type=Path,
                        help="access policy of the admin API (the ingress's YAML policy, "
                             "re-read when it changes; default: no policy, where every "
                             "client certificate may read and only the operators' "
                             f"({OPERATORS}) may change anything)")
    args = parser.parse_args(argv)
    runtime.configure_logging("control-plane", args.log_level, args.log_format)
    settings = ControlPlaneSettings(listen=args.listen, tls=runtime.tls_files(args),
                                    store=args.store, batcher_identity=args.batcher_identity,
                                    sample_seconds=args.sample_seconds,
                                    kubernetes_namespace=args.kubernetes_namespace,
                                    model_repository=args.model_repository,
                                    registry_dir=args.registry_dir,
                                    signing_key=args.signing_key,
                                    kek_file=model_files.kek_path(args.kek_file,
                                                                  dict(os.environ)),
                                    allowed_callers=args.allow_callers,
                                    policy_file=args.policy)

    return runtime.run_service("control-plane", args, build_service, settings, traced=False)
