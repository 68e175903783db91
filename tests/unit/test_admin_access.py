"""The admin API's access policy: which action each RPC is, and who may call it."""

import asyncio

import pytest

from meshserve.common.access import parse_policy
from meshserve.common.certificates import spiffe_id
from meshserve.common.errors import PermissionDenied
from meshserve.mesh import admin_access
from meshserve.mesh.admin import AdminServicer
from meshserve.mesh.admin_access import Decision, decide, may_read, target_model
from meshserve.mesh.control import ControlPlane
from meshserve.mesh.policy import TrafficPolicy
from meshserve.mesh.store import Store
from meshserve.protocol import admin_pb2 as pb
from meshserve.tools.certs import init_certs, issue_leaf
from tests.peers import Peer
from tests.policies import ALICE_READS_MLP

POLICY = parse_policy(ALICE_READS_MLP + """\
  - principals: [client/deployer]
    actions: [traffic:write, models:write, models:fetch]
    models: ["mlp*"]
  - principals: [client/auditor]
    actions: [audit:read]
    models: ["*"]
  - principals: ["*"]
    actions: [traffic:write]
    models: [cnn]
""")
ADMIN_RPCS = pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name


def test_every_admin_rpc_is_an_action():
    assert set(ADMIN_RPCS) == set(admin_access.RPC_ACTIONS)


@pytest.mark.parametrize(("method", "request_", "action", "model"), [
    ("Status", pb.StatusRequest(model="mlp"), "models:read", "mlp"),
    ("Status", pb.StatusRequest(), "models:read", ""),
    ("GetCanary", pb.ModelRef(model="mlp"), "models:read", "mlp"),
    ("ListModels", pb.ListModelsRequest(name="cnn"), "models:read", "cnn"),
    ("ShowModel", pb.ShowModelRequest(name="mlp", version="2"), "models:read", "mlp"),
    ("FetchModel", pb.FetchModelRequest(name="mlp"), "models:fetch", "mlp"),
    ("PushModel", pb.PushModelRequest(name="mlp"), "models:write", "mlp"),
    ("SetPolicy", pb.SetPolicyRequest(policy=pb.Policy(model="cnn")), "traffic:write", "cnn"),
    ("Pin", pb.PinRequest(model="mlp"), "traffic:write", "mlp"),
    ("Rollback", pb.RollbackRequest(model="mlp"), "traffic:write", "mlp"),
    ("StartCanary", pb.CanaryPlan(model="mlp"), "traffic:write", "mlp"),
    ("AbortCanary", pb.ModelRef(model="mlp"), "traffic:write", "mlp"),
    ("RegisterEndpoint", pb.Endpoint(model="mlp"), "traffic:write", "mlp"),
    ("RemoveEndpoint", pb.Endpoint(model="mlp"), "traffic:write", "mlp"),
    ("ReportShadow", pb.ShadowReport(model="mlp"), "traffic:write", "mlp"),
    ("Audit", pb.AuditRequest(), "audit:read", "*"),
    ("RecordEvent", pb.AuditEvent(action="token.issue"), "audit:write", "*"),
])
def test_each_rpc_is_one_action_on_one_model(method, request_, action, model):
    assert admin_access.guard_of(method).action == action
    assert target_model(method, request_) == model


