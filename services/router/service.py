"""The router: reaches each model through the mesh and forwards groups to its batchers.

`meshserve router --control-plane HOST:PORT`: gRPC's own xDS client applies the control
plane's routes (version pins by header, weighted split), so a traffic shift reaches every
router live, without a restart.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc
from opentelemetry.trace import StatusCode

from meshserve.common import runtime
from meshserve.common.errors import ServingError, Unavailable
from meshserve.common.forwarding import (
    GroupHead,
    GroupObserver,
    error_group,
    error_result,
    failure_result,
    not_a_group,
    one_item,
    raise_for,
)
from meshserve.common.http2_server import server_ssl_context
from meshserve.common.identity import Callers, add_callers_flag, default_callers
from meshserve.common.metrics import GroupMetrics, Metrics
from meshserve.common.server import HealthServicer, Service
from meshserve.common.streams import (
    Early,
    GroupStream,
    StreamBroken,
    group_handler,
    start_stream,
)
from meshserve.common.tls import ReloadingChannel, TlsFiles
from meshserve.common.tracing import Tracing, context_of, traceparent_of
from meshserve.common.version_pin import PIN_HEADER
from meshserve.protocol import grpc_service_pb2, grpc_service_pb2_grpc
from meshserve.protocol.admin_pb2 import ShadowReport, StatusRequest
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.protocol.groups_pb2 import InferGroup, InferGroupResult, ItemResult
from meshserve.router.known import KnownModels
from meshserve.router.shadow import Shadowing
from meshserve.router.split import MeshSplits, Split


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

    Each version has its long-lived streams, opened with the version's pin header (so gRPC's
    xDS client picks one of the version's batchers), one per batcher endpoint, each opened
    anew every STREAM_MAX_AGE_S; an unpinned group goes to a version picked by the route's
    weights (see `meshserve.router.split`).
    """

    def __init__(self, model: str, tls: TlsFiles, batcher_identity: str, splits: MeshSplits,
                 draw: Callable[[], float], observe: GroupObserver | None = None) -> None:
        self.model = model
        self._observe = observe
        self._splits = splits
        self._draw = draw
        # Resolved through the xDS client before it connects: a rebuilt one takes over once READY.
        # The target is a URI: gRPC decodes its %-escapes, so the name goes escaped ('%', '#').
        self._reloading = ReloadingChannel(f"xds:///{quote(model, safe='')}", tls,
                                           batcher_identity, ready_first=True)
        self._bind()
        self._streams: dict[str, list[GroupStream]] = {}
        self._turns = itertools.count()
        self._routed: Split | None = None  # the split the open streams were opened under

    def _bind(self) -> None:
        self.channel = self._reloading.channel
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        # Resolving the target subscribes gRPC's xDS client to the model's resources.
        self.channel.get_state(try_to_connect=True)

    def refresh_certificates(self) -> None:
        """A new channel when the TLS files changed, once it has connected; the old streams
        finish their groups."""
        if self._reloading.refresh():
            self._bind()
            self._retire_streams()

    def _retire_streams(self) -> None:
        """The next group of each version opens a new stream, which gRPC's xDS client routes
        by the configuration of the moment; the old streams finish their groups."""
        for streams in self._streams.values():
            for stream in streams:
                stream.retire()

    async def close(self) -> None:
        for streams in self._streams.values():
            for stream in streams:
                await stream.close()
        await self._reloading.close()

    async def split(self, deadline: float | None) -> Split:
        """The model's split as gRPC's xDS client holds it; right after start, waits (until
        `deadline`, at most SPLIT_WAIT_S) for the control plane's first answer."""
        split = self._splits.get(self.model)
        if split is not None:
            return split
        give_up = time.monotonic() + SPLIT_WAIT_S
        if deadline is not None:
            give_up = min(give_up, deadline)
        while (split := self._splits.get(self.model)) is None:
            if time.monotonic() >= give_up:
                raise Unavailable(f"no route to model '{self.model}' from the control plane "
                                  "yet", SPLIT_POLL_S * 10)
            await asyncio.sleep(SPLIT_POLL_S)
        return split

    def stream(self, version: str, endpoints: int) -> GroupStream:
        streams = self._streams.setdefault(version, [])
        wanted = max(1, endpoints)
        while len(streams) < wanted:
            metadata = self.pin(version)
            streams.append(GroupStream(lambda m=metadata: start_stream(self.channel, m),
                                       f"batcher of {self.model}@{version}",
                                       max_age=STREAM_MAX_AGE_S))
        return streams[next(self._turns) % wanted]

    async def send(self, group: GroupHead, body: bytes, early: Early | None = None) -> bytes:
        """`body` (a serialized InferGroup, whose head is `group`) to the version it goes to;
        its answer, as bytes (early partial answers pass through to `early`)."""
        timeout = group.timeout_us / 1e6 if group.timeout_us else None
        deadline = None if timeout is None else time.monotonic() + timeout
        split = await self.split(deadline)
        version = group.version or split.pick(self._draw)
        if version is None:
            raise Unavailable(f"no version of model '{self.model}' carries traffic", 1.0)
        if group.version and version not in split.versions:
            raise Unavailable(f"model '{self.model}' version '{version}' has no route in "
                              "the mesh", 1.0)
        if split is not self._routed:
            if self._routed is not None and split.endpoints != self._routed.endpoints:
                self._retire_streams()  # a batcher came or went: route anew
            self._routed = split  # weights alone are drawn here: the streams stay
        stream = self.stream(version, len(split.endpoints.get(version, ())))
        left = None if deadline is None else deadline - time.monotonic()
        code = "OK"
        try:
            return await stream.send(body, left, early=early)
        except StreamBroken as broken:
            code = broken.code.name
            raise Failed(failure_result(broken.code, broken.details, stream.upstream)) from None
        except TimeoutError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED.name
            raise Failed(failure_result(grpc.StatusCode.DEADLINE_EXCEEDED, "",
                                        stream.upstream)) from None
        except asyncio.CancelledError:  # the ingress gave the group up: so does the batcher
            code = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            if self._observe is not None:
                self._observe(group.items, code)

    @staticmethod
    def pin(version: str):
        return ((PIN_HEADER, version),) if version else None


