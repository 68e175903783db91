"""The router: reaches each model through the mesh and forwards groups to its batchers.

`meshserve router --control-plane HOST:PORT`: gRPC's own xDS client applies the control
plane's routes (version pins by header, weighted split), so a traffic shift reaches every
router live, without a restart.
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass

import grpc
from opentelemetry.trace import StatusCode

from meshserve.common import runtime
from meshserve.common.forwarding import (
    Entry,
    GroupForwarder,
    GroupObserver,
    deadline_of,
    raise_for,
)
from meshserve.common.identity import Callers, add_callers_flag, default_callers
from meshserve.common.metrics import GroupMetrics, Metrics
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import ReloadingChannel, TlsFiles, server_credentials
from meshserve.common.tracing import Tracing, context_of, traceparent_of
from meshserve.mesh.policy import PIN_HEADER
from meshserve.protocol import groups_pb2_grpc, grpc_service_pb2_grpc
from meshserve.protocol.admin_pb2 import ShadowReport, StatusRequest
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.protocol.groups_pb2 import GroupItem, InferGroupResult, ItemResult
from meshserve.router.shadow import Shadowing


@dataclass(frozen=True)
class RouterSettings:
    listen: str
    tls: TlsFiles
    control_plane: str
    control_plane_identity: str = "control-plane"
    batcher_identity: str = "batcher"
    region: str = "local"
    allowed_callers: frozenset[str] = default_callers("router")


def bootstrap(settings: RouterSettings) -> str:
    """gRPC's xDS bootstrap: the control plane over mutual TLS; keep the last configuration
    when the control plane goes away (`ignore_resource_deletion`). gRPC re-reads the
    certificate files every `refresh_interval`."""
    tls = {"ca_certificate_file": str(settings.tls.ca),
           "certificate_file": str(settings.tls.cert),
           "private_key_file": str(settings.tls.key),
           "refresh_interval": "2s"}
    return json.dumps({
        "xds_servers": [{"server_uri": settings.control_plane,
                         "channel_creds": [{"type": "tls", "config": tls}],
                         "server_features": ["xds_v3", "ignore_resource_deletion"]}],
        "node": {"id": f"router-{socket.gethostname()}-{os.getpid()}",
                 "cluster": "meshserve-router", "locality": {"region": settings.region}}})


class ModelRoute:
    """One model reached through the mesh: `xds:///<model>`, steered by the control plane.

    Requests pinned to a version travel in groups of their own with the pin header; the
    rest are split by the route's weights, one group at a time.
    """

    def __init__(self, model: str, tls: TlsFiles, batcher_identity: str,
                 observe: GroupObserver | None = None) -> None:
        self.model = model
        self._observe = observe
        self._reloading = ReloadingChannel(f"xds:///{model}", tls, batcher_identity)
        self._bind()
        self._forwarders: dict[str, GroupForwarder] = {}

    def _bind(self) -> None:
        self.channel = self._reloading.channel
        self.groups = groups_pb2_grpc.GroupInferenceStub(self.channel)
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def refresh_certificates(self) -> None:
        """A new channel when the TLS files changed; the old one finishes its calls."""
        if self._reloading.refresh():
            self._bind()

    async def close(self) -> None:
        await self._reloading.close()

    def forwarder(self, pin: str) -> GroupForwarder:
        forwarder = self._forwarders.get(pin)
        if forwarder is None:
            metadata = self.pin(pin)

            async def call(group, timeout):
                return await self.groups.Infer(group, timeout=timeout, metadata=metadata)

            where = f"batcher of {self.model}" + (f"@{pin}" if pin else "")
            forwarder = GroupForwarder(call, self.model, where, observe=self._observe)
            self._forwarders[pin] = forwarder
        return forwarder

    @staticmethod
    def pin(version: str):
        return ((PIN_HEADER, version),) if version else None


class Router:
    """`groups`, when given, makes each model's group observer: `groups.recorder(model)`.
    `tracing`, when given, traces each request's routing (`router.route`)."""

    def __init__(self, tls: TlsFiles, batcher_identity: str, groups=None,
                 tracing: Tracing | None = None) -> None:
        self._tls = tls
        self._tracing = tracing
        self._groups = groups
        self._identity = batcher_identity
        self.models: dict[str, ModelRoute] = {}
        self.shadowing = Shadowing()

    def route(self, model: str) -> ModelRoute:
        route = self.models.get(model)
        if route is None:
            observe = None if self._groups is None else self._groups.recorder(model)
            route = self.models[model] = ModelRoute(model, self._tls, self._identity, observe)
        return route

    async def infer(self, model: str, items) -> list[ItemResult]:
        """Results in the order of `items`; each pin's share travels as one parcel."""
        arrived = time.monotonic()
        route = self.route(model)
        parcels: dict[str, tuple[list[int], list[Entry]]] = {}
        for i, item in enumerate(items):
            positions, entries = parcels.setdefault(item.request.model_version, ([], []))
            positions.append(i)
            entries.append((item, deadline_of(item.timeout_us, arrived)))
        unpinned = parcels.get("")
        shadow = unpinned and self.shadowing.mirror(
            model, unpinned[1], lambda version, copies: route.forwarder(version).forward(copies))
        spans = None if self._tracing is None else self._start_spans(model, items, bool(shadow))
        answers = await asyncio.gather(*(
            route.forwarder(pin).forward(entries) for pin, (_, entries) in parcels.items()))
        results: list[ItemResult | None] = [None] * len(items)
        for (pin, (positions, _)), answer in zip(parcels.items(), answers):
            if shadow and not pin:
                self.shadowing.compare(model, shadow, answer)
            for i, result in zip(positions, answer):
                results[i] = result
        if spans is not None:
            end_spans(spans, results)
        return results  # type: ignore[return-value]

    def _start_spans(self, model: str, items, shadowed: bool) -> list:
        """One `router.route` span per request; the request travels on as its child."""
        spans = []
        for item in items:
            pin = item.request.model_version
            span = self._tracing.start("router.route", context_of(item.traceparent), {
                "model": model, "pin": pin, "split": not pin,
                "shadow": shadowed and not pin})
            item.traceparent = traceparent_of(span)
            spans.append(span)
        return spans

    async def close(self) -> None:
        await self.shadowing.close()
        for route in self.models.values():
            await route.close()