@pytest.mark.parametrize(("principal", "method", "request_", "expected"), [
    # alice reads mlp, nothing else
    ("client/alice", "Status", pb.StatusRequest(model="mlp"),
     Decision(True, "models:read", "mlp")),
    ("client/alice", "Status", pb.StatusRequest(model="other"),
     Decision(False, "models:read", "other")),
    ("client/alice", "ListModels", pb.ListModelsRequest(),
     Decision(True, "models:read", "*", filtered=True)),
    ("client/alice", "FetchModel", pb.FetchModelRequest(name="mlp"),
     Decision(False, "models:fetch", "mlp")),
    ("client/alice", "Pin", pb.PinRequest(model="mlp"), Decision(False, "traffic:write", "mlp")),
    ("client/alice", "Audit", pb.AuditRequest(), Decision(False, "audit:read", "*")),
    # every principal may shift cnn's traffic
    ("client/alice", "Pin", pb.PinRequest(model="cnn"), Decision(True, "traffic:write", "cnn")),
    # deployer: globs on models, fetch without read
    ("client/deployer", "FetchModel", pb.FetchModelRequest(name="mlp-large"),
     Decision(True, "models:fetch", "mlp-large")),
    ("client/deployer", "PushModel", pb.PushModelRequest(name="cnn"),
     Decision(False, "models:write", "cnn")),
    ("client/deployer", "ShowModel", pb.ShowModelRequest(name="mlp"),
     Decision(False, "models:read", "mlp")),
    # audit:read is on the whole mesh
    ("client/auditor", "Audit", pb.AuditRequest(), Decision(True, "audit:read", "*")),
    # admin implies everything, fetch included
    ("client/developer", "FetchModel", pb.FetchModelRequest(name="any"),
     Decision(True, "models:fetch", "any")),
    ("client/developer", "Audit", pb.AuditRequest(), Decision(True, "audit:read", "*")),
    # services: exactly the RPCs they call, whatever the policy's rules say
    ("router", "Status", pb.StatusRequest(), Decision(True, "models:read", "*")),
    ("router", "ReportShadow", pb.ShadowReport(model="mlp"),
     Decision(True, "traffic:write", "mlp")),
    ("router", "Pin", pb.PinRequest(model="cnn"), Decision(False, "traffic:write", "cnn")),
    ("ingress", "Status", pb.StatusRequest(), Decision(False, "models:read", "*")),
    ("batcher", "Audit", pb.AuditRequest(), Decision(False, "audit:read", "*")),
    # events in the audit log: the ingress (its own call), and those the policy lets write it
    # (any client/* certificate could, whatever the policy said)
    ("ingress", "RecordEvent", pb.AuditEvent(), Decision(True, "audit:write", "*")),
    ("client/alice", "RecordEvent", pb.AuditEvent(), Decision(False, "audit:write", "*")),
    ("client/auditor", "RecordEvent", pb.AuditEvent(), Decision(False, "audit:write", "*")),
    ("client/developer", "RecordEvent", pb.AuditEvent(), Decision(True, "audit:write", "*")),
    ("router", "RecordEvent", pb.AuditEvent(), Decision(False, "audit:write", "*")),
    # an RPC without a guard is refused
    ("client/developer", "Unknown", pb.StatusRequest(), Decision(False, "Unknown", "*")),
])
def test_decide(principal, method, request_, expected):
    assert decide(POLICY, principal, method, request_) == expected


@pytest.mark.parametrize(("principal", "model", "visible"), [
    ("client/alice", "mlp", True), ("client/alice", "cnn", False),
    ("client/developer", "cnn", True), ("router", "cnn", True), ("client/bob", "mlp", False),
])
def test_listings_show_what_the_caller_may_read(principal, model, visible):
    assert may_read(POLICY, principal, model) is visible


def test_refusal_names_the_principal_action_and_model():
    decision = decide(POLICY, "client/alice", "Pin", pb.PinRequest(model="mlp"))
    assert decision.refusal("client/alice") == \
        "'client/alice' may not traffic:write model 'mlp'"
    assert admin_access.denial_reason("Pin", decision) == \
        "permission_denied: traffic:write on mlp (Pin)"


class CertificateContext:
    """What the servicer reads of a call: the peer's certificate."""

    def __init__(self, pem: bytes) -> None:
        self._pem = pem

    def auth_context(self):
        return {"x509_pem_cert": [self._pem]}

    def peer_identity_key(self):
        return None  # no names of the peer from gRPC: the certificate is read


