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


def test_every_admin_rpc_has_an_action_or_its_own_rule():
    guarded = set(admin_access.RPC_ACTIONS) | admin_access.OWN_RULE
    assert set(ADMIN_RPCS) == guarded
    assert not set(admin_access.RPC_ACTIONS) & admin_access.OWN_RULE


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
    # RecordEvent keeps its own rule (checked by the servicer)
    ("ingress", "RecordEvent", pb.AuditEvent(), Decision(True, "RecordEvent", "*")),
    ("client/alice", "RecordEvent", pb.AuditEvent(), Decision(True, "RecordEvent", "*")),
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
        if name in admin_access.OWN_RULE or admin_access.guard_of(name).lists:
            continue
        request = getattr(pb, method.input_type.name)()
        with pytest.raises(PermissionDenied) as raised:
            asyncio.run(getattr(servicer, name)(request, context))
        assert raised.value.message.startswith("'client/nobody' may not "), name
        checked += 1
    assert checked == len(ADMIN_RPCS) - 4  # RecordEvent, Status, ListModels, WatchReadiness
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
