"""A router asked about models the mesh does not route answers at once and keeps nothing for
them: the real router and control plane in process, each on port 0 over mutual TLS, the
control plane holding no traffic policy, called as the ingress calls the router.

Before, each such model got a channel through gRPC's xDS client of its own, for as long as
the router ran (about 1.6 MiB and a thread each), and each call waited 5 s for a route that
never came: 240 names grew the router by 390 MiB and 254 threads."""

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest

from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.mesh.service import ControlPlaneSettings
from meshserve.mesh.service import build_service as control_plane_service
from meshserve.protocol import grpc_service_pb2 as pb
from meshserve.protocol.groups_pb2 import GroupItem, InferGroup, InferGroupResult
from meshserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from meshserve.router.service import RouterSettings
from meshserve.router.service import build_service as router_service
from meshserve.tools.certs import init_certs
from tests.polling import until

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
NAMES = 40


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
async def router(tmp_path: Path, monkeypatch):
    # The router names its xDS bootstrap in the environment: put it back afterwards.
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", "")
    init_certs(tmp_path / "tls")
    tls = tmp_path / "tls"
    control = control_plane_service(ControlPlaneSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tls, "control-plane"),
        store=str(tmp_path / "mesh.db")))
    control_port = await control.start()
    router = router_service(RouterSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tls, "router"),
        control_plane=f"127.0.0.1:{control_port}"))
    port = await router.start()
    channel = secure_channel(f"127.0.0.1:{port}", TlsFiles.for_identity(tls, "ingress"),
                             "router")
    try:
        await until(lambda: router.health.serving(), 30, "the router heard the control plane")
        yield channel
    finally:
        await channel.close()
        await router.stop(0.5)
        await control.stop(0.5)


async def test_models_the_mesh_does_not_route_are_refused_at_once_and_hold_nothing(router):
    stub = GRPCInferenceServiceStub(router)
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="warm-up"), timeout=10)).ready
    before = threads()
    started = time.monotonic()
    replies = await asyncio.gather(*(
        stub.ModelReady(pb.ModelReadyRequest(name=f"nosuch-{i}"), timeout=10)
        for i in range(NAMES)))
    assert [reply.ready for reply in replies] == [False] * NAMES
    assert time.monotonic() - started < 3.0
    assert threads() - before < 5


async def test_a_group_for_a_model_the_mesh_does_not_route_is_refused_item_by_item(router):
    infer = router.unary_unary("/meshserve.v1.GroupInference/Infer")
    group = InferGroup(model_name="m" * 5000, items=[
        GroupItem(request=pb.ModelInferRequest(model_name="m" * 5000), request_id=str(i))
        for i in range(2)])
    started = time.monotonic()
    answer = InferGroupResult.FromString(await infer(group.SerializeToString(), timeout=10))
    assert time.monotonic() - started < 3.0
    assert [r.code for r in answer.results] == [UNAVAILABLE] * 2
    assert answer.results[0].message.startswith(f"no route to model '{'m' * 5000}' in the "
                                                "mesh: the control plane has no traffic "
                                                "policy for it")