@pytest.fixture(scope="module")
def nobody_pem(tmp_path_factory) -> bytes:
    directory = tmp_path_factory.mktemp("tls")
    init_certs(directory, days=1)
    cert, _ = issue_leaf(directory / "ca.crt", directory / "ca.key", directory, "nobody",
                         [f"URI:{spiffe_id('client/nobody')}"], days=1, client_only=True)
    return cert.read_bytes()


def test_every_rpc_of_the_servicer_is_checked_and_each_refusal_audited(tmp_path, nobody_pem):
    store = Store.open(tmp_path / "mesh.db")
    denied: list[str] = []
    servicer = AdminServicer(ControlPlane(store), None, lambda: parse_policy("rules: []"),
                             denied.append)
    context = CertificateContext(nobody_pem)
    checked = 0
    for name, method in ADMIN_RPCS.items():
        if admin_access.guard_of(name).lists:
            continue
        request = getattr(pb, method.input_type.name)()
        with pytest.raises(PermissionDenied) as raised:
            asyncio.run(getattr(servicer, name)(request, context))
        assert raised.value.message.startswith("'client/nobody' may not "), name
        checked += 1
    assert checked == len(ADMIN_RPCS) - 3  # Status, ListModels, WatchReadiness
    assert len(denied) == checked
    entries = [e for e in store.audit() if e.action == "request.denied"]
    assert len(entries) == checked
    assert {e.actor for e in entries} == {"client/nobody"}


def test_a_listing_of_every_model_is_filtered_not_refused(tmp_path, nobody_pem):
    store = Store.open(tmp_path / "mesh.db")
    control = ControlPlane(store)
    control.set_policy(TrafficPolicy("mlp", {"1": 100}), "test")
    open_servicer = AdminServicer(control)
    gated = AdminServicer(control, None, lambda: parse_policy("rules: []"))
    context = CertificateContext(nobody_pem)
    assert len(asyncio.run(open_servicer.Status(pb.StatusRequest(), context)).models) == 1
    assert len(asyncio.run(gated.Status(pb.StatusRequest(), context)).models) == 0


OPERATORS = frozenset({"client/developer", "client/operator"})
NEEDS_AN_OPERATOR = ("without an access policy (--policy) that takes an operator's certificate "
                     "(client/developer, client/operator)")