def end_spans(spans: list, results: list[ItemResult]) -> None:
    for span, result in zip(spans, results, strict=True):
        if result.code == 0:
            span.set_attribute("version", result.response.model_version)
        else:
            span.set_status(StatusCode.ERROR, result.message)
        span.end()


async def follow_control_plane(router: Router, control_plane: ReloadingChannel,
                               health: HealthServicer, interval: float = 1.0) -> None:
    """Ready once the control plane has answered (afterwards the router keeps serving with
    its last configuration while the control plane is away); learn shadow targets from
    the policies and report how shadow answers compared. Picks up rotated certificates."""
    while True:
        control_plane.refresh()
        for route in list(router.models.values()):
            route.refresh_certificates()
        admin = AdminStub(control_plane.channel)
        with contextlib.suppress(grpc.aio.AioRpcError):
            status = await admin.Status(StatusRequest(), timeout=interval * 2)
            health.set(True)
            router.shadowing.targets = {
                m.policy.model: (m.policy.shadow.version, m.policy.shadow.percent)
                for m in status.models if m.policy.shadow.version}
            for (model, version), counts in router.shadowing.take_counts().items():
                await admin.ReportShadow(ShadowReport(
                    model=model, version=version, compared=counts.compared,
                    differing=counts.differing, max_abs_diff=counts.max_abs_diff),
                    timeout=interval * 2)
        await asyncio.sleep(interval)


class GroupServicer(groups_pb2_grpc.GroupInferenceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Infer(self, request, context):
        results = await self._router.infer(request.model_name, request.items)
        return InferGroupResult(results=results)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Readiness and statistics of a model version behind the mesh (pinned when a version
    is named); ModelInfer for debugging."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def ModelReady(self, request, context):
        route = self._router.route(request.name)
        return await route.inference.ModelReady(request, timeout=5,
                                                metadata=route.pin(request.version))

    async def ModelStatistics(self, request, context):
        route = self._router.route(request.name)
        return await route.inference.ModelStatistics(request, timeout=5,
                                                     metadata=route.pin(request.version))

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        item = GroupItem(request=request, timeout_us=int(remaining * 1e6) if remaining else 0)
        [result] = await self._router.infer(request.model_name, [item])
        raise_for(result)
        return result.response


def build_service(settings: RouterSettings, metrics: Metrics | None = None,
                  tracing: Tracing | None = None) -> Service:
    # Read by gRPC when the first xds:/// channel is made; this process has no other.
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap(settings)
    groups = None if metrics is None else GroupMetrics(metrics, "router->batcher")
    router = Router(settings.tls, settings.batcher_identity, groups, tracing)
    control_plane = ReloadingChannel(settings.control_plane, settings.tls,
                                     settings.control_plane_identity)
    health = HealthServicer()

    def register(server) -> None:
        groups_pb2_grpc.add_GroupInferenceServicer_to_server(GroupServicer(router), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(router), server)

    return Service(settings.listen, server_credentials(settings.tls), register, health,
                   background=[lambda: follow_control_plane(router, control_plane, health)],
                   cleanup=[router.close, control_plane.close,
                            *([] if tracing is None else [tracing.close])],
                   callers=Callers("router", settings.allowed_callers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve router", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--control-plane", required=True, metavar="HOST:PORT",
                        help="the xDS control plane that steers traffic between versions")
    parser.add_argument("--control-plane-identity", default="control-plane",
                        help="identity the control plane's certificate must name")
    parser.add_argument("--batcher-identity", default="batcher",
                        help="identity the batchers' certificates must name")
    parser.add_argument("--region", default="local", help="this router's locality region")
    add_callers_flag(parser, "router")
    args = parser.parse_args(argv)
    runtime.configure_logging("router", args.log_level, args.log_format)
    settings = RouterSettings(listen=args.listen, tls=runtime.tls_files(args),
                              control_plane=args.control_plane,
                              control_plane_identity=args.control_plane_identity,
                              batcher_identity=args.batcher_identity, region=args.region,
                              allowed_callers=args.allow_callers)

    return runtime.run_service("router", args, build_service, settings)
