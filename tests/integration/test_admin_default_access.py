"""The control plane's admin API without `--policy`, at its real gRPC server (in process,
mutual TLS, port 0): every client certificate may read, only the operators' certificates
change anything, and the services keep exactly the RPCs they call."""

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from meshserve.common.certificates import spiffe_id
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.mesh.service import ControlPlaneSettings, build_service
from meshserve.protocol import admin_pb2 as pb
from meshserve.protocol.admin_pb2_grpc import AdminStub
from meshserve.tools.certs import init_certs, issue_leaf

OPERATOR_NEEDED = ("without an access policy (--policy) that takes an operator's certificate "
                   "(client/developer, client/operator)")
CLI_TIMEOUT_S = 60


@pytest.fixture
async def control_plane(tmp_path: Path):
    """(port, data dir, TLS files by caller): the developer's (`client`), `client/app`'s, and
    the services' certificates."""
    tls = tmp_path / "tls"
    init_certs(tls)
    cert, key = issue_leaf(tls / "ca.crt", tls / "ca.key", tmp_path, "app",
                           [f"URI:{spiffe_id('client/app')}"], days=1, client_only=True)
    callers = {name: TlsFiles.for_identity(tls, name) for name in ("client", "router", "ingress")}
    callers["app"] = TlsFiles(cert, key, tls / "ca.crt")
    service = build_service(ControlPlaneSettings(
        listen="127.0.0.1:0", tls=TlsFiles.for_identity(tls, "control-plane"),
        store=str(tmp_path / "mesh.db"), model_repository=tmp_path / "models"))
    port = await service.start()
    try:
        yield port, tmp_path, callers
    finally:
        await service.stop(0.5)


async def admin_call(port: int, tls: TlsFiles, method: str, request):
    async with secure_channel(f"127.0.0.1:{port}", tls, "control-plane") as channel:
        return await getattr(AdminStub(channel), method)(request, timeout=10)


async def refused(port: int, tls: TlsFiles, method: str, request) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin_call(port, tls, method, request)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    return raised.value.details()


ENDPOINT = pb.Endpoint(model="mlp", version="1", address="127.0.0.1:9", region="local")
CHANGES = [
    ("RegisterEndpoint", ENDPOINT, "traffic:write"),
    ("SetPolicy", pb.SetPolicyRequest(policy=pb.Policy(model="mlp", weights={"1": 100})),
     "traffic:write"),
    ("Pin", pb.PinRequest(model="mlp", version="1"), "traffic:write"),
    ("Rollback", pb.RollbackRequest(model="mlp"), "traffic:write"),
    ("StartCanary", pb.CanaryPlan(model="mlp", to_version="1"), "traffic:write"),
    ("AbortCanary", pb.ModelRef(model="mlp"), "traffic:write"),
    ("RemoveEndpoint", ENDPOINT, "traffic:write"),
    ("PushModel", pb.PushModelRequest(name="mlp", version="2", artifact=b"x"), "models:write"),
    ("FetchModel", pb.FetchModelRequest(name="mlp", version="1"), "models:fetch"),
]


async def test_any_client_certificate_reads_but_only_operators_change_the_mesh(control_plane):
    """Without --policy, `client/app` (any client certificate of the mesh CA) registered
    endpoints, set weights and pushed models."""
    port, _, callers = control_plane
    app, operator = callers["app"], callers["client"]
    for method, request, action in CHANGES:
        assert await refused(port, app, method, request) == \
            f"'client/app' may not {action} model 'mlp': {OPERATOR_NEEDED}"
    assert await refused(port, app, "Audit", pb.AuditRequest()) == \
        f"'client/app' may not audit:read model '*': {OPERATOR_NEEDED}"
    assert await refused(port, app, "RecordEvent", pb.AuditEvent(action="token.issue")) == \
        f"'client/app' may not audit:write model '*': {OPERATOR_NEEDED}"
    assert not (await admin_call(port, app, "Status", pb.StatusRequest())).models
    # The operator's certificate changes the mesh; client/app reads the change.
    await admin_call(port, operator, "RegisterEndpoint", ENDPOINT)
    await admin_call(port, operator, "Pin", pb.PinRequest(model="mlp", version="1"))
    status = await admin_call(port, app, "Status", pb.StatusRequest())
    assert [(m.policy.model, dict(m.policy.weights)) for m in status.models] == \
        [("mlp", {"1": 100})]
    assert [v.name for v in (await admin_call(port, app, "ListModels",
                                              pb.ListModelsRequest())).versions] == []
    audit = await admin_call(port, operator, "Audit", pb.AuditRequest())
    denied = [e for e in audit.entries if e.action == "request.denied"]
    assert {e.actor for e in denied} == {"client/app"}
    assert len(denied) == len(CHANGES) + 2  # each change, the audit log's read and write


async def test_the_services_keep_exactly_their_own_calls(control_plane):
    port, _, callers = control_plane
    router, ingress = callers["router"], callers["ingress"]
    assert await admin_call(port, router, "Status", pb.StatusRequest()) is not None
    await admin_call(port, router, "ReportShadow", pb.ShadowReport(model="mlp", version="1"))
    assert await refused(port, router, "Pin", pb.PinRequest(model="mlp", version="1")) == \
        "'router' may not traffic:write model 'mlp'"
    await admin_call(port, ingress, "RecordEvent", pb.AuditEvent(action="request.denied"))
    assert await refused(port, ingress, "RegisterEndpoint", ENDPOINT) == \
        "'ingress' may not traffic:write model 'mlp'"


async def meshserve(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve.tools.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, output.decode()


async def test_the_cli_with_the_operators_certificate_changes_and_another_is_told_why(
        control_plane):
    port, data_dir, callers = control_plane
    common = ["--control-plane", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    await admin_call(port, callers["client"], "RegisterEndpoint", ENDPOINT)
    app = ["--cert", str(callers["app"].cert), "--key", str(callers["app"].key)]
    code, output = await meshserve("traffic", "pin", "mlp", "1", *common, *app)
    assert (code, output.strip()) == (1, f"error: PERMISSION_DENIED: 'client/app' may not "
                                         f"traffic:write model 'mlp': {OPERATOR_NEEDED}")
    code, output = await meshserve("traffic", "pin", "mlp", "1", *common)  # client.crt
    assert code == 0, output