# What a request's span ends with when the ingress gave its group up.
GIVEN_UP = ItemResult(code=grpc.StatusCode.CANCELLED.value[0],
                      message="the ingress gave the group up")


class Failed(Exception):
    """A group that could not be answered: each of its items gets `result`."""

    def __init__(self, result: ItemResult) -> None:
        super().__init__(result.message)
        self.result = result


# Right after start, how long a group waits for the control plane's first route.
SPLIT_WAIT_S = 5.0
SPLIT_POLL_S = 0.005
# gRPC's round robin places each stream on a batcher that is ready when the stream opens; one
# opened while a batcher was starting or restarting lands on another, so each stream is opened
# anew after this long and the load spreads again over every batcher.
STREAM_MAX_AGE_S = 10.0


class Router:
    """`groups`, when given, makes each model's group observer: `groups.recorder(model)`.
    `tracing`, when given, traces each request's routing (`router.route`).

    A group is forwarded as the bytes it came in (the router reads only its header), unless
    tracing or a shadow copy needs its items. `known`, when given, holds the models the
    control plane routes: a model it does not is refused at once, and no route is made for
    it (see `meshserve.router.known`)."""

    def __init__(self, tls: TlsFiles, batcher_identity: str, groups=None,
                 tracing: Tracing | None = None, splits: MeshSplits | None = None,
                 draw: Callable[[], float] = random.random,
                 known: KnownModels | None = None) -> None:
        self._tls = tls
        self.known = known
        self._tracing = tracing
        self._groups = groups
        self._identity = batcher_identity
        self._splits = splits or MeshSplits(cygrpc.dump_xds_configs, time.monotonic)
        self._draw = draw
        self.models: dict[str, ModelRoute] = {}
        self.shadowing = Shadowing()

    async def route(self, model: str, timeout: float | None = None) -> ModelRoute:
        """The route to `model`, made on first use once the control plane is known to route
        it (waiting for its answer at most `timeout` and SPLIT_WAIT_S); Unavailable naming the
        model where it does not."""
        route = self.models.get(model)
        if route is not None:
            return route
        if self.known is not None:
            wait = SPLIT_WAIT_S if timeout is None else min(timeout, SPLIT_WAIT_S)
            if not await self.known.knows(model, wait):
                raise no_route(model, self.known.names is None)
            route = self.models.get(model)  # made while this call waited
            if route is not None:
                return route
        observe = None if self._groups is None else self._groups.recorder(model)
        route = self.models[model] = ModelRoute(model, self._tls, self._identity,
                                                self._splits, self._draw, observe)
        return route

    async def handle(self, body: bytes, early: Early | None = None) -> bytes:
        """A serialized InferGroup in, its serialized InferGroupResult out; the batcher's
        early answers pass through as they are. Only the group's head is read, unless the
        group is traced or shadowed: its items are the batcher's to parse."""
        try:
            head = GroupHead.read(body)
            inspected = self._tracing is not None or self.shadowing.shadows(head)
            group = InferGroup.FromString(body) if inspected else None
        except (ValueError, DecodeError) as error:
            raise not_a_group(error) from None
        try:
            route = self.models.get(head.model_name) or await self.route(
                head.model_name, head.timeout_us / 1e6 or None)  # made on first use
            if group is None:
                return await route.send(head, body, early)
            return await self._inspected(route, group, early)
        except Failed as failed:
            return error_group(head.items, failed.result)
        except ServingError as error:
            return error_group(head.items, error_result(error))

    async def _inspected(self, route: ModelRoute, group: InferGroup,
                         early: Early | None) -> bytes:
        """The slow path: a `router.route` span per request, a shadow copy of the group.
        The batcher may answer the group in parts (`InferGroupResult.items`): its early
        answers pass on to `early`, and each answer ends the spans of the requests it
        answers."""
        shadow = self.shadowing.mirror(group, self._shadow_sender(route))
        spans = None if self._tracing is None else self._start_spans(group, bool(shadow))
        results: list[ItemResult | None] = []  # by position, once a part came early

        async def partial(body: bytes) -> None:
            if not results:
                results.extend([None] * len(group.items))
            positions = place(results, InferGroupResult.FromString(body))
            if spans is not None:
                end_spans(spans, results, positions)
            if early is not None:
                await early(body)

        try:
            reply = await route.send(GroupHead.of(group), group.SerializeToString(), partial)
        except (Failed, asyncio.CancelledError) as failed:
            if spans is not None:
                unanswered = [p for p in range(len(spans)) if not results or results[p] is None]
                end_spans(spans, [GIVEN_UP if isinstance(failed, asyncio.CancelledError) else
                                  failed.result] * len(spans), unanswered)
            raise
        answer = InferGroupResult.FromString(reply)
        if results:  # answered in parts: this is the rest
            answered, positions = results, place(results, answer)
        else:  # the whole group, in order
            answered, positions = answer.results, range(len(answer.results))
        if shadow:
            self.shadowing.compare(group.model_name, shadow, list(answered))
        if spans is not None:
            end_spans(spans, answered, positions)
        return reply

    @staticmethod
    def _shadow_sender(route: ModelRoute):
        async def send(copy: InferGroup) -> list[ItemResult | None]:
            results: list[ItemResult | None] = [None] * len(copy.items)

            async def partial(body: bytes) -> None:
                place(results, InferGroupResult.FromString(body))

            reply = await route.send(GroupHead.of(copy), copy.SerializeToString(), partial)
            place(results, InferGroupResult.FromString(reply))
            return results

        return send

    def _start_spans(self, group: InferGroup, shadowed: bool) -> list:
        """One `router.route` span per request; the request travels on as its child."""
        spans = []
        pin = group.version
        for item in group.items:
            span = self._tracing.start("router.route", context_of(item.traceparent), {
                "model": group.model_name, "pin": pin, "split": not pin,
                "shadow": shadowed and not pin})
            item.traceparent = traceparent_of(span)
            spans.append(span)
        return spans

    async def close(self) -> None:
        await self.shadowing.close()
        for route in self.models.values():
            await route.close()