@pytest.mark.parametrize(("principal", "method", "request_", "expected"), [
    # any client certificate reads
    ("client/app", "Status", pb.StatusRequest(), Decision(True, "models:read", "*")),
    ("client/app", "GetCanary", pb.ModelRef(model="mlp"), Decision(True, "models:read", "mlp")),
    ("client/app", "ListModels", pb.ListModelsRequest(), Decision(True, "models:read", "*")),
    ("client/app", "ShowModel", pb.ShowModelRequest(name="mlp"),
     Decision(True, "models:read", "mlp")),
    ("client/app", "WatchReadiness", pb.ReadinessRequest(), Decision(True, "models:read", "*")),
    # ... and changes nothing, nor takes artifacts or the audit log
    ("client/app", "PushModel", pb.PushModelRequest(name="mlp"),
     Decision(False, "models:write", "mlp", needs=NEEDS_AN_OPERATOR)),
    ("client/app", "SetPolicy", pb.SetPolicyRequest(policy=pb.Policy(model="mlp")),
     Decision(False, "traffic:write", "mlp", needs=NEEDS_AN_OPERATOR)),
    ("client/app", "RegisterEndpoint", pb.Endpoint(model="mlp"),
     Decision(False, "traffic:write", "mlp", needs=NEEDS_AN_OPERATOR)),
    ("client/app", "FetchModel", pb.FetchModelRequest(name="mlp"),
     Decision(False, "models:fetch", "mlp", needs=NEEDS_AN_OPERATOR)),
    ("client/app", "Audit", pb.AuditRequest(),
     Decision(False, "audit:read", "*", needs=NEEDS_AN_OPERATOR)),
    # the operators' certificates do everything
    ("client/developer", "PushModel", pb.PushModelRequest(name="mlp"),
     Decision(True, "models:write", "mlp")),
    ("client/operator", "Rollback", pb.RollbackRequest(model="mlp"),
     Decision(True, "traffic:write", "mlp")),
    ("client/operator", "Audit", pb.AuditRequest(), Decision(True, "audit:read", "*")),
    # the services: exactly what they call
    ("router", "Status", pb.StatusRequest(), Decision(True, "models:read", "*")),
    ("router", "ReportShadow", pb.ShadowReport(model="mlp"),
     Decision(True, "traffic:write", "mlp")),
    ("router", "Pin", pb.PinRequest(model="mlp"), Decision(False, "traffic:write", "mlp")),
    ("ingress", "WatchReadiness", pb.ReadinessRequest(), Decision(True, "models:read", "*")),
    ("ingress", "RecordEvent", pb.AuditEvent(), Decision(True, "audit:write", "*")),
    ("batcher", "RegisterEndpoint", pb.Endpoint(model="mlp"),
     Decision(False, "traffic:write", "mlp")),
    # events in the audit log take an operator; an unknown RPC is refused
    ("client/app", "RecordEvent", pb.AuditEvent(),
     Decision(False, "audit:write", "*", needs=NEEDS_AN_OPERATOR)),
    ("client/operator", "RecordEvent", pb.AuditEvent(), Decision(True, "audit:write", "*")),
    ("client/developer", "Unknown", pb.StatusRequest(), Decision(False, "Unknown", "*")),
])
def test_decide_without_a_policy(principal, method, request_, expected):
    assert admin_access.decide_without_policy(principal, method, request_, OPERATORS) == expected


def test_without_a_policy_only_operators_change_the_mesh_and_each_refusal_is_audited(tmp_path):
    """Without --policy every client certificate (`client/app`) pushed models, moved traffic
    and read the audit log; now each change is PERMISSION_DENIED naming the identity and the
    role, audited and counted, and the operator's certificate still changes everything."""
    store = Store.open(tmp_path / "mesh.db")
    control = ControlPlane(store)
    control.set_policy(TrafficPolicy("mlp", {"1": 100}), "test")
    denied: list[str] = []
    servicer = AdminServicer(control, None, None, denied.append)
    refused = []
    for name, method in ADMIN_RPCS.items():
        guard = admin_access.RPC_ACTIONS.get(name)
        if guard is None or guard.action in admin_access.OPEN_ACTIONS:
            continue
        request = getattr(pb, method.input_type.name)()
        with pytest.raises(PermissionDenied) as raised:
            asyncio.run(getattr(servicer, name)(request, Peer("client/app")))
        assert raised.value.message.startswith("'client/app' may not "), name
        assert raised.value.message.endswith(f": {NEEDS_AN_OPERATOR}"), name
        refused.append(name)
    assert sorted(refused) == sorted(
        {"FetchModel", "PushModel", "SetPolicy", "Pin", "Rollback", "StartCanary",
         "AbortCanary", "RegisterEndpoint", "RemoveEndpoint", "ReportShadow", "Audit",
         "RecordEvent"})
    assert len(denied) == len(refused)
    entries = [e for e in store.audit() if e.action == "request.denied"]
    assert {e.actor for e in entries} == {"client/app"} and len(entries) == len(refused)
    # reads stay open; the operator changes traffic
    assert len(asyncio.run(servicer.Status(pb.StatusRequest(), Peer("client/app"))).models) == 1
    pinned = asyncio.run(servicer.Pin(pb.PinRequest(model="mlp", version="1"), Peer()))
    assert dict(pinned.weights) == {"1": 100}
    asyncio.run(servicer.RecordEvent(pb.AuditEvent(action="x"), Peer("client/operator")))
