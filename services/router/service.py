"""The router: picks the version that serves each request and forwards groups to its batcher.

`meshserve router --route MODEL@VERSION=HOST:PORT [...] [--default-version MODEL=V]`
"""

import argparse
import asyncio
import time
from dataclasses import dataclass

from meshserve.common import runtime
from meshserve.common.errors import ServingError
from meshserve.common.forwarding import (
    Entry,
    GroupForwarder,
    deadline_of,
    error_result,
    raise_for,
)
from meshserve.common.server import HealthServicer, Service
from meshserve.common.tls import TlsFiles, server_credentials
from meshserve.common.upstream import Upstream
from meshserve.protocol import groups_pb2_grpc, grpc_service_pb2_grpc
from meshserve.protocol.groups_pb2 import GroupItem, InferGroupResult, ItemResult
from meshserve.protocol.grpc_service_pb2 import ModelReadyRequest, ModelStatisticsResponse
from meshserve.router.routes import RouteTable


@dataclass(frozen=True)
class RouterSettings:
    listen: str
    tls: TlsFiles
    routes: RouteTable
    batcher_identity: str = "batcher"


class Destination:
    """A model version's batcher: its channel and the forwarder that groups calls to it."""

    def __init__(self, model: str, version: str, upstream: Upstream) -> None:
        self.model = model
        self.version = version
        self.upstream = upstream
        self.forwarder = GroupForwarder(self._call, model, f"batcher of {model}@{version}")

    async def _call(self, group, timeout):
        return await self.upstream.groups.Infer(group, timeout=timeout)


class Router:
    def __init__(self, routes: RouteTable, destinations: dict[tuple[str, str], Destination]):
        self.routes = routes
        self.destinations = destinations

    @property
    def ready(self) -> bool:
        return all(d.upstream.serving for d in self.destinations.values())

    async def infer(self, model: str, items) -> list[ItemResult]:
        """Results in the order of `items`; each version's share travels as one parcel."""
        arrived = time.monotonic()
        results: list[ItemResult | None] = [None] * len(items)
        parcels: dict[str, tuple[list[int], list[Entry]]] = {}
        for i, item in enumerate(items):
            try:
                version = self.routes.resolve(model, item.request.model_version)
            except ServingError as error:
                results[i] = error_result(error)
                continue
            item.request.model_version = version
            positions, entries = parcels.setdefault(version, ([], []))
            positions.append(i)
            entries.append((item, deadline_of(item.timeout_us, arrived)))
        answers = await asyncio.gather(*(
            self.destinations[model, version].forwarder.forward(entries)
            for version, (_, entries) in parcels.items()))
        for (positions, _), answer in zip(parcels.values(), answers):
            for i, result in zip(positions, answer):
                results[i] = result
        return results  # type: ignore[return-value]

    def matching(self, model: str, version: str) -> list[Destination]:
        """Destinations of a model (all when empty) and version (all when empty)."""
        if model:
            self.routes.resolve(model, version)  # NOT_FOUND for unknown names
        return [d for d in self.destinations.values()
                if (not model or d.model == model) and (not version or d.version == version)]


class GroupServicer(groups_pb2_grpc.GroupInferenceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Infer(self, request, context):
        results = await self._router.infer(request.model_name, request.items)
        return InferGroupResult(results=results)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Readiness and statistics of the versions behind the router; ModelInfer for debugging."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def ModelReady(self, request, context):
        version = self._router.routes.resolve(request.name, request.version)
        destination = self._router.destinations[request.name, version]
        return await destination.upstream.inference.ModelReady(
            ModelReadyRequest(name=request.name, version=destination.version), timeout=5)

    async def ModelStatistics(self, request, context):
        response = ModelStatisticsResponse()
        for destination in self._router.matching(request.name, request.version):
            reply = await destination.upstream.inference.ModelStatistics(request, timeout=5)
            response.model_stats.extend(reply.model_stats)
        return response

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        item = GroupItem(request=request, timeout_us=int(remaining * 1e6) if remaining else 0)
        [result] = await self._router.infer(request.model_name, [item])
        raise_for(result)
        return result.response


def build_service(settings: RouterSettings) -> Service:
    destinations = {
        (model, version): Destination(
            model, version, Upstream(address, settings.tls, settings.batcher_identity))
        for model, version, address in settings.routes.targets()}
    router = Router(settings.routes, destinations)
    health = HealthServicer()

    def register(server) -> None:
        groups_pb2_grpc.add_GroupInferenceServicer_to_server(GroupServicer(router), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(router), server)

    async def close() -> None:
        for destination in destinations.values():
            await destination.upstream.close()

    background = [(lambda d=d: d.upstream.watch(lambda: health.set(router.ready)))
                  for d in destinations.values()]
    return Service(settings.listen, server_credentials(settings.tls), register, health,
                   background=background, cleanup=[close])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshserve router", description=__doc__)
    runtime.add_server_flags(parser)
    parser.add_argument("--route", action="append", required=True,
                        metavar="MODEL@VERSION=HOST:PORT",
                        help="the batcher of a model version (repeatable)")
    parser.add_argument("--default-version", action="append", default=[],
                        metavar="MODEL=VERSION",
                        help="version for requests that name none (default: the highest)")
    parser.add_argument("--batcher-identity", default="batcher",
                        help="identity the batchers' certificates must name")
    args = parser.parse_args(argv)
    runtime.configure_logging("router", args.log_level)
    settings = RouterSettings(listen=args.listen, tls=runtime.tls_files(args),
                              routes=RouteTable.parse(args.route, args.default_version),
                              batcher_identity=args.batcher_identity)

    async def build() -> Service:
        return build_service(settings)

    return runtime.serve(build, args.port_file, args.drain_seconds)
