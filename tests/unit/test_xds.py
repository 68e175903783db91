"""The Aggregated Discovery Service over a real (insecure, loopback) gRPC server."""

import asyncio
import contextlib

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from meshserve.mesh.policy import Endpoint, MeshState, TrafficPolicy
from meshserve.mesh.resources import CLUSTER, ENDPOINTS, LISTENER
from meshserve.mesh.snapshot import Snapshot
from meshserve.mesh.xds import AggregatedDiscovery, SnapshotCache

STATE = MeshState(
    {"mlp": TrafficPolicy("mlp", {"1": 90, "2": 10}), "bert": TrafficPolicy("bert", {"3": 100})},
    (Endpoint("mlp", "1", "10.0.0.1:8001"), Endpoint("mlp", "2", "10.0.0.2:8001"),
     Endpoint("bert", "3", "10.0.0.3:8001")))
CHANGED = MeshState({**STATE.policies, "mlp": TrafficPolicy("mlp", {"1": 50, "2": 50})},
                    STATE.endpoints)
QUIET = 0.3  # how long "no response" is waited for
KEEP_NACKS, MAX_REASON = 100, 1024  # meshserve.mesh.xds's bounds on what NACKs leave
WAIT = 5.0  # bound on every expected response


class Client:
    """One ADS stream; a background task moves every response into a queue, so waiting for
    "no response" never cancels a read (which would cancel the call)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            channel).StreamAggregatedResources()
        self.responses: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                return
            self.responses.put_nowait(response)

    async def send(self, kind: str, names=(), version: str = "", nonce: str = "",
                   error: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=kind, resource_names=list(names),
                                                 version_info=version, response_nonce=nonce)
        request.node.id = "router-1"
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await asyncio.wait_for(self.call.write(request), WAIT)

    async def response(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.responses.get(), WAIT)

    async def nothing(self) -> bool:
        try:
            await asyncio.wait_for(self.responses.get(), QUIET)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await asyncio.wait_for(self._reader, WAIT)


@contextlib.asynccontextmanager
async def ads(state: MeshState = STATE):
    cache = SnapshotCache(Snapshot.of(state))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscovery(cache),
                                                                  server)
    port = server.add_insecure_port("127.0.0.1:0")
    channel = None
    client = None
    try:
        await asyncio.wait_for(server.start(), WAIT)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        client = Client(channel)
        yield cache, client
    finally:
        if client is not None:
            await client.close()
        if channel is not None:
            await asyncio.wait_for(channel.close(), WAIT)
        await asyncio.wait_for(server.stop(0), WAIT)


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    found = []
    for message in response.resources:
        target = {LISTENER: listener_pb2.Listener(), CLUSTER: cluster_pb2.Cluster()}[
            response.type_url]
        assert message.Unpack(target)
        found.append(target.name)
    return found


async def test_first_request_gets_the_snapshot_and_an_ack_gets_nothing():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        assert first.version_info == cache.snapshot.version == Snapshot.of(STATE).version
        assert first.type_url == LISTENER
        assert first.nonce != ""
        assert names_of(first) == ["mlp"]
        assert list(first.resources) == [cache.snapshot.resources[LISTENER]["mlp"]]

        await client.send(LISTENER, ["mlp"], first.version_info, first.nonce)  # ACK
        assert await client.nothing()
        assert cache.nacks == []


async def test_nack_is_recorded_and_gets_no_response():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        await client.send(LISTENER, ["mlp"], "", first.nonce, error="listener mlp is bad")
        assert await client.nothing()
        assert cache.nacks == [f"router-1 rejected {LISTENER} version {first.version_info}: "
                               "listener mlp is bad"]


async def test_what_nacks_leave_behind_is_bounded(caplog):
    """A client that NACKs over and over with long reasons: every NACK is counted, the last
    KEEP_NACKS reasons are kept and each is cut (and logged) at MAX_REASON characters.
    Before, every reason was kept and logged whole: 2,000 NACKs of 100 KB grew the control
    plane by 195 MiB and its log by 200 MB."""
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        for i in range(KEEP_NACKS + 20):
            await client.send(LISTENER, ["mlp"], "", first.nonce, error=f"{i}:" + "x" * 50_000)
        await client.send(CLUSTER, ["mlp-v1"])  # answered once every NACK before it is read
        await client.response()
    assert len(cache.nacks) == KEEP_NACKS
    assert cache.nacks[0].startswith(f"router-1 rejected {LISTENER} version "
                                     f"{first.version_info}: 20:xxx")
    assert {len(reason) for reason in cache.nacks} == {MAX_REASON}
    assert max(len(record.getMessage()) for record in caplog.records) < MAX_REASON + 100
    assert cache.nack_count == KEEP_NACKS + 20


async def test_requests_for_types_not_served_are_let_go():
    """Nothing of a type the control plane does not serve is kept or answered; the stream
    goes on."""
    async with ads() as (_, client):
        for i in range(50):
            await client.send(f"type.googleapis.com/not.Served{i}", ["x" * 1000])
        assert await client.nothing()
        await client.send(LISTENER, ["mlp"])
        assert names_of(await client.response()) == ["mlp"]


async def test_a_new_snapshot_pushes_every_subscribed_type_again():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        listeners = await client.response()
        await client.send(LISTENER, ["mlp"], listeners.version_info, listeners.nonce)
        await client.send(CLUSTER, ["mlp-v1", "mlp-v2"])
        clusters = await client.response()
        await client.send(CLUSTER, ["mlp-v1", "mlp-v2"], clusters.version_info, clusters.nonce)
        assert await client.nothing()

        new = Snapshot.of(CHANGED)
        assert new.version != cache.snapshot.version
        assert cache.set(new) is True
        pushed = {}
        for _ in range(2):
            response = await client.response()
            pushed[response.type_url] = response
        assert sorted(pushed) == sorted([LISTENER, CLUSTER])
        assert {r.version_info for r in pushed.values()} == {new.version}
        assert names_of(pushed[LISTENER]) == ["mlp"]
        assert sorted(names_of(pushed[CLUSTER])) == ["mlp-v1", "mlp-v2"]
        assert {listeners.nonce, clusters.nonce}.isdisjoint(
            {r.nonce for r in pushed.values()})
        assert await client.nothing()  # not sent twice


async def test_setting_the_same_snapshot_pushes_nothing():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        await client.send(LISTENER, ["mlp"], first.version_info, first.nonce)
        assert cache.set(Snapshot.of(STATE)) is False
        assert await client.nothing()


async def test_a_nacked_type_is_still_pushed_on_a_new_snapshot():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        await client.send(LISTENER, ["mlp"], "", first.nonce, error="no")
        assert await client.nothing()
        new = Snapshot.of(CHANGED)
        cache.set(new)
        pushed = await client.response()
        assert (pushed.type_url, pushed.version_info) == (LISTENER, new.version)


async def test_subscribing_to_new_names_gets_a_response():
    async with ads() as (cache, client):
        await client.send(LISTENER, ["mlp"])
        first = await client.response()
        await client.send(LISTENER, ["mlp", "bert"], first.version_info, first.nonce)
        second = await client.response()
        assert second.version_info == first.version_info
        assert sorted(names_of(second)) == ["bert", "mlp"]
        await client.send(LISTENER, ["mlp", "bert"], second.version_info, second.nonce)
        assert await client.nothing()


# name, requested names, expected cluster names
CLUSTERS = [
    ("one", ["mlp-v2"], ["mlp-v2"]),
    ("two", ["bert-v3", "mlp-v1"], ["bert-v3", "mlp-v1"]),
    ("unknown names are left out", ["mlp-v1", "nope-v1"], ["mlp-v1"]),
    ("none named: all", [], ["bert-v3", "mlp-v1", "mlp-v2"]),
]


@pytest.mark.parametrize("names, expected", [c[1:] for c in CLUSTERS],
                         ids=[c[0] for c in CLUSTERS])
async def test_cluster_request_returns_only_the_named_clusters(names, expected):
    async with ads() as (_, client):
        await client.send(CLUSTER, names)
        response = await client.response()
        assert response.type_url == CLUSTER
        assert sorted(names_of(response)) == expected


async def test_endpoints_request():
    async with ads() as (_, client):
        await client.send(ENDPOINTS, ["mlp-v1"])
        response = await client.response()
        assert response.type_url == ENDPOINTS
        assert list(response.resources) == [Snapshot.of(STATE).resources[ENDPOINTS]["mlp-v1"]]