def no_route(model: str, unheard: bool) -> Unavailable:
    """The refusal of a request for a model the control plane does not route (or before it
    has said which it does)."""
    why = ("the control plane has not said which models it routes yet" if unheard else
           "the control plane has no traffic policy for it")
    return Unavailable(f"no route to model '{model}' in the mesh: {why}", 1.0)


def place(results: list[ItemResult | None], answer: InferGroupResult) -> list[int]:
    """Put an answer's results at the positions in the group they answer (all, in order,
    when it names none; none when it has no results); those positions. A decoupled model's
    answers with more to come are not placed: an item's result is its last."""
    if not answer.results:
        return []
    positions = answer.items or range(len(results))
    placed = []
    for position, result in zip(positions, answer.results, strict=True):
        if not result.more:
            results[position] = result
            placed.append(position)
    return placed


def end_spans(spans: list, results: list, positions: Iterable[int]) -> None:
    """End the spans at `positions`, each with its request's result."""
    for position in positions:
        span, result = spans[position], results[position]
        if result.code == 0:
            span.set_attribute("version", result.response.model_version)
        else:
            span.set_status(StatusCode.ERROR, result.message)
        span.end()


async def follow_control_plane(router: Router, control_plane: ReloadingChannel,
                               health: HealthServicer, interval: float = 3.0) -> None:
    """Ready once the control plane has answered (afterwards the router keeps serving with
    its last configuration while the control plane is away); learn shadow targets from
    the policies and report how shadow answers compared, every `interval` seconds (a status
    a second cost ~0.5 % of a core, idle). Picks up rotated certificates."""
    while True:
        control_plane.refresh()
        for route in list(router.models.values()):
            route.refresh_certificates()
        admin = AdminStub(control_plane.channel)
        with contextlib.suppress(grpc.aio.AioRpcError):
            status = await admin.Status(StatusRequest(), timeout=interval * 2)
            if router.known is not None:
                router.known.heard(m.policy.model for m in status.models)
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


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Readiness and statistics of a model version behind the mesh (pinned when a version
    is named); ModelInfer for debugging."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def ModelReady(self, request, context):
        """Not ready (never an error) when no batcher of the version answers: none is up,
        or the policy leaves it none (a region without endpoints, say), or the mesh does not
        route the model."""
        try:
            route = await self._router.route(request.name, context.time_remaining())
            return await route.inference.ModelReady(request, timeout=5,
                                                    metadata=route.pin(request.version))
        except (grpc.aio.AioRpcError, ServingError):
            return grpc_service_pb2.ModelReadyResponse(ready=False)

    async def ModelStatistics(self, request, context):
        route = await self._router.route(request.name, context.time_remaining())
        return await route.inference.ModelStatistics(request, timeout=5,
                                                     metadata=route.pin(request.version))

    async def ModelInfer(self, request, context):
        [result] = await one_item(self._router.handle, request, context.time_remaining())
        raise_for(result)
        return result.response


def build_service(settings: RouterSettings, metrics: Metrics | None = None,
                  tracing: Tracing | None = None) -> Service:
    # Read by gRPC when the first xds:/// channel is made; this process has no other.
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap(settings)
    groups = None if metrics is None else GroupMetrics(metrics, "router->batcher")
    control_plane = ReloadingChannel(settings.control_plane, settings.tls,
                                     settings.control_plane_identity)

    async def routed_models():
        status = await AdminStub(control_plane.channel).Status(StatusRequest(),
                                                               timeout=SPLIT_WAIT_S)
        return [m.policy.model for m in status.models]

    router = Router(settings.tls, settings.batcher_identity, groups, tracing,
                    known=KnownModels(routed_models, time.monotonic))
    health = HealthServicer()

    def register(server) -> None:
        server.add_generic_rpc_handlers((group_handler(router.handle, service.draining),))
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(router), server)

    service = Service(settings.listen, server_ssl_context(settings.tls), register, health,
                      background=[lambda: follow_control_plane(router, control_plane, health)],
                      cleanup=[router.close, control_plane.close,
                               *([] if tracing is None else [tracing.close])],
                      callers=Callers("router", settings.allowed_callers))
    return service


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
