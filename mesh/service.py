"""The control plane: xDS (ADS) for the routers and the admin API, on one mutual-TLS port.

`meshserve control-plane --store PATH [--listen HOST:PORT] --tls-cert F --tls-key F --tls-ca F`
State (policies, endpoints, canaries, audit log) lives in the store, so a restarted control
plane serves the same routes.
"""

import argparse
import time
from dataclasses import dataclass

from envoy.service.discovery.v3 import ads_pb2_grpc

from meshserve.common import runtime
from meshserve.common.metrics import Metrics, XdsCollector
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import TlsFiles, secure_channel, server_credentials
from meshserve.mesh.admin import AdminServicer
from meshserve.mesh.control import ControlPlane
from meshserve.mesh.policy import Endpoint
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


class CounterReader:
    """Reads batchers' counters over one long-lived mTLS channel per batcher."""

    def __init__(self, tls: TlsFiles, identity: str) -> None:
        self._tls = tls
        self._identity = identity
        self._stubs: dict[str, tuple] = {}

    async def __call__(self, endpoint: Endpoint):
        if endpoint.address not in self._stubs:
            channel = secure_channel(endpoint.address, self._tls, self._identity)
            self._stubs[endpoint.address] = (channel, GroupInferenceStub(channel))
        _, stub = self._stubs[endpoint.address]
        counters = await stub.Counters(CountersRequest(), timeout=2)
        return (counters.requests, counters.failures, tuple(counters.bucket_counts),
                tuple(counters.bucket_bounds_ms))

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()


def build_service(settings: ControlPlaneSettings, metrics: Metrics | None = None) -> Service:
    reader = CounterReader(settings.tls, settings.batcher_identity)
    control = ControlPlane(Store.open(settings.store), reader, settings.sample_seconds)
    if metrics is not None:
        XdsCollector.register(metrics, lambda: control.cache.snapshot.version,
                              lambda: len(control.cache.nacks),
                              lambda: time.monotonic() - control.cache.changed_at)
    health = HealthServicer()

    def register(server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AggregatedDiscovery(control.cache), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(control), server)

    async def start_work() -> None:
        control.resume_canaries()
        health.set(True)
        await control.sample_batchers()

    background = [start_work]
    if settings.kubernetes_namespace:
        from meshserve.mesh.kube import follow_endpoint_slices

        background.append(lambda: follow_endpoint_slices(control, settings.kubernetes_namespace))

    async def close() -> None:
        await control.close()
        await reader.close()

    return Service(settings.listen, server_credentials(settings.tls), register, health,
                   background=background, cleanup=[close])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve control-plane", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--store", required=True,
                        help="the mesh's state: a SQLite file (or sqlite:///path) or a "
                             "postgresql:// URL (password from PGPASSWORD or ~/.pgpass)")
    parser.add_argument("--batcher-identity", default="batcher")
    parser.add_argument("--sample-seconds", type=float, default=1.0,
                        help="how often batchers' counters are read")
    parser.add_argument("--kubernetes-namespace", default="",
                        help="watch batchers' EndpointSlices in this namespace (in a cluster)")
    args = parser.parse_args(argv)
    runtime.configure_logging("control-plane", args.log_level, args.log_format)
    settings = ControlPlaneSettings(listen=args.listen, tls=runtime.tls_files(args),
                                    store=args.store, batcher_identity=args.batcher_identity,
                                    sample_seconds=args.sample_seconds,
                                    kubernetes_namespace=args.kubernetes_namespace)

    return runtime.run_service("control-plane", args, build_service, settings, traced=False)
